"""Reward-model training: pairwise loss −log σ(r₊ − r₋ − margin), accuracy, normalisation.

A batch holds N responses (each prompt+response, one forward pass each) and P pairs that
index them, so all pairs of one prompt share the forward passes of its K responses
(InstructGPT). Padding pairs have pair_mask 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models import Transformer, gather_last


def raw_scores(model: Transformer, input_ids_NT: jax.Array, attention_mask_NT: jax.Array) -> jax.Array:
    """Un-normalised reward-head output at the last real token [N]."""
    h_NTD, _ = model.hidden(input_ids_NT, attention_mask_NT)
    return gather_last(model.raw_rewards(h_NTD), attention_mask_NT)


def rm_loss(model: Transformer, batch: dict, *, center_rewards_coef: float = 0.0) -> tuple[jax.Array, jax.Array, dict]:
    """Sum over real pairs of the pairwise loss (+ TRL's reward-centring term), the number of
    real pairs, and metric (sum, count) pairs."""
    r_N = raw_scores(model, batch["input_ids"], batch["attention_mask"])
    r_chosen_P = r_N[batch["chosen_idx"]]
    r_rejected_P = r_N[batch["rejected_idx"]]
    w_P = batch["pair_mask"].astype(jnp.float32)
    diff_P = r_chosen_P - r_rejected_P
    loss_P = -jax.nn.log_sigmoid(diff_P - batch["margin"])
    if center_rewards_coef:
        loss_P = loss_P + center_rewards_coef * (r_chosen_P + r_rejected_P) ** 2
    n_pairs = w_P.sum()
    stats = {
        "loss": ((loss_P * w_P).sum(), n_pairs),
        "accuracy": (((diff_P > 0).astype(jnp.float32) * w_P).sum(), n_pairs),
        "reward_chosen": ((r_chosen_P * w_P).sum(), n_pairs),
        "reward_rejected": ((r_rejected_P * w_P).sum(), n_pairs),
        "reward_margin": ((diff_P * w_P).sum(), n_pairs),
        "pairs_per_batch": (n_pairs, jnp.float32(1.0)),
    }
    return (loss_P * w_P).sum(), n_pairs, stats


def normalisation(scores: np.ndarray) -> tuple[float, float]:
    """Gain and bias so that `gain * scores + bias` has mean 0 and std 1 (OpenAI's RM
    normalisation, computed on reference responses or on samples of the initial policy)."""
    scores = np.asarray(scores, np.float64)
    if scores.size < 2:
        raise ValueError(f"reward normalisation needs at least 2 scores, got {scores.size}")
    std = scores.std()
    if not np.isfinite(std) or std < 1e-8:
        raise ValueError(f"reward normalisation: scores have std {std}; the RM gives a constant reward")
    gain = 1.0 / std
    return float(gain), float(-scores.mean() * gain)
