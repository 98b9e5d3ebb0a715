"""The train state and the generic pure train/eval steps, jitted with explicit shardings.

A step is `step(state, batch) -> (state, metrics)`. The batch carries a leading
gradient-accumulation axis `[A, micro_batch, ...]`; the step scans over it, summing the
loss function's sums and counts, so the update equals the one of a single big batch.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from rlhf_jax.models import ModelDef

# loss_fn(model, micro_batch) -> (objective_sum, normaliser, {metric: (sum, count)})
LossFn = Callable


@dataclasses.dataclass(frozen=True)
class ReadsFrozen:
    """A loss that also reads the state's frozen dict: `fn(model, micro_batch, frozen)`.

    For losses of a second, untrained model held in `TrainState.frozen` (DPO's reference
    under a name prefix): its arrays stay step arguments, sharded and checkpointed with the
    state, rather than constants closed over by the compiled step."""

    fn: Callable

    def __call__(self, model, micro_batch, frozen):
        return self.fn(model, micro_batch, frozen)


def _call_loss(loss_fn: LossFn, model, micro_batch, frozen):
    if isinstance(loss_fn, ReadsFrozen):
        return loss_fn(model, micro_batch, frozen)
    return loss_fn(model, micro_batch)


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar
    params: dict  # trainable parameters {dotted name: array}
    frozen: dict  # frozen parameters and non-trainable variables
    opt_state: optax.OptState


def init_opt_state(tx: optax.GradientTransformation, params, mesh) -> optax.OptState:
    """Optimizer state from a jitted init: moments sharded like their parameters, the rest
    (Adam's count) replicated over the mesh."""
    replicated = NamedSharding(mesh, P())
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    shardings = optax.tree_map_params(tx, lambda _, sh: sh, jax.eval_shape(tx.init, params), param_shardings,
                                      transform_non_params=lambda _: replicated)
    return jax.jit(tx.init, out_shardings=shardings)(params)


def replicated_scalar(value, dtype, mesh) -> jax.Array:
    return jax.device_put(jnp.asarray(value, dtype), NamedSharding(mesh, P()))


def init_state(params: dict, frozen: dict, tx: optax.GradientTransformation, mesh) -> TrainState:
    return TrainState(step=replicated_scalar(0, jnp.int32, mesh), params=params, frozen=frozen,
                      opt_state=init_opt_state(tx, params, mesh))


def _accumulate(model_def: ModelDef, loss_fn: LossFn, state: TrainState, batch: dict, with_grad: bool):
    def one(carry, micro):
        def objective(params):
            model = model_def.merge(params, state.frozen)
            total, norm, stats = _call_loss(loss_fn, model, micro, state.frozen)
            return total, (norm, stats)

        if with_grad:
            (total, (norm, stats)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        else:
            total, (norm, stats) = objective(state.params)
            grads = None
        acc_grads, acc_norm, acc_stats = carry
        if with_grad:
            acc_grads = jax.tree.map(jnp.add, acc_grads, grads)
        acc_stats = {k: (acc_stats[k][0] + s, acc_stats[k][1] + c) for k, (s, c) in stats.items()}
        return (acc_grads, acc_norm + norm, acc_stats), None

    # Shapes of the per-micro-batch metrics, to start the sums at zero.
    micro0 = jax.tree.map(lambda x: x[0], batch)
    stats_shape = jax.eval_shape(lambda p: _call_loss(loss_fn, model_def.merge(p, state.frozen), micro0,
                                                      state.frozen)[2], state.params)
    zero_stats = {k: (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)) for k in stats_shape}
    zero_grads = jax.tree.map(jnp.zeros_like, state.params) if with_grad else None
    (grads, norm, stats), _ = jax.lax.scan(one, (zero_grads, jnp.zeros((), jnp.float32), zero_stats), batch)
    return grads, norm, stats


def means(stats: dict) -> dict:
    """{name: (sum, count)} -> {name: sum / count}."""
    return {k: s / jnp.maximum(c, 1e-9) for k, (s, c) in stats.items()}


def make_train_step(model_def: ModelDef, tx: optax.GradientTransformation, loss_fn: LossFn,
                    schedule: optax.Schedule | None = None, finalize: Callable | None = None):
    """A pure `step(state, batch) -> (state, metrics)`; jit it with `jit_step`."""

    def step(state: TrainState, batch: dict):
        grads, norm, stats = _accumulate(model_def, loss_fn, state, batch, with_grad=True)
        metrics = means(stats)
        # loss_fn returns sums: dividing by the global normaliser gives the exact mean gradient.
        grads = jax.tree.map(lambda g: g / jnp.maximum(norm, 1e-9), grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.global_norm(grads)
        if schedule is not None:
            metrics["learning_rate"] = schedule(state.step)
        if finalize is not None:
            metrics = finalize(metrics)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step


def make_eval_step(model_def: ModelDef, loss_fn: LossFn, finalize: Callable | None = None):
    """A pure `eval_step(state, batch) -> {metric: (sum, count)}`; sum those over the eval
    batches on the host, then divide (see `finish_eval`), so every example weighs the same."""

    def eval_step(state: TrainState, batch: dict):
        return _accumulate(model_def, loss_fn, state, batch, with_grad=False)[2]

    return eval_step


def finish_eval(per_batch: list[dict], finalize: Callable | None = None) -> dict:
    """Combines eval_step outputs of several batches into means."""
    totals: dict = {}
    for stats in per_batch:
        for k, (s, c) in stats.items():
            s0, c0 = totals.get(k, (0.0, 0.0))
            totals[k] = (s0 + float(s), c0 + float(c))
    metrics = {k: s / max(c, 1e-9) for k, (s, c) in totals.items()}
    return finalize(metrics) if finalize is not None else metrics


def state_shardings(state: TrainState):
    """The sharding each state leaf already has (parameters are born sharded; the optimizer
    state follows them through the jitted init)."""
    return jax.tree.map(lambda x: x.sharding, state)


def jit_step(step, state: TrainState, batch_shardings: dict, mesh, donate: bool = True):
    """jax.jit with explicit in/out shardings; the state is donated (updated in place)."""
    s_sh = state_shardings(state)
    replicated = NamedSharding(mesh, P())
    return jax.jit(step, in_shardings=(s_sh, batch_shardings), out_shardings=(s_sh, replicated),
                   donate_argnums=(0,) if donate else ())


def jit_eval_step(eval_step, state: TrainState, batch_shardings: dict, mesh):
    return jax.jit(eval_step, in_shardings=(state_shardings(state), batch_shardings),
                   out_shardings=NamedSharding(mesh, P()))
