"""The reward model: the score at the last real token, the pairwise loss, the normalisation,
and scoring text with the RM's own tokenizer.

A training batch holds N responses (one forward pass each) and P pairs indexing them, so the
pairs of one prompt share the passes of its K responses (InstructGPT).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import sharding as sharding_lib
from rlhf_jax.data import left_pad, truncation_lengths
from rlhf_jax.data.batching import PAIR_WEIGHTINGS
from rlhf_jax.models import ModelDef, Transformer, cached_program, gather_last, load_model, model_mesh, to_host


def raw_scores(model: Transformer, input_ids_NT: jax.Array, attention_mask_NT: jax.Array) -> jax.Array:
    """Reward-head output at the last real token [N], before normalisation."""
    h_NTD, _ = model.hidden(input_ids_NT, attention_mask_NT)
    return gather_last(model.raw_rewards(h_NTD), attention_mask_NT)


def scores(model: Transformer, input_ids_NT: jax.Array, attention_mask_NT: jax.Array) -> jax.Array:
    """The RM's score [N]: gain · raw + bias, read at the last real token of each row."""
    return model.reward_gain[...] * raw_scores(model, input_ids_NT, attention_mask_NT) + model.reward_bias[...]


def rm_loss(model: Transformer, batch: dict, *, center_rewards_coef: float = 0.0) -> tuple[jax.Array, jax.Array, dict]:
    """Σ w·(−log σ(r₊ − r₋ − margin)) over the pairs (+ TRL's reward-centring term), Σ w, and
    metric (Σ w·x, Σ w) pairs.

    w = pair_mask · pair_weight: `pair_weight` is 1/C(K,2) for the pairs of a K-response
    ranking with per-prompt weighting (InstructGPT; `data.batching`), 1 per pair without it
    (or when the batch has no `pair_weight`). accuracy counts an exact tie r₊ = r₋ as 0.5 and
    `ties` reports how often one occurred (identical inputs, or a constant head).
    """
    r_N = raw_scores(model, batch["input_ids"], batch["attention_mask"])
    r_chosen_P = r_N[batch["chosen_idx"]]
    r_rejected_P = r_N[batch["rejected_idx"]]
    mask_P = batch["pair_mask"].astype(jnp.float32)
    w_P = mask_P * batch["pair_weight"].astype(jnp.float32) if "pair_weight" in batch else mask_P
    diff_P = r_chosen_P - r_rejected_P
    loss_P = -jax.nn.log_sigmoid(diff_P - batch["margin"])
    if center_rewards_coef:
        loss_P = loss_P + center_rewards_coef * (r_chosen_P + r_rejected_P) ** 2
    weight = w_P.sum()
    tie_P = (diff_P == 0).astype(jnp.float32)

    def weighted(x_P):
        return (x_P * w_P).sum(), weight

    stats = {
        "loss": weighted(loss_P),
        "accuracy": weighted((diff_P > 0).astype(jnp.float32) + 0.5 * tie_P),
        "ties": weighted(tie_P),
        "reward_chosen": weighted(r_chosen_P),
        "reward_rejected": weighted(r_rejected_P),
        "reward_margin": weighted(diff_P),
        "pairs_per_batch": (mask_P.sum(), jnp.float32(1.0)),
    }
    return (loss_P * w_P).sum(), weight, stats


def batch_kwargs(cfg) -> dict:
    """`data.batches` arguments of a reward-model micro-batch (`cfg.rm`'s sizes and weighting)."""
    weighting = cfg.rm.get("pair_weighting", "per_prompt")
    if weighting not in PAIR_WEIGHTINGS:
        raise ValueError(f"rm.pair_weighting={weighting!r} is not one of {list(PAIR_WEIGHTINGS)}")
    return dict(max_responses=int(cfg.rm.max_responses), max_pairs=int(cfg.rm.max_pairs), pair_weighting=weighting)


def normalisation(raw: np.ndarray) -> tuple[float, float]:
    """Gain and bias so that `gain · raw + bias` has mean 0 and std 1 (OpenAI's RM
    normalisation, on reference responses or on samples of the initial policy)."""
    raw = np.asarray(raw, np.float64)
    if raw.size < 2:
        raise ValueError(f"reward normalisation needs at least 2 scores, got {raw.size}")
    std = raw.std()
    if not np.isfinite(std) or std < 1e-8:
        raise ValueError(f"reward normalisation: scores have std {std}; the RM gives a constant reward")
    gain = 1.0 / std
    return float(gain), float(-raw.mean() * gain)


def _scores_program(model_def: ModelDef, params: dict, ids_BT, mask_BT):
    return scores(model_def.merge(params), ids_BT, mask_BT)


class RMScorer:
    """Text in, scores out: (prompt, response) pairs encoded with the RM's own tokenizer
    exactly as its training data was — [BOS] prompt response [EOS], the prompt cut from the
    left to `max_prompt_length`, the whole to `max_length` — and scored in fixed-shape
    batches of one compiled program."""

    def __init__(self, rm: Any, *, max_length: int = 128, max_prompt_length: int | None = None,
                 batch_size: int = 32, tokenizer: Any = "", mesh=None):
        if int(max_length) < 2:
            raise ValueError(f"max_length: must be >= 2 (BOS + one response token), got {max_length}")
        if max_prompt_length is not None and not 1 <= int(max_prompt_length) < int(max_length):
            raise ValueError(f"max_prompt_length: must be in [1, max_length - 1 = {int(max_length) - 1}], "
                             f"got {max_prompt_length}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        model, self.tokenizer = load_model(rm, heads=("reward",), tokenizer=tokenizer, mesh=mesh,
                                           require_trained=("reward",), role="reward model")
        self.max_length = int(max_length)
        self.max_prompt_length = None if max_prompt_length is None else int(max_prompt_length)
        self.mesh = mesh if mesh is not None else model_mesh(model)
        shards = sharding_lib.batch_shards(self.mesh)
        self.batch_size = -(-int(batch_size) // shards) * shards
        self.model_def, _, params = ModelDef.split(model, None)
        # A no-op for a model already laid out on this mesh; moves a pair's model otherwise.
        self.params = jax.device_put(params, sharding_lib.param_shardings(self.model_def, self.mesh))
        self._batch_sharding = sharding_lib.batch_sharding(self.mesh, 2)
        self._program = cached_program("rm_scores", self.model_def, self.mesh, None,
                                       lambda: jax.jit(functools.partial(_scores_program, self.model_def)))

    def encode(self, pairs: Sequence[tuple[str, str]]) -> list[list[int]]:
        """The token ids the RM scores, one list per (prompt, response)."""
        tok = self.tokenizer
        texts = list(dict.fromkeys(t for pair in pairs for t in pair))
        ids = dict(zip(texts, tok(texts, add_special_tokens=False)["input_ids"])) if texts else {}
        bos, eos = tok.bos_token_id, tok.eos_token_id
        seqs = []
        for prompt, response in pairs:
            p_ids, r_ids = list(ids[prompt]), list(ids[response])
            if not r_ids or r_ids[-1] != eos:
                r_ids.append(eos)
            first = (p_ids or r_ids)[0]
            prefix = [] if bos is None or first == bos else [bos]
            cap = None if self.max_prompt_length is None else self.max_prompt_length - len(prefix)
            p, r = truncation_lengths(len(p_ids), len(r_ids), self.max_length - len(prefix), cap)
            seqs.append(prefix + p_ids[len(p_ids) - p:] + r_ids[:r])
        return seqs

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """Scores float32 [N] of (prompt, response) pairs."""
        seqs = [np.asarray(s, np.int32) for s in self.encode(pairs)]
        out = np.zeros(len(seqs), np.float32)
        b = self.batch_size
        for start in range(0, len(seqs), b):
            chunk = seqs[start:start + b]
            # Copies of a real row, not empty rows: one program shape and no all-padding row.
            chunk = chunk + [chunk[0]] * (b - len(chunk))
            ids_BT, mask_BT = left_pad(chunk, self.max_length, self.tokenizer.pad_token_id)
            ids_BT, mask_BT = jax.device_put((ids_BT, mask_BT), self._batch_sharding)
            n = min(b, len(seqs) - start)
            out[start:start + n] = to_host(self._program(self.params, ids_BT, mask_BT))[:n]
        return out
