"""Simulated labelers: programmatic stand-ins for human raters.

They let the whole loop (sample → label → reward model → PPO) run and be tested before any
human is involved, with a known gold preference to measure reward-model accuracy against.
None needs a model (`rm_labeler.RMLabeler` ranks by a reward model), so importing this
module, as the labeling server does, stays light.

A labeler has a `name` (stored as the label's "labeler") and
`label(prompt, responses) -> ranking`, the original response indices best first. It may
also have `label_many([(prompt, responses), ...]) -> [ranking, ...]`, which `label_store`
then uses to label many items per call (a model scores them in batches).

Randomness is derived from (seed, prompt, responses), not from a running generator, so a
labeler gives the same answer to the same comparison whatever order items come in, and a
labeling run that is interrupted and resumed produces the labels an uninterrupted run
would have.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable, Sequence
from typing import Protocol

from rlhf_jax.feedback.store import ComparisonStore

__all__ = [
    "BradleyTerryLabeler",
    "GoldLabeler",
    "Labeler",
    "RandomLabeler",
    "label_store",
]

ScoreFn = Callable[[str, str], float]


class Labeler(Protocol):
    """What `label_store` and the rest of the pipeline need from a labeler."""

    name: str

    def label(self, prompt: str, responses: Sequence[str]) -> list[int]:
        """Original response indices, best first (a permutation of range(len(responses)))."""
        ...


def _rng(seed: int, name: str, prompt: str, responses: Sequence[str]) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`, so this is stable across runs and
    # independent of PYTHONHASHSEED.
    digest = hashlib.sha256(json.dumps([prompt, list(responses)]).encode()).hexdigest()
    return random.Random(f"{name}:{seed}:{digest}")


def check_responses(responses: Sequence[str]) -> None:
    if len(responses) < 2:
        raise ValueError(f"responses: need at least 2 to compare, got {len(responses)}")


class GoldLabeler:
    """Ranks responses by a gold score, with a fixed probability of a wrong answer.

    The gold ranking sorts responses by `score_fn(prompt, response)`, highest first; equal
    scores are ordered at random (not by index, which would favour the first response).

    Noise: with probability `noise` the labeler returns a ranking drawn uniformly from the
    K!−1 permutations that differ from the gold one. For K = 2 that is exactly "the choice
    is flipped with probability `noise`"; for any K the gold ranking comes back with
    probability exactly 1 − noise. (Use `BradleyTerryLabeler` for mistakes that are more
    likely between responses with close scores.)
    """

    def __init__(self, score_fn: ScoreFn, noise: float = 0.1, seed: int = 0,
                 name: str | None = None):
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise: must be in [0, 1], got {noise}")
        self.score_fn = score_fn
        self.noise = noise
        self.seed = seed
        self.name = name or f"gold-noise{noise:g}-seed{seed}"

    def gold_ranking(self, prompt: str, responses: Sequence[str],
                     rng: random.Random | None = None) -> list[int]:
        """The noise-free ranking (random order among equal scores)."""
        check_responses(responses)
        rng = rng or _rng(self.seed, self.name, prompt, responses)
        scores = [float(self.score_fn(prompt, r)) for r in responses]
        tiebreak = [rng.random() for _ in responses]
        return sorted(range(len(responses)), key=lambda i: (-scores[i], tiebreak[i]))

    def label(self, prompt: str, responses: Sequence[str]) -> list[int]:
        rng = _rng(self.seed, self.name, prompt, responses)
        gold = self.gold_ranking(prompt, responses, rng)
        if rng.random() >= self.noise:
            return gold
        # Rejection sampling: for K = 2 half the draws are rejected, for larger K few are.
        while True:
            perm = list(gold)
            rng.shuffle(perm)
            if perm != gold:
                return perm


class BradleyTerryLabeler:
    """Samples a ranking from the Plackett–Luce model on gold scores.

    The best response is drawn with probability softmax(beta · score), then the next among
    the rest, and so on. For K = 2 the gold-better response wins with probability
    σ(beta · (s_better − s_worse)), the Bradley–Terry model a reward model assumes, so
    mistakes concentrate where scores are close. beta → ∞ is a noise-free gold labeler;
    beta = 0 ranks at random.
    """

    def __init__(self, score_fn: ScoreFn, beta: float = 1.0, seed: int = 0,
                 name: str | None = None):
        if beta < 0 or not math.isfinite(beta):
            raise ValueError(f"beta: must be a finite number >= 0, got {beta}")
        self.score_fn = score_fn
        self.beta = beta
        self.seed = seed
        self.name = name or f"bradley-terry-beta{beta:g}-seed{seed}"

    def label(self, prompt: str, responses: Sequence[str]) -> list[int]:
        check_responses(responses)
        rng = _rng(self.seed, self.name, prompt, responses)
        logits = {i: self.beta * float(self.score_fn(prompt, r))
                  for i, r in enumerate(responses)}
        ranking = []
        while logits:
            top = max(logits.values())  # subtract the max so exp cannot overflow
            idx = list(logits)
            weights = [math.exp(logits[i] - top) for i in idx]
            pick = rng.choices(idx, weights=weights)[0]
            ranking.append(pick)
            del logits[pick]
        return ranking


class RandomLabeler:
    """Ranks uniformly at random: the control a reward model must not learn from."""

    def __init__(self, seed: int = 0, name: str | None = None):
        self.seed = seed
        self.name = name or f"random-seed{seed}"

    def label(self, prompt: str, responses: Sequence[str]) -> list[int]:
        check_responses(responses)
        ranking = list(range(len(responses)))
        _rng(self.seed, self.name, prompt, responses).shuffle(ranking)
        return ranking


def label_store(store: ComparisonStore, labeler: Labeler, limit: int | None = None,
                kind: str = "ranking") -> int:
    """Labels the items `labeler.name` has not labeled yet, oldest first; returns how many.

    kind="ranking" stores the labeler's full ranking; kind="choice" stores only its top
    pick, as a person choosing the best of K would. A labeler with `label_many` (e.g.
    `RMLabeler`) gets up to 256 items per call, and their labels are stored after each call.
    """
    if kind not in ("ranking", "choice"):
        raise ValueError(f"kind: expected 'ranking' or 'choice', got {kind!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit: must be >= 0, got {limit}")
    todo = store.unlabeled(labeler.name)
    if limit is not None:
        todo = todo[:limit]
    label_many = getattr(labeler, "label_many", None)
    if label_many is None:
        for item in todo:
            ranking = labeler.label(item["prompt"], item["responses"])
            store.add_label(item["id"], labeler.name, kind,
                            ranking if kind == "ranking" else ranking[:1])
        return len(todo)
    # Chunks, so that an interrupted run has already stored the labels of finished chunks.
    for start in range(0, len(todo), _LABEL_CHUNK):
        chunk = todo[start:start + _LABEL_CHUNK]
        rankings = label_many([(item["prompt"], item["responses"]) for item in chunk])
        for item, ranking in zip(chunk, rankings, strict=True):
            store.add_label(item["id"], labeler.name, kind,
                            ranking if kind == "ranking" else ranking[:1])
    return len(todo)


_LABEL_CHUNK = 256  # items per label_many call in label_store
