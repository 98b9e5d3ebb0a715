"""Critic-free advantage estimators over groups of k samples per prompt (RLOO, GRPO).

Instead of a learned value function, the baseline for a sample is built from the other
samples of the same prompt, so the policy-gradient step needs no critic. Rows are ordered
prompt-major: rows [g·k, (g+1)·k) are the k samples of prompt g. Scores are one number per
sequence; `sequence_advantages_to_tokens` spreads them over the response for
`core.policy_loss`. PPO's GAE stays in `core`. All functions are jit-able (`k` static).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from rlhf_jax.ppo import core

Array = jax.Array

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "best_of_n_kl",
    "grpo_advantages",
    "k3_kl_loss",
    "rloo_advantages",
    "sequence_advantages_to_tokens",
]


def _groups(scores_B: Array, k: int) -> Array:
    """[B] -> [G, k] with each row shifted by its first sample (see below), after checks.

    Every estimator here is invariant to adding a constant to a group, so subtracting the
    group's first score changes nothing mathematically; it makes a group of equal scores
    exactly 0, so its advantages are exactly 0 (a float mean of equal values need not
    equal them), and keeps precision when scores carry a large common offset.
    """
    scores_B = core._float(scores_B)
    if scores_B.ndim != 1:
        raise ValueError(f"scores_B must be 1-D [B], got shape {scores_B.shape}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"k (samples per prompt) must be an int >= 2, got {k!r}")
    if scores_B.shape[0] % k:
        raise ValueError(f"k={k} does not divide the batch size B={scores_B.shape[0]}")
    x_GxK = scores_B.reshape(-1, k)
    return x_GxK - x_GxK[:, :1]


def rloo_advantages(scores_B: Array, k: int) -> Array:
    """REINFORCE leave-one-out: each score minus the mean of the other k − 1 of its prompt.

    The baseline excludes the sample itself, so it is independent of that sample and the
    gradient estimate stays unbiased (Kool et al. 2019; Ahmadian et al. 2024).

    Args:
      scores_B: [B] sequence scores, B = G·k rows ordered prompt-major.
      k: samples per prompt (a Python int >= 2 dividing B; static under jit).

    Returns:
      [B] advantages; exactly 0 for a group of equal scores.
    """
    x_GxK = _groups(scores_B, k)
    others_mean_GxK = (jnp.sum(x_GxK, axis=1, keepdims=True) - x_GxK) / (k - 1)
    return (x_GxK - others_mean_GxK).reshape(-1)


def grpo_advantages(
    scores_B: Array, k: int, *, scale_by_std: bool = True, eps: float = 1e-4
) -> Array:
    """GRPO group-relative advantages: (score − group mean) / (group std + eps).

    The std is the sample (unbiased, ddof = 1) std of the k scores: that is what GRPO
    implementations use (PyTorch's default `std`), so advantage scales match theirs; with
    k = 2 it gives ±1/√2 rather than ±1. `scale_by_std=False` only subtracts the mean
    (Dr. GRPO, Liu et al. 2025): dividing by the std up-weights prompts that are almost
    always solved or failed, a difficulty bias.

    Args:
      scores_B: [B] sequence scores, B = G·k rows ordered prompt-major.
      k: samples per prompt (a Python int >= 2 dividing B; static under jit).
      scale_by_std: divide by the group std.
      eps: added to the std, bounding the scale of nearly constant groups.

    Returns:
      [B] advantages; exactly 0 (not nan) for a group of equal scores.
    """
    x_GxK = _groups(scores_B, k)
    centred_GxK = x_GxK - jnp.mean(x_GxK, axis=1, keepdims=True)
    if not scale_by_std:
        return centred_GxK.reshape(-1)
    std_Gx1 = jnp.sqrt(jnp.sum(jnp.square(centred_GxK), axis=1, keepdims=True) / (k - 1))
    return (centred_GxK / (std_Gx1 + eps)).reshape(-1)


def sequence_advantages_to_tokens(adv_B: Array, mask_BxT: Array) -> Array:
    """Gives every real response token its sequence's advantage, for `core.policy_loss`.

    Args:
      adv_B: [B] one advantage per sequence.
      mask_BxT: [B, T] 0/1 response mask.

    Returns:
      [B, T]: adv_B[b] where mask is 1, 0 on padding.
    """
    m = jnp.asarray(mask_BxT).astype(bool)
    return jnp.where(m, core._float(adv_B)[:, None], 0.0)


def k3_kl_loss(logp_BxT: Array, ref_logp_BxT: Array, mask_BxT: Array) -> Array:
    """GRPO's KL penalty: the k3 estimate of KL(π‖π_ref), averaged over all real tokens.

    Added to the loss (times a coefficient) rather than folded into the reward as PPO
    does; k3 = exp(ref − logp) − (ref − logp) − 1 is >= 0 and unbiased on policy samples.
    The mean is global over every real token of the batch (token-level, as in `core`).

    Args:
      logp_BxT: [B, T] log-probs of the sampled tokens under the policy being trained.
      ref_logp_BxT: [B, T] the same under the reference policy.
      mask_BxT: [B, T] 0/1 response mask; padding may hold nan/inf in either input.

    Returns:
      Scalar; 0 when no token is real. Gradients stay finite with nan in padding.
    """
    m = jnp.asarray(mask_BxT).astype(bool)
    # Zero padding before the exp, so nan there cannot reach the gradient either.
    logp = jnp.where(m, core._float(logp_BxT), 0.0)
    ref_logp = jnp.where(m, core._float(ref_logp_BxT), 0.0)
    return core.masked_mean(core.kl_k3(logp, ref_logp), m)


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n ‖ base policy) = log n − (n − 1)/n, in nats (Stiennon et al. 2020).

    The KL budget that best-of-n sampling spends, to compare RL policies with it at equal
    KL. Exact when every outcome has vanishing probability (continuous rewards, long
    sequences); for discrete outcomes with sizeable mass it is an upper bound (Beirami et
    al. 2024). n = 1 gives 0.
    """
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    return math.log(n) - (n - 1) / n


ADVANTAGE_ESTIMATORS: dict[str, Callable[[Array, int], Array]] = {
    "rloo": rloo_advantages,
    "grpo": grpo_advantages,
}
"""Critic-free advantage estimators by config name: `fn(scores_B, k) -> adv_B`."""
