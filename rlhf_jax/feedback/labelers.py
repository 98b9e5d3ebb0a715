"""Simulated labelers: programmatic stand-ins for human raters.

They let the whole loop (sample → label → reward model → PPO) run and be tested before any
human is involved, with a known gold preference to measure reward-model accuracy against.
All but `RMLabeler` need no model; `RMLabeler` ranks by a reward-model checkpoint and
imports JAX only when one is built, so importing this module stays light.

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

import functools
import hashlib
import json
import math
import os
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from rlhf_jax.feedback.store import ComparisonStore

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "BradleyTerryLabeler",
    "GoldLabeler",
    "Labeler",
    "RMLabeler",
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


def _check_responses(responses: Sequence[str]) -> None:
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
        _check_responses(responses)
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
        _check_responses(responses)
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
        _check_responses(responses)
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
_SCORE_CACHE_MAX = 4096  # (prompt, response) scores an RMLabeler keeps between calls


class RMLabeler(GoldLabeler):
    """Ranks responses by a reward model's score: a simulated labeler whose gold is an RM.

    Use it to label comparisons with a trained (e.g. larger, or "gold") reward model, to
    study how noise and label counts affect the next RM, or to run the loop without people.

    Scoring mirrors how the RM was trained (`data.preference_dataset`): the RM's tokenizer
    encodes prompt and response separately, the sequence is [BOS] + prompt + response +
    [EOS] (BOS and EOS only when not already there), truncated like the dataset (prompt
    cut from the left, response from the right, to `max_length` tokens), left-padded, and
    scored with `model.reward` (the normalised score read at the last token).

    Ranking and noise are `GoldLabeler`'s, with the RM score as `score_fn`: best first,
    equal scores in random order, and with probability `noise` a uniformly drawn different
    permutation (K = 2: the choice is flipped). Randomness depends on (seed, name, prompt,
    responses) only, so labels do not depend on batching or item order.

    `label_many` scores the responses of many comparisons together, `batch_size` sequences
    per call of one compiled program (the last call is filled with copies); `label_store`
    uses it.
    """

    def __init__(self, rm: Any, *, noise: float = 0.0, seed: int = 0, max_length: int = 128,
                 max_prompt_length: int | None = None, name: str | None = None, batch_size: int = 32,
                 mesh: Any = None):
        """Args:
          rm: a reward-model directory (an RM stage's `workdir/model`: weights, reward head
            with its normalisation, tokenizer) or a `(model, tokenizer)` pair whose model has
            a reward head.
          noise, seed: as `GoldLabeler`.
          max_length: tokens per scored sequence (use the RM's training `data.max_length`).
          max_prompt_length: optional cap on the prompt part (the RM's training value).
          name: the label's "labeler"; default "rm-<dir>-<hash of the path>-noise<n>-seed<s>".
          batch_size: sequences per RM call (rounded up to a multiple of the mesh's batch
            shards).
          mesh: where a directory is loaded and the RM runs (default: all devices for a
            directory; for a pair, where its parameters are).
        """
        # JAX and the models are imported here, not at the top, so that the labeling server
        # and the other labelers never pay for them.
        import jax

        from rlhf_jax import sharding as sharding_lib
        from rlhf_jax.feedback import collect
        from rlhf_jax.params import ModelDef
        from rlhf_jax.sampling import param_shardings
        from rlhf_jax.sharding import batch_sharding

        # Argument errors first: loading a checkpoint takes a while.
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise: must be in [0, 1], got {noise}")
        if int(max_length) < 2:
            raise ValueError(f"max_length: must be >= 2 (BOS + one response token), got {max_length}")
        if max_prompt_length is not None and not 1 <= int(max_prompt_length) < int(max_length):
            raise ValueError(f"max_prompt_length: must be in [1, max_length - 1 = {int(max_length) - 1}], "
                             f"got {max_prompt_length}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        model, tokenizer, source = collect.load_model(rm, ("reward",), mesh)
        self.source = source
        if name is None:
            tag = "pair"
            if source is not None:
                digest = hashlib.sha256(source.encode()).hexdigest()[:6]
                tag = f"{os.path.basename(os.path.dirname(source)) or 'model'}-{digest}"
            name = f"rm-{tag}-noise{noise:g}-seed{seed}"
        super().__init__(self._score, noise=noise, seed=seed, name=name)
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.max_prompt_length = None if max_prompt_length is None else int(max_prompt_length)
        self.mesh = mesh if mesh is not None else collect.model_mesh(model)
        shards = sharding_lib.batch_shards(self.mesh)
        self.batch_size = -(-int(batch_size) // shards) * shards
        self.model_def, _, params = ModelDef.split(model, None)
        # A no-op for a model already laid out on this mesh; moves a pair's model otherwise.
        self.params = jax.device_put(params, param_shardings(self.model_def, self.mesh))
        self._batch_sharding = batch_sharding(self.mesh, 2)
        model_def = self.model_def
        self._reward = collect.cached_program(
            "rm_reward", model_def, self.mesh, None, lambda: jax.jit(functools.partial(_rm_reward, model_def)))
        self._cache: dict[tuple[str, str], float] = {}

    def encode(self, prompt: str, response: str) -> list[int]:
        """The token ids the RM scores for one response (see the class docstring)."""
        return self._encode([(prompt, response)])[0]

    def _encode(self, pairs: Sequence[tuple[str, str]]) -> list[list[int]]:
        from rlhf_jax.data import truncation_lengths

        tok = self.tokenizer
        texts = list(dict.fromkeys(t for pair in pairs for t in pair))
        ids = dict(zip(texts, tok(texts, add_special_tokens=False)["input_ids"])) if texts else {}
        bos, eos = tok.bos_token_id, tok.eos_token_id
        seqs = []
        for prompt, response in pairs:
            p_ids = list(ids[prompt])
            r_ids = list(ids[response])
            if not r_ids or r_ids[-1] != eos:
                r_ids.append(eos)
            first = (p_ids or r_ids)[0]
            prefix = [] if bos is None or first == bos else [bos]
            cap = None if self.max_prompt_length is None else self.max_prompt_length - len(prefix)
            p, r = truncation_lengths(len(p_ids), len(r_ids), self.max_length - len(prefix), cap)
            seqs.append(prefix + p_ids[len(p_ids) - p:] + r_ids[:r])
        return seqs

    def scores(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """Normalised RM scores float32 [N] of (prompt, response) pairs."""
        import jax
        import numpy as np

        from rlhf_jax.data import left_pad
        from rlhf_jax.models.checkpoints import to_host

        seqs = [np.asarray(s, np.int32) for s in self._encode(pairs)]
        out = np.zeros(len(seqs), np.float32)
        b = self.batch_size
        for start in range(0, len(seqs), b):
            chunk = seqs[start:start + b]
            # Copies of a real row, not empty rows: one program shape and no all-padding row.
            chunk = chunk + [chunk[0]] * (b - len(chunk))
            ids_BT, mask_BT = left_pad(chunk, self.max_length, self.tokenizer.pad_token_id)
            ids_BT, mask_BT = jax.device_put((ids_BT, mask_BT), self._batch_sharding)
            n = min(b, len(seqs) - start)
            out[start:start + n] = to_host(self._reward(self.params, ids_BT, mask_BT))[:n]
        return out

    def _fill(self, pairs: Sequence[tuple[str, str]]) -> None:
        pairs = list(dict.fromkeys(pairs))
        if len(self._cache) + len(pairs) > _SCORE_CACHE_MAX:
            self._cache.clear()  # bounded memory; the pairs asked for now are all rescored
        todo = [p for p in pairs if p not in self._cache]
        if todo:
            self._cache.update(zip(todo, (float(s) for s in self.scores(todo))))

    def _score(self, prompt: str, response: str) -> float:
        # GoldLabeler's score_fn. label / label_many fill the cache first in one batched
        # pass; a direct gold_ranking call scores a miss here, one pair at a time.
        if (prompt, response) not in self._cache:
            self._fill([(prompt, response)])
        return self._cache[(prompt, response)]

    def label(self, prompt: str, responses: Sequence[str]) -> list[int]:
        _check_responses(responses)
        return self.label_many([(prompt, responses)])[0]

    def label_many(self, comparisons: Sequence[tuple[str, Sequence[str]]]) -> list[list[int]]:
        """`label` of many (prompt, responses) comparisons, scoring all responses in batches."""
        for i, (_, responses) in enumerate(comparisons):
            if len(responses) < 2:
                raise ValueError(f"comparisons[{i}].responses: need at least 2 to compare, got {len(responses)}")
        self._fill([(p, r) for p, rs in comparisons for r in rs])
        return [GoldLabeler.label(self, p, rs) for p, rs in comparisons]


def _rm_reward(model_def, params, ids_BT, mask_BT):
    """Normalised RM scores [B] of left-padded ids [B, T]; pure, jitted by RMLabeler with
    `model_def` bound (it is static structure, not arrays)."""
    return model_def.merge(params).reward(ids_BT, mask_BT)
