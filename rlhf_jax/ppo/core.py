"""PPO pieces as small pure functions of arrays (jit-able, no hidden state).

Shapes: B batch, T response length, V vocabulary. Masks are 0/1, 1 on real response tokens
up to and including the stop token; masked entries are read only through `jnp.where`, so
padding may hold nan or inf. Reductions are over the whole batch: under `jax.jit` with a
sharded batch XLA all-reduces them, so whitening and losses are global, not per device.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = [
    "KL_ESTIMATORS",
    "KLController",
    "KLPenalizedRewards",
    "adaptive_kl_update",
    "compute_rewards",
    "entropy_from_logits",
    "explained_variance",
    "final_scores",
    "gae",
    "kl_k1",
    "kl_k3",
    "last_token_onehot",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "value_loss",
]


def _float(x: Array) -> Array:
    """Promotes low-precision floats (bf16/f16) and ints to at least float32."""
    x = jnp.asarray(x)
    return x.astype(jnp.result_type(x.dtype, jnp.float32))


# --------------------------------------------------------------------------
# Masked statistics.
# --------------------------------------------------------------------------


def masked_mean(x: Array, mask: Array, axis: int | tuple[int, ...] | None = None) -> Array:
    """Mean of `x` where `mask` (broadcastable 0/1) is 1, over `axis` (None: everything,
    the global batch mean); 0 rather than nan where nothing is selected.
    """
    x = _float(x)
    m = jnp.broadcast_to(jnp.asarray(mask).astype(bool), x.shape)
    total = jnp.sum(jnp.where(m, x, 0.0), axis=axis)
    count = jnp.sum(m, axis=axis).astype(x.dtype)
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)


def masked_var(x: Array, mask: Array, unbiased: bool = True) -> Array:
    """Variance of `x` over the entries where `mask` is 1 (a global scalar). `unbiased`
    applies Bessel's n/(n-1), as TRL does, unless fewer than two entries are selected.
    """
    x = _float(x)
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    if unbiased:
        m = jnp.broadcast_to(jnp.asarray(mask).astype(bool), x.shape)
        n = jnp.sum(m).astype(x.dtype)
        var = jnp.where(n > 1, var * n / jnp.maximum(n - 1.0, 1.0), var)
    return var


def masked_whiten(
    x: Array, mask: Array, shift_mean: bool = True, eps: float = 1e-8
) -> Array:
    """`(x - mean) / sqrt(var + eps)` over the masked entries of the whole batch, 0 on
    padding; `shift_mean=False` adds the mean back (OpenAI's reward whitening: scale only).
    """
    x = _float(x)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    m = jnp.broadcast_to(jnp.asarray(mask).astype(bool), x.shape)
    return jnp.where(m, out, 0.0)


# --------------------------------------------------------------------------
# KL estimators and the KL-penalised reward.
# --------------------------------------------------------------------------


def kl_k1(logp_BxT: Array, ref_logp_BxT: Array) -> Array:
    """Per-token KL estimate k1 = logp - ref_logp (OpenAI, TRL default).

    Unbiased for KL(policy || ref) on tokens sampled from the policy, but
    negative on tokens the reference prefers. Shapes [B, T] -> [B, T].
    """
    return _float(logp_BxT) - _float(ref_logp_BxT)


def kl_k3(logp_BxT: Array, ref_logp_BxT: Array) -> Array:
    """Per-token KL estimate k3 = (r - 1) - log r, r = exp(ref_logp - logp).

    Unbiased, lower variance than k1, and >= 0 everywhere (since
    e^u - 1 >= u). Computed with `expm1` so small differences stay accurate.
    Shapes [B, T] -> [B, T].
    """
    log_r = _float(ref_logp_BxT) - _float(logp_BxT)
    return jnp.expm1(log_r) - log_r


KL_ESTIMATORS: dict[str, Callable[[Array, Array], Array]] = {
    "k1": kl_k1,
    "k3": kl_k3,
}
"""Per-token KL estimators by config name."""


class KLPenalizedRewards(NamedTuple):
    """Output of `compute_rewards`; every field is [B, T] and 0 where mask is 0."""

    rewards: Array  # -beta * kl, plus the score at the last real token
    kl: Array  # the estimator used in the penalty
    kl_k1: Array  # both estimators, for logging
    kl_k3: Array


def last_token_onehot(mask_BxT: Array) -> Array:
    """One-hot [B, T] at the last position where `mask` is 1 (all 0 if none)."""
    m = jnp.asarray(mask_BxT).astype(bool)
    t = m.shape[-1]
    # Index of the last True: T - 1 - (first True in the reversed row).
    last = t - 1 - jnp.argmax(m[..., ::-1], axis=-1)
    onehot = jnp.arange(t) == last[..., None]
    return onehot & jnp.any(m, axis=-1, keepdims=True)


def compute_rewards(
    scores_B: Array,
    logp_BxT: Array,
    ref_logp_BxT: Array,
    mask_BxT: Array,
    beta: float | Array,
    kl_estimator: str = "k1",
) -> KLPenalizedRewards:
    """Per-token rewards [B, T]: −β·KL_t, plus `scores_B` at each row's last real token.

    `logp_BxT` are the sampling policy's log-probs (at the sampling temperature), `ref_logp_BxT`
    the reference's; `kl_estimator` ('k1' or 'k3') is the one penalised, both are returned
    for logging. Every field of the result is 0 where the mask is 0.
    """
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(
            f"kl_estimator={kl_estimator!r} is not one of {sorted(KL_ESTIMATORS)}"
        )
    m = jnp.asarray(mask_BxT).astype(bool)
    k1 = jnp.where(m, kl_k1(logp_BxT, ref_logp_BxT), 0.0)
    k3 = jnp.where(m, kl_k3(logp_BxT, ref_logp_BxT), 0.0)
    kl = {"k1": k1, "k3": k3}[kl_estimator]
    scores_B = _float(scores_B)
    rewards = -beta * kl + jnp.where(last_token_onehot(m), scores_B[:, None], 0.0)
    return KLPenalizedRewards(rewards=rewards, kl=kl, kl_k1=k1, kl_k3=k3)


def final_scores(
    rm_scores_B: Array,
    function_scores_B: Array,
    stopped_B: Array,
    rm_weight: float = 1.0,
    missing_eos_penalty: float | None = None,
) -> Array:
    """The score each response is rewarded with at its last token [B], float32.

    `rm_weight · RM score + weighted reward functions`; with `missing_eos_penalty` set, a
    response that never stopped scores that value instead (OpenAI's choice; TRL subtracts).
    """
    total = rm_weight * _float(rm_scores_B) + _float(function_scores_B)
    if missing_eos_penalty is not None:
        total = jnp.where(jnp.asarray(stopped_B).astype(bool), total, missing_eos_penalty)
    return total.astype(jnp.float32)


# --------------------------------------------------------------------------
# Advantages.
# --------------------------------------------------------------------------


def gae(
    rewards_BxT: Array,
    values_BxT: Array,
    mask_BxT: Array,
    gamma: float | Array = 1.0,
    lam: float | Array = 0.95,
) -> tuple[Array, Array]:
    """Generalised advantage estimation right to left (`lax.scan(reverse=True)`).

    Past the last real token values and rewards are 0 (the step after it is terminal).
    Returns (advantages [B, T], returns = advantages + values), both 0 on padding and not
    whitened.
    """
    m = jnp.asarray(mask_BxT).astype(bool)
    r = jnp.where(m, _float(rewards_BxT), 0.0)
    v = jnp.where(m, _float(values_BxT), 0.0)
    next_v = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)
    delta_BxT = r + gamma * next_v - v

    def step(next_adv_B, xs):
        delta_B, m_B = xs
        adv_B = jnp.where(m_B, delta_B + gamma * lam * next_adv_B, 0.0)
        return adv_B, adv_B

    _, adv_TxB = jax.lax.scan(
        step, jnp.zeros_like(delta_BxT[:, 0]), (delta_BxT.T, m.T), reverse=True
    )
    adv_BxT = adv_TxB.T
    returns_BxT = jnp.where(m, adv_BxT + v, 0.0)
    return adv_BxT, returns_BxT


# --------------------------------------------------------------------------
# Losses and diagnostics.
# --------------------------------------------------------------------------


def policy_loss(
    logp_new_BxT: Array,
    logp_old_BxT: Array,
    advantages_BxT: Array,
    mask_BxT: Array,
    cliprange: float | Array = 0.2,
) -> tuple[Array, dict[str, Array]]:
    """PPO's clipped surrogate, mean over every real token of the batch:
    max(−A·ratio, −A·clip(ratio, 1 ± c)), ratio = exp(logp_new − logp_old).

    Returns (loss, stats): `clipfrac` (share of tokens where the clipped term wins),
    `approx_kl` (½·mean((logp_new − logp_old)²), as TRL), `ratio_mean`.
    """
    m = jnp.asarray(mask_BxT).astype(bool)
    log_ratio = jnp.where(m, _float(logp_new_BxT) - _float(logp_old_BxT), 0.0)
    ratio = jnp.exp(log_ratio)
    adv = jnp.where(m, _float(advantages_BxT), 0.0)
    losses_unclipped = -adv * ratio
    losses_clipped = -adv * jnp.clip(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(jnp.maximum(losses_unclipped, losses_clipped), m)
    stats = {
        "clipfrac": masked_mean(losses_clipped > losses_unclipped, m),
        "approx_kl": 0.5 * masked_mean(jnp.square(log_ratio), m),
        "ratio_mean": masked_mean(ratio, m),
    }
    return loss, stats


def value_loss(
    values_new_BxT: Array,
    values_old_BxT: Array,
    returns_BxT: Array,
    mask_BxT: Array,
    cliprange_value: float | Array = 0.2,
) -> tuple[Array, dict[str, Array]]:
    """Clipped value loss ½·mean(max((V − R)², (clip(V, V_old ± c) − R)²)) over real tokens;
    stats `vf_clipfrac` (share of tokens where the clipped error is the larger).
    """
    m = jnp.asarray(mask_BxT).astype(bool)
    v = jnp.where(m, _float(values_new_BxT), 0.0)
    v_old = jnp.where(m, _float(values_old_BxT), 0.0)
    ret = jnp.where(m, _float(returns_BxT), 0.0)
    v_clipped = jnp.clip(v, v_old - cliprange_value, v_old + cliprange_value)
    err_unclipped = jnp.square(v - ret)
    err_clipped = jnp.square(v_clipped - ret)
    loss = 0.5 * masked_mean(jnp.maximum(err_unclipped, err_clipped), m)
    stats = {"vf_clipfrac": masked_mean(err_clipped > err_unclipped, m)}
    return loss, stats


def entropy_from_logits(logits_BxTxV: Array) -> Array:
    """Per-token entropy [B, T] (float32) of softmax(logits [B, T, V]), from log-softmax so
    large logits do not overflow; −inf logits (masked vocabulary) contribute 0, not nan.
    Apply the sampling temperature first.
    """
    z = jnp.asarray(logits_BxTxV).astype(jnp.float32)
    logp = jax.nn.log_softmax(z, axis=-1)
    p = jnp.exp(logp)
    return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)


def explained_variance(values_BxT: Array, returns_BxT: Array, mask_BxT: Array) -> Array:
    """1 − Var(returns − values) / Var(returns) over real tokens: 1 a perfect critic, 0 a
    constant; nan when the returns have no variance (as cleanrl and TRL).
    """
    var_ret = masked_var(returns_BxT, mask_BxT, unbiased=False)
    var_res = masked_var(_float(returns_BxT) - _float(values_BxT), mask_BxT, unbiased=False)
    return jnp.where(var_ret > 0, 1.0 - var_res / jnp.where(var_ret > 0, var_ret, 1.0), jnp.nan)


# --------------------------------------------------------------------------
# KL coefficient control.
# --------------------------------------------------------------------------


def adaptive_kl_update(
    beta: float | Array,
    kl: float | Array,
    n_steps: int | Array,
    target: float = 6.0,
    horizon: float = 10000.0,
) -> Array:
    """One step of Ziegler et al.'s proportional controller:
    β ← β·(1 + clip(kl/target − 1, ±0.2)·n/horizon), with `kl` the batch mean of the
    sequence-summed KL and `n_steps` the number of samples.
    """
    err = jnp.clip(_float(kl) / target - 1.0, -0.2, 0.2)
    return _float(beta) * (1.0 + err * n_steps / horizon)


@dataclasses.dataclass(frozen=True)
class KLController:
    """The KL coefficient's controller (static, hashable: part of the compiled update; β
    itself lives in the state). `target=None` keeps β fixed; a target makes it adaptive.
    """

    init_beta: float = 0.15
    target: float | None = None
    horizon: float = 10000.0

    def __post_init__(self):
        if not self.init_beta >= 0:
            raise ValueError(f"KLController.init_beta must be >= 0, got {self.init_beta}")
        if self.target is not None and not self.target > 0:
            raise ValueError(f"KLController.target must be > 0 or None, got {self.target}")
        if not self.horizon > 0:
            raise ValueError(f"KLController.horizon must be > 0, got {self.horizon}")

    @property
    def adaptive(self) -> bool:
        return self.target is not None

    def update(self, beta: float | Array, kl: float | Array, n_steps: int | Array) -> Array:
        """New beta after a batch of `n_steps` samples with mean summed KL `kl`."""
        if self.target is None:
            return _float(beta)
        return adaptive_kl_update(beta, kl, n_steps, self.target, self.horizon)
