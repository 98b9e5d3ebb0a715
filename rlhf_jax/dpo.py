"""Direct preference optimisation (DPO, Rafailov et al. 2023) and IPO (Azar et al. 2023).

DPO fits the policy to preference pairs directly: a response's implicit reward is
β·log(π/π_ref), and the loss is the pairwise loss on the difference of implicit rewards,
so there is no reward model and no sampling. Everything here is a pure, jit-able function
of summed sequence log-probs (policy and frozen reference, one value per pair); losses
return (sum, weight) like `reward.rm_loss`, so accumulation gives exact weighted means.
Padding (pairs of weight 0, tokens of mask 0) may hold nan/inf: it is read only through
`jnp.where`, and values and gradients stay finite.

The `dpo` stage of the training loop (`train/loop.py`) uses the second half of this module:
`stage_loss` over preference batches (with `response_mask` and `pair_weight`), and
`setup_reference`, which either puts the frozen reference's arrays in the train state under
`REFERENCE_PREFIX` (log-probs on the fly, one extra forward pass per step) or computes its
log-probs once before training and stores them with the data (`ref_logps`), after which the
reference is dropped. With LoRA adapters (`models/lora.py`) the reference is the policy with
its adapters off: the starting policy needs no arrays of its own.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from rlhf_jax import sft
from rlhf_jax.data import Dataset, pack_groups
from rlhf_jax.data.batching import PAIR_WEIGHTINGS, packed_preference_batch, pad_rows, preference_batch
from rlhf_jax.models import ModelDef, load_frozen, lora
from rlhf_jax.train.step import ReadsFrozen

Array = jax.Array

__all__ = ["DPO_LOSS_TYPES", "REFERENCE_PREFIX", "attach_reference_logps", "batch_kwargs", "dpo_loss",
           "hyperparams", "loss_fn", "pair_weights", "reference_model", "response_logprobs", "sequence_logprobs",
           "setup_reference", "stage_loss"]

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


# ----------------------------------------------------------------------------- the dpo stage
REFERENCE_PREFIX = "reference/"
"""Frozen-dict prefix of the reference's arrays (dotted parameter names never hold '/')."""


def hyperparams(cfg) -> dict:
    """`cfg.dpo`'s loss settings, each checked with an error naming its field."""
    d = cfg.get("dpo")
    if d is None:
        raise ValueError("stage='dpo' needs a dpo section: start from configs/dpo.py")
    if d.loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo.loss_type={d.loss_type!r} is not one of {list(DPO_LOSS_TYPES)}")
    if not float(d.beta) > 0:
        raise ValueError(f"dpo.beta must be > 0, got {d.beta}")
    if not 0.0 <= float(d.label_smoothing) < 0.5 or (d.label_smoothing and d.loss_type != "sigmoid"):
        raise ValueError(f"dpo.label_smoothing must be in [0, 0.5) and 0 unless loss_type='sigmoid', "
                         f"got {d.label_smoothing} with loss_type={d.loss_type!r}")
    return dict(beta=float(d.beta), loss_type=str(d.loss_type), label_smoothing=float(d.label_smoothing))


def batch_kwargs(cfg) -> dict:
    """`data.batches` arguments of a DPO micro-batch: RM-style groups plus the DPO keys."""
    d = cfg.dpo
    if d.pair_weighting not in PAIR_WEIGHTINGS:
        raise ValueError(f"dpo.pair_weighting={d.pair_weighting!r} is not one of {list(PAIR_WEIGHTINGS)}")
    return dict(max_responses=int(d.max_responses), max_pairs=int(d.max_pairs), response_mask=True,
                pair_weighting=d.pair_weighting, pad_to_multiple_of=int(cfg.data.get("pad_to_multiple_of", 0)),
                pack=bool(cfg.data.get("packing", False)), row_multiple=int(cfg.data.get("packed_rows_multiple", 1)))


def response_logprobs(model, batch: dict) -> Array:
    """log π(response | prompt) of each of the batch's N responses [N]: token log-probs
    summed over `response_mask`.

    batch: input_ids, attention_mask int32[R, T], response_mask float32[R, T] (position t
    predicts token t + 1, so the mask is read from t = 1); one response per row (R = N), or
    packed rows (`data.packed_preference_batch`: `segment_ids`, and `response_idx` [R, T]
    naming each token's response, whose sums are then segment sums). Logits are computed
    only at the response tokens (`sft.selected_token_logprobs`)."""
    ids_RT = batch["input_ids"]
    h_RTD, _ = model.hidden(ids_RT, batch["attention_mask"], segment_ids_BT=batch.get("segment_ids"))
    weight_RT = batch["response_mask"][:, 1:]
    logp_RT = sft.selected_token_logprobs(model, h_RTD[:, :-1], ids_RT[:, 1:], weight_RT).logp
    if "response_idx" not in batch:
        return sequence_logprobs(logp_RT, weight_RT)
    # A response token is never its segment's first, so the target at t + 1 is in t's segment.
    read_RT = weight_RT > 0
    owner_RT = jnp.where(read_RT, batch["response_idx"][:, 1:], 0)
    return jax.ops.segment_sum(jnp.where(read_RT, _float(logp_RT), 0.0).reshape(-1), owner_RT.reshape(-1),
                               num_segments=batch["response_row"].shape[0])


def reference_model(model, frozen: dict):
    """The policy's structure with the reference's values: every `REFERENCE_PREFIX` entry of
    `frozen` replaces the variable of that name (only the trainable ones when the reference is
    the starting policy, whose frozen layers the policy still holds), LoRA adapters off (with
    LoRA the starting policy is the frozen base itself: no entries at all)."""
    ref = {k[len(REFERENCE_PREFIX):]: v for k, v in frozen.items() if k.startswith(REFERENCE_PREFIX)}
    if not ref and not lora.has_adapters(model):
        raise ValueError("no reference parameters in the state and no precomputed ref_logps in the batch")
    model_def, _, values = ModelDef.split(model, None)
    return lora.base_model(model_def.merge(values, ref))


def stage_loss(model, batch: dict, frozen: dict, *, beta: float, loss_type: str,
               label_smoothing: float) -> tuple[Array, Array, dict]:
    """`dpo_loss` of a preference batch: (Σ w·loss, Σ w, stats), w = pair_weight · pair_mask.

    The reference's log-probs are the batch's `ref_logps` [N] when precomputed, else one
    forward pass of `reference_model(model, frozen)`; no gradient flows through them."""
    logp_N = response_logprobs(model, batch)
    if "ref_logps" in batch:
        ref_N = batch["ref_logps"]
    else:
        ref_N = response_logprobs(reference_model(model, frozen), batch)
    ref_N = jax.lax.stop_gradient(ref_N)
    c_P, r_P = batch["chosen_idx"], batch["rejected_idx"]
    w_P = batch["pair_weight"] * batch["pair_mask"]
    loss_sum, weight_sum, stats = dpo_loss(logp_N[c_P], logp_N[r_P], ref_N[c_P], ref_N[r_P], w_P, beta=beta,
                                           loss_type=loss_type, label_smoothing=label_smoothing)
    stats["pairs_per_batch"] = (batch["pair_mask"].sum(), jnp.float32(1.0))
    return loss_sum, weight_sum, stats


def loss_fn(cfg) -> ReadsFrozen:
    """The stage's loss(model, micro_batch, frozen) with `cfg.dpo`'s settings."""
    return ReadsFrozen(functools.partial(stage_loss, **hyperparams(cfg)))


def attach_reference_logps(dataset: Dataset, score: Callable[[dict], np.ndarray], max_responses: int,
                           max_pairs: int, *, packed_rows_multiple: int = 0) -> Dataset:
    """The dataset with every group's `ref_logps` [K] set from `score(batch) -> [N]`, run over
    batches of whole groups in dataset order (so response n of a batch maps back to one
    response). `packed_rows_multiple` > 0: the batches' responses packed several to a row, in
    a multiple of that many rows (`data.packed_preference_batch`), as the stage trains on them."""
    sizes = [(len(g.responses), len(g.chosen)) for g in dataset.examples]
    groups = list(dataset.examples)
    for plan in pack_groups(sizes, range(len(groups)), max_responses, max_pairs):
        if packed_rows_multiple:
            batch = packed_preference_batch(dataset, plan, max_responses, max_pairs, response_mask=True)
            rows = batch["input_ids"].shape[0]
            batch = pad_rows(batch, -(-rows // packed_rows_multiple) * packed_rows_multiple, dataset.pad_id)
        else:
            batch = preference_batch(dataset, plan, max_responses, max_pairs, response_mask=True)
        logp_N = np.asarray(score(batch))
        row = 0
        for g in plan:
            k = len(groups[g].responses)
            groups[g] = dataclasses.replace(groups[g], ref_logps=logp_N[row:row + k].astype(np.float32))
            row += k
    return dataclasses.replace(dataset, examples=tuple(groups))


def _logps_program(model_def: ModelDef, values: dict, batch: dict) -> Array:
    return response_logprobs(lora.base_model(model_def.merge(values)), batch)


def _scorer(rt, model_def: ModelDef, values: dict) -> Callable[[dict], np.ndarray]:
    """score(global numpy batch) -> [N] numpy: each process feeds its rows, all get all."""
    program = jax.jit(functools.partial(_logps_program, model_def), out_shardings=NamedSharding(rt.mesh, P()))
    n, i = jax.process_count(), jax.process_index()

    def score(batch: dict) -> np.ndarray:
        keys = [k for k in ("input_ids", "attention_mask", "response_mask", "segment_ids", "response_idx",
                            "response_row") if k in batch]
        local = [batch[k][i * len(batch[k]) // n:(i + 1) * len(batch[k]) // n] for k in keys]
        return np.asarray(program(values, dict(zip(keys, rt.to_global(local)))))

    return score


def _load_reference(cfg, rt, model_def: ModelDef) -> tuple[ModelDef, dict]:
    """`dpo.reference_path`'s model, which must have the policy's parameter names and shapes."""
    ref_def, values, _ = load_frozen(cfg.dpo.reference_path, heads=("lm",), tokenizer=cfg.tokenizer, mesh=rt.mesh,
                                     rules=rt.rules, seed=cfg.seed)
    shapes = dict(zip(model_def.names, (tuple(v.get_value().shape) for _, v in model_def.variables)))
    if shapes != {n: tuple(values[n].shape) for n in ref_def.names}:
        raise ValueError(f"dpo.reference_path={cfg.dpo.reference_path!r}: its parameters differ in names or "
                         "shapes from the policy's; the reference must be the same architecture")
    return ref_def, values


def setup_reference(cfg, rt, model_def: ModelDef, params: dict, frozen: dict, train_data: Dataset,
                    eval_data: Dataset | None) -> tuple[dict, Dataset, Dataset | None]:
    """The frozen reference (`dpo.reference_path`, or '' = the starting policy), either added
    to `frozen` under `REFERENCE_PREFIX` or, with `dpo.precompute_reference`, scored once over
    the train and eval data (stored as the groups' `ref_logps`) and dropped."""
    d = cfg.dpo
    hyperparams(cfg)  # fail on a bad field before the reference pass, not after it
    if not isinstance(d.precompute_reference, bool):
        raise ValueError(f"dpo.precompute_reference must be True or False, got {d.precompute_reference!r}")
    if d.reference_path:
        ref_def, ref_values = _load_reference(cfg, rt, model_def)
    else:
        # The starting policy: only its trainable arrays will move, so only they are copied.
        ref_def, ref_values = model_def, {**frozen, **params}
    if not d.precompute_reference:
        # LoRA: the starting policy is the policy with its adapters off; nothing is copied.
        moving = ref_values if d.reference_path else {} if lora.adapted(model_def.names) else params
        copies = {REFERENCE_PREFIX + k: jnp.copy(v) for k, v in moving.items()}  # never aliased by donation
        return {**frozen, **copies}, train_data, eval_data
    score = _scorer(rt, ref_def, ref_values)
    sizes = (int(d.max_responses), int(d.max_pairs))
    kw = batch_kwargs(cfg)
    # Packed as the stage packs its batches (one compile per row count).
    multiple = rt.packed_rows_multiple(kw["row_multiple"]) if kw["pack"] else 0
    train_data = attach_reference_logps(train_data, score, *sizes, packed_rows_multiple=multiple)
    eval_data = None if eval_data is None else attach_reference_logps(eval_data, score, *sizes,
                                                                      packed_rows_multiple=multiple)
    return frozen, train_data, eval_data
