"""A simulated labeler whose gold is a reward model: label comparisons with a trained (e.g.
larger, or "gold") RM, to study label noise and counts, or to run the loop without people."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlhf_jax.feedback.labelers import GoldLabeler, check_responses
from rlhf_jax.reward_model import RMScorer

_SCORE_CACHE_MAX = 4096  # (prompt, response) scores kept between calls


class RMLabeler(GoldLabeler):
    """Ranks responses by an RM's score (`reward_model.RMScorer`: the RM's tokenizer, its
    training layout and truncation), with `GoldLabeler`'s ties and noise: with probability
    `noise` a uniformly drawn different permutation (K = 2: the choice is flipped).
    `label_many` scores the responses of many comparisons in batches."""

    def __init__(self, rm: Any, *, noise: float = 0.0, seed: int = 0, max_length: int | None = None,
                 max_prompt_length: int | None = None, name: str | None = None, batch_size: int = 32,
                 mesh: Any = None):
        """`rm`: an RM stage's `workdir/model` or a `(model, tokenizer)` pair with a reward head;
        `max_length`, `max_prompt_length`: None = those the RM was trained with (`RMScorer`);
        `name` defaults to "rm-<dir>-<hash of the path>-noise<n>-seed<s>"."""
        if not 0.0 <= noise <= 1.0:  # argument errors first: loading a checkpoint takes a while
            raise ValueError(f"noise: must be in [0, 1], got {noise}")
        self.scorer = RMScorer(rm, max_length=max_length, max_prompt_length=max_prompt_length,
                               batch_size=batch_size, mesh=mesh)
        self.source = str(Path(rm).resolve()) if isinstance(rm, (str, os.PathLike)) else None
        if name is None:
            tag = "pair"
            if self.source is not None:
                digest = hashlib.sha256(self.source.encode()).hexdigest()[:6]
                tag = f"{os.path.basename(os.path.dirname(self.source)) or 'model'}-{digest}"
            name = f"rm-{tag}-noise{noise:g}-seed{seed}"
        super().__init__(self._score, noise=noise, seed=seed, name=name)
        self.tokenizer, self.model_def, self.params = self.scorer.tokenizer, self.scorer.model_def, self.scorer.params
        self._cache: dict[tuple[str, str], float] = {}

    def scores(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """RM scores float32 [N] of (prompt, response) pairs."""
        return self.scorer(pairs)

    def _fill(self, pairs: Sequence[tuple[str, str]]) -> None:
        pairs = list(dict.fromkeys(pairs))
        if len(self._cache) + len(pairs) > _SCORE_CACHE_MAX:
            self._cache.clear()  # bounded memory; the pairs asked for now are all rescored
        todo = [p for p in pairs if p not in self._cache]
        if todo:
            self._cache.update(zip(todo, (float(s) for s in self.scorer(todo))))

    def _score(self, prompt: str, response: str) -> float:
        # GoldLabeler's score_fn; label / label_many fill the cache first in one batched pass.
        if (prompt, response) not in self._cache:
            self._fill([(prompt, response)])
        return self._cache[(prompt, response)]

    def label(self, prompt: str, responses: Sequence[str]) -> list[int]:
        check_responses(responses)
        return self.label_many([(prompt, responses)])[0]

    def label_many(self, comparisons: Sequence[tuple[str, Sequence[str]]]) -> list[list[int]]:
        """`label` of many (prompt, responses) comparisons, scoring all responses in batches."""
        for i, (_, responses) in enumerate(comparisons):
            if len(responses) < 2:
                raise ValueError(f"comparisons[{i}].responses: need at least 2 to compare, got {len(responses)}")
        self._fill([(p, r) for p, rs in comparisons for r in rs])
        return [GoldLabeler.label(self, p, rs) for p, rs in comparisons]
