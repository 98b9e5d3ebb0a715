"""Direct preference optimisation (DPO, Rafailov et al. 2023) and IPO (Azar et al. 2023).

DPO fits the policy to preference pairs directly: a response's implicit reward is
β·log(π/π_ref), and the loss is the pairwise loss on the difference of implicit rewards,
so there is no reward model and no sampling. Everything here is a pure, jit-able function
of summed sequence log-probs (policy and frozen reference, one value per pair); losses
return (sum, weight) like `reward.rm_loss`, so accumulation gives exact weighted means.
Padding (pairs of weight 0, tokens of mask 0) may hold nan/inf: it is read only through
`jnp.where`, and values and gradients stay finite.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

__all__ = ["DPO_LOSS_TYPES", "dpo_loss", "pair_weights", "sequence_logprobs"]

DPO_LOSS_TYPES = ("sigmoid", "ipo")
"""`dpo_loss` loss types by config name."""


def _float(x: Array) -> Array:
    """Promotes low-precision floats (bf16/f16) and ints to at least float32."""
    x = jnp.asarray(x)
    return x.astype(jnp.result_type(x.dtype, jnp.float32))


def sequence_logprobs(logp_BxT: Array, mask_BxT: Array) -> Array:
    """log π(response | prompt) per row [B]: the sum of per-token log-probs over the mask.

    Args:
      logp_BxT: [B, T] log-probs of the response tokens (e.g. `sft.token_logprobs`);
        entries where the mask is 0 may be anything, nan included.
      mask_BxT: [B, T] 0/1, 1 on the response tokens whose prediction counts.

    Returns:
      [B] float32 (or wider) sums; 0 for a row with no response token.
    """
    m = jnp.asarray(mask_BxT).astype(bool)
    return jnp.sum(jnp.where(m, _float(logp_BxT), 0.0), axis=-1)


def _check_args(beta, loss_type: str, label_smoothing: float) -> None:
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {list(DPO_LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to loss_type='sigmoid' only, not {loss_type!r}")


def _pair_losses(h_P: Array, beta: float, loss_type: str, label_smoothing: float) -> Array:
    """Per-pair loss [P] from h = (πc − rc) − (πr − rr); see `dpo_loss`."""
    if loss_type == "ipo":
        return jnp.square(h_P - 1.0 / (2.0 * beta))
    loss_P = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h_P)
    if label_smoothing:
        loss_P = loss_P - label_smoothing * jax.nn.log_sigmoid(-beta * h_P)
    return loss_P


def dpo_loss(
    policy_chosen_P: Array,
    policy_rejected_P: Array,
    ref_chosen_P: Array,
    ref_rejected_P: Array,
    weight_P: Array,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Array, Array, dict[str, tuple[Array, Array]]]:
    """Weighted DPO / IPO loss over P preference pairs, as (loss_sum, weight_sum, stats).

    With h = (πc − rc) − (πr − rr), the policy's log-ratio gain of chosen over rejected:
      "sigmoid" (DPO): −log σ(βh); with label smoothing ε (conservative DPO, for labels
        flipped with probability ε): −(1 − ε)·log σ(βh) − ε·log σ(−βh).
      "ipo": (h − 1/(2β))², which regresses the gap to 1/(2β) instead of driving it to
        infinity on deterministic preferences as DPO can.

    Args:
      policy_chosen_P, policy_rejected_P: [P] summed log-probs of each pair's responses
        under the policy being trained (`sequence_logprobs`).
      ref_chosen_P, ref_rejected_P: [P] the same under the frozen reference policy.
      weight_P: [P] per-pair weight: 1 for a plain pair, 0 for a padding pair (its inputs
        may be nan), `pair_weights` for per-prompt weighting of K-wise rankings.
      beta: KL strength β > 0 (a Python number, fixed for a run); small β lets the policy
        move far from the reference.
      loss_type: one of `DPO_LOSS_TYPES`; picked at trace time.
      label_smoothing: ε in [0, 0.5), "sigmoid" only.

    Returns:
      (loss_sum, weight_sum, stats): Σ w·loss, Σ w, and {name: (Σ w·x, Σ w)} for
      loss, rewards/chosen = β(πc − rc), rewards/rejected = β(πr − rr), rewards/margins,
      rewards/accuracy (chosen's implicit reward higher; an exact tie counts 0.5),
      rewards/ties (fraction of exact ties, e.g. pairs where policy = reference),
      logps/chosen, logps/rejected and kl_proxy = ((πc − rc) + (πr − rr)) / 2, the mean
      policy-vs-reference log-ratio on the data (a rough KL(π‖π_ref) signal, not a KL).
    """
    _check_args(beta, loss_type, label_smoothing)
    w_P = _float(weight_P)
    real_P = w_P != 0
    # Zero the padding pairs' inputs first, so nan there reaches neither values nor grads.
    pc, pr, rc, rr = (
        jnp.where(real_P, _float(x), 0.0)
        for x in (policy_chosen_P, policy_rejected_P, ref_chosen_P, ref_rejected_P)
    )
    chosen_logratio_P = pc - rc
    rejected_logratio_P = pr - rr
    loss_P = _pair_losses(chosen_logratio_P - rejected_logratio_P, beta, loss_type, label_smoothing)
    reward_chosen_P = beta * chosen_logratio_P
    reward_rejected_P = beta * rejected_logratio_P
    tie_P = (reward_chosen_P == reward_rejected_P).astype(w_P.dtype)
    win_P = (reward_chosen_P > reward_rejected_P).astype(w_P.dtype)
    weight_sum = jnp.sum(w_P)

    def weighted(x_P):
        return jnp.sum(w_P * x_P), weight_sum

    stats = {
        "loss": weighted(loss_P),
        "rewards/chosen": weighted(reward_chosen_P),
        "rewards/rejected": weighted(reward_rejected_P),
        "rewards/margins": weighted(reward_chosen_P - reward_rejected_P),
        "rewards/accuracy": weighted(win_P + 0.5 * tie_P),
        "rewards/ties": weighted(tie_P),
        "logps/chosen": weighted(pc),
        "logps/rejected": weighted(pr),
        "kl_proxy": weighted(0.5 * (chosen_logratio_P + rejected_logratio_P)),
    }
    return stats["loss"][0], weight_sum, stats


def pair_weights(group_sizes) -> np.ndarray:
    """Weights 1/C(K,2) for the C(K,2) pairs of each K-response ranking, group after group.

    InstructGPT's per-prompt weighting: each prompt counts once however many responses were
    ranked, since its pairs are strongly correlated and counting them separately overfits.
    Pairs of a group are assumed contiguous, in the order the batch lists them.

    Args:
      group_sizes: number of ranked responses K >= 2 of each prompt.

    Returns:
      float32 [Σ C(K,2)] weights; each group's weights sum to 1.
    """
    weights = []
    for k in group_sizes:
        if isinstance(k, (bool, np.bool_)) or int(k) != k or k < 2:
            raise ValueError(f"group_sizes must be integers >= 2, got {k!r}")
        n_pairs = math.comb(int(k), 2)
        weights.append(np.full(n_pairs, 1.0 / n_pairs, np.float32))
    return np.concatenate(weights) if weights else np.zeros(0, np.float32)
