"""Built-in tasks with a programmatic gold scorer, for experiments that need no downloads.

A task gives prompts, imperfect demonstrations for SFT, and a gold score. In an experiment the
gold scorer stands in for what humans want: only the simulated labeler (noisily) and the
final evaluation may read it; SFT, the RM and PPO never see it.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class WordSentimentTask:
    """"Describe the <noun>:" → a few adjectives. People (the gold scorer) want kind words.

    The demonstrations are imperfect on purpose: each adjective is as likely to be unkind as
    kind, so SFT learns the format and the vocabulary but not the preference, which is what
    the comparisons, the reward model and PPO have to add.

    gold(prompt, response) = (kind − unkind adjectives) / max(words, 1), in [−1, 1]: words that
    are neither (misspellings, babble) dilute the score, so degenerate text is not rewarded.
    """

    name: str = "word_sentiment"
    kind: tuple[str, ...] = ("good", "kind", "warm", "bright", "happy", "calm", "brave", "sweet")
    unkind: tuple[str, ...] = ("bad", "cold", "dull", "sad", "rude", "grim", "weak", "sour")
    nouns: tuple[str, ...] = ("cat", "dog", "day", "room", "song", "town", "meal", "tree", "lake", "road",
                              "book", "car", "house", "garden", "river", "friend")
    min_words: int = 3
    max_words: int = 5
    demo_kind_rate: float = 0.5

    def prompt(self, i: int) -> str:
        return f"Describe the {self.nouns[i % len(self.nouns)]}:"

    def prompts(self, n: int, offset: int = 0) -> list[str]:
        return [self.prompt(offset + i) for i in range(n)]

    def demonstrations(self, n: int, seed: int = 0) -> list[dict]:
        """SFT rows {"prompt", "completion"} with adjectives drawn kind/unkind 50/50."""
        rng = np.random.default_rng(seed)
        rows = []
        for i in range(n):
            words = []
            for _ in range(rng.integers(self.min_words, self.max_words + 1)):
                pool = self.kind if rng.random() < self.demo_kind_rate else self.unkind
                words.append(pool[rng.integers(len(pool))])
            rows.append({"prompt": self.prompt(i), "completion": " " + " ".join(words)})
        return rows

    def gold(self, prompt: str, response: str) -> float:
        words = [w.strip(".,!;:") for w in response.lower().split()]
        if not words:
            return -1.0
        kind = sum(w in self.kind for w in words)
        unkind = sum(w in self.unkind for w in words)
        return (kind - unkind) / len(words)

    def gold_batch(self, prompts, responses) -> list[float]:
        """The batched form (the reward-function signature), for evaluation."""
        return [self.gold(p, r) for p, r in zip(prompts, responses)]


TASKS = {"word_sentiment": WordSentimentTask}


def get_task(name: str):
    if name not in TASKS:
        raise ValueError(f"task={name!r} is not one of {sorted(TASKS)}")
    return TASKS[name]()
