"""Device mesh, logical-axis rules, and models created already sharded.

The mesh has three named axes:
  * `data`   — pure data parallelism (parameters replicated);
  * `fsdp`   — data parallelism whose parameters (and optimizer state) are sharded too;
  * `tensor` — tensor (model) parallelism inside a layer.

Every parameter names its dimensions with logical axes ('vocab', 'embed', 'heads', ...); one
rules table maps each logical name to a mesh axis (or None for replicated). Changing the
parallelism is editing that table, never the model. A logical name with no rule is an error,
not a silent replication.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or a tuple of axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("positions", None),
    ("norm", None),
    ("head_out", None),
    ("lora_rank", None),  # the rank dimension of LoRA adapters (models/lora.py): small, replicated
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices; one size may be -1 to take the rest.

    Uses `AxisType.Auto` axes, so shardings propagate through XLA (GSPMD) from the explicit
    in/out shardings of each jitted step.
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices are not divisible by {known} "
                             f"({dict(zip(MESH_AXES, sizes))})")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh: data*fsdp*tensor = {int(np.prod(sizes))} but there are {len(devices)} devices "
                         f"({dict(zip(MESH_AXES, sizes))})")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def mesh_from_config(cfg) -> Mesh:
    """Mesh from a config with fields `data`, `fsdp`, `tensor` and optionally `num_devices`
    (0 = every device; n = the first n, e.g. a single-device baseline)."""
    n = int(cfg.get("num_devices", 0) or 0)
    devices = jax.devices()
    if n:
        if n > len(devices):
            raise ValueError(f"mesh.num_devices={n} but only {len(devices)} devices exist")
        devices = devices[:n]
    return make_mesh(int(cfg.data), int(cfg.fsdp), int(cfg.tensor), devices=devices)


def rules_from_config(rules: Iterable | None) -> dict:
    """Normalises a rules table (list of [name, axis] pairs, or a mapping) into a dict."""
    if rules is None:
        rules = DEFAULT_RULES
    items = rules.items() if isinstance(rules, Mapping) else rules
    out = {}
    for name, axes in items:
        if isinstance(axes, list):
            axes = tuple(axes)
        out[str(name)] = axes
    return out


def logical_to_spec(logical_axes: Sequence[str | None], rules: Mapping, *, where: str = "") -> P:
    """PartitionSpec for a tuple of logical names. Raises on a name the rules do not cover."""
    spec, used = [], set()
    for name in logical_axes:
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ValueError(f"no sharding rule for logical axis {name!r}{where}; "
                             f"rules cover {sorted(rules)}")
        axes = rules[name]
        flat = (axes,) if isinstance(axes, str) else tuple(axes or ())
        if used & set(flat):
            raise ValueError(f"mesh axis used twice in one parameter{where}: logical axes {tuple(logical_axes)}")
        used |= set(flat)
        spec.append(axes)
    return P(*spec)


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: Mapping | None = None) -> NamedSharding:
    """Sharding of a batch array: leading dim over the 'batch' rule's axes, rest replicated."""
    rules = rules_from_config(rules)
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


def batch_shards(mesh: Mesh, rules: Mapping | None = None) -> int:
    """How many shards the batch dimension is split into on `mesh` (batch sizes must divide it)."""
    axes = batch_sharding(mesh, 1, rules).spec[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return int(np.prod([mesh.shape[a] for a in axes]))


def _variable_spec(path, var: nnx.Variable, mesh: Mesh, rules: Mapping) -> NamedSharding:
    where = f" (parameter {'.'.join(map(str, path))})"
    meta = var.get_metadata()
    if "logical_axes" not in meta:
        raise ValueError(f"parameter has no logical_axes metadata{where}")
    axes = meta["logical_axes"]
    shape = var.get_value().shape if hasattr(var, "get_value") else var.value.shape
    if len(axes) != len(shape):
        raise ValueError(f"logical_axes {axes} do not match shape {shape}{where}")
    spec = logical_to_spec(axes, rules, where=where)
    for dim, part in zip(shape, spec):
        if part is None:
            continue
        size = int(np.prod([mesh.shape[a] for a in ((part,) if isinstance(part, str) else part)]))
        if dim % size:
            raise ValueError(f"dimension of size {dim} is not divisible by mesh axes {part} of size {size}{where}; "
                             f"change the rules or the mesh")
    return NamedSharding(mesh, spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Mapping | None = None):
    """A tree of NamedShardings with the structure of `state` (a prefix: one per Variable)."""
    rules = rules_from_config(rules)
    flat = nnx.to_flat_state(state)
    sharded = [(path, _variable_spec(path, var, mesh, rules)) for path, var in flat]
    return nnx.from_flat_state(sharded)


def create_sharded(make_model: Callable[[], nnx.Module], mesh: Mesh, rules: Mapping | None = None, *,
                   values: Mapping[tuple, Any] | None = None, abstract: tuple | None = None) -> nnx.Module:
    """Builds a model whose every parameter is born sharded on `mesh`.

    `jax.eval_shape` gives the abstract parameters (no memory), the rules give their
    shardings, and the initializer is jitted with those out_shardings, so no device ever
    holds a full copy of a sharded parameter. `values` ({path: host array}, a checkpoint's)
    are placed shard by shard instead, and the jitted initializer returns only the other
    variables, so XLA prunes the rest of the initialisation: loading a pretrained model
    compiles no initializer for the weights it replaces (at 30 layers that was ~20 s).
    `abstract`: `nnx.split(nnx.eval_shape(make_model))` when the caller already has it.
    """
    values = values or {}
    graphdef, abstract_state = abstract if abstract is not None else nnx.split(nnx.eval_shape(make_model))
    shardings = dict(nnx.to_flat_state(state_shardings(abstract_state, mesh, rules)))
    abstract_flat = list(nnx.to_flat_state(abstract_state))
    missing = [p for p, _ in abstract_flat if p not in values]

    def init():
        fresh = dict(nnx.to_flat_state(nnx.split(make_model())[1]))
        return [fresh[p] for p in missing]

    fresh = dict(zip(missing, jax.jit(init, out_shardings=[shardings[p] for p in missing])() if missing else []))
    filled = []
    for p, var in abstract_flat:
        if p in fresh:
            filled.append((p, fresh[p]))
            continue
        a = np.asarray(values[p])
        filled.append((p, var.replace(jax.make_array_from_callback(a.shape, shardings[p], lambda i, a=a: a[i]))))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Mapping | None = None) -> nnx.Module:
    """Places an existing model's parameters on the mesh according to the rules."""
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh, rules)
    return nnx.merge(graphdef, jax.device_put(state, shardings))


def param_shardings(model_def, mesh: Mesh, rules: Mapping | None = None) -> dict[str, NamedSharding]:
    """{dotted name: NamedSharding} of every variable of a `ModelDef`: the layout
    `create_sharded` gives the parameters."""
    state = nnx.from_flat_state(list(model_def.variables))
    shardings = state_shardings(state, mesh, rules)
    return {".".join(map(str, path)): s for path, s in nnx.to_flat_state(shardings)}
