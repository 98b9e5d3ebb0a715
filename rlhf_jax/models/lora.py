"""LoRA (Hu et al. 2021): low-rank adapters on the `Linear` layers of a `Transformer`.

An adapted Linear computes y = x W (+ b) + (x A) B · alpha/rank, with A [din, r] drawn like
PEFT's (uniform ±1/sqrt(din)) and B [r, dout] zeros, so the adapted model starts exactly at
the base model. With adapters attached only they (and the reward / value heads, which a
stage creates fresh) train; the base weights stay frozen, sharded as before. A and B carry
the logical axes of the kernel they adapt, with 'lora_rank' (replicated) for the rank.

Config (`model.lora` of every stage config, configs/common.py):
  * `rank`: r; 0 (the default) = no adapters;
  * `alpha`: the adapter's output is scaled by alpha / rank;
  * `targets`: a regex matched (re.search) against the dotted names of the Linear layers
    (`layers.0.attn.q`, `layers.3.mlp.down`, `lm_head`, ...).

The reference policy of DPO and PPO / RLOO / GRPO is the same model with its adapters
switched off (`base_model`): the frozen base arrays are read once, never copied. The model a
stage writes (`save_pretrained`) has its adapters folded into the kernels (`merge_adapters`):
a plain Hugging Face checkpoint.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax import sharding as sharding_lib
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.modeldef import ModelDef, dotted
from rlhf_jax.models.transformer import Linear, Transformer

DEFAULT_TARGETS = r"layers\.\d+\.(attn|mlp)\."  # every attention and MLP projection
ADAPTER_NAMES = r"\.lora\.(a|b)$"  # the adapters' dotted parameter names end so
HEAD_NAMES = r"^(reward_head|value_head)\."  # heads a stage creates fresh: trained with the adapters


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """`model.lora`, checked: see the module docstring."""

    rank: int = 0
    alpha: float = 16.0
    targets: str = DEFAULT_TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_spec(cls, spec: Any) -> "LoraConfig":
        """From a model config's `lora` section (absent = off); one-line errors name the field."""
        lora = spec.get("lora") if hasattr(spec, "get") else None
        if lora is None:
            return cls()
        rank, alpha = lora.get("rank", 0), lora.get("alpha", cls.alpha)
        targets = lora.get("targets", DEFAULT_TARGETS)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"model.lora.rank must be an integer >= 0 (0 = no adapters), got {rank!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"model.lora.alpha must be a number > 0, got {alpha!r}")
        if not isinstance(targets, str):
            raise ValueError(f"model.lora.targets must be a regex string, got {targets!r}")
        try:
            re.compile(targets)
        except re.error as e:
            raise ValueError(f"model.lora.targets={targets!r} is not a valid regex: {e}") from None
        return cls(rank=int(rank), alpha=float(alpha), targets=targets)


class Adapter(nnx.Module):
    """The low-rank update (x A) B · scale of one Linear [din, dout]; `enabled` False skips it."""

    def __init__(self, din: int, dout: int, axes: tuple[str, str], *, rank: int, scale: float, cfg: ModelConfig,
                 rngs: nnx.Rngs):
        init_a = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # ±1/sqrt(din), as PEFT
        self.a = nnx.Param(init_a(rngs.params(), (din, rank), cfg.storage_dtype), logical_axes=(axes[0], "lora_rank"))
        self.b = nnx.Param(jnp.zeros((rank, dout), cfg.storage_dtype), logical_axes=("lora_rank", axes[1]))
        self.scale = scale
        self.enabled = True

    def delta(self, dtype) -> jax.Array:
        """The update A B · scale as one [din, dout] matrix, in `dtype`."""
        a, b = self.a[...].astype(dtype), self.b[...].astype(dtype)
        return jnp.dot(a, b) * jnp.asarray(self.scale, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jnp.dot(x, self.a[...].astype(x.dtype))
        return jnp.dot(h, self.b[...].astype(x.dtype)) * jnp.asarray(self.scale, x.dtype)


def _linears(model: nnx.Module) -> list[tuple[str, Linear]]:
    return [(dotted(path), m) for path, m in nnx.iter_modules(model) if isinstance(m, Linear)]


def has_adapters(model: nnx.Module) -> bool:
    return any(m.lora is not None for _, m in _linears(model))


def adapted(names: Iterable[str]) -> bool:
    """Whether these dotted variable names (a `ModelDef`'s, a params dict's) include adapters."""
    return any(re.search(ADAPTER_NAMES, n) for n in names)


def attach(model: Transformer, lora: LoraConfig, *, mesh, rules: Mapping | None = None, seed: int = 0) -> Transformer:
    """Attaches an adapter to every Linear whose dotted name `lora.targets` matches (in place;
    returns `model`). The adapters are born sharded on `mesh` by `rules`, like the model."""
    if lora.rank == 0:
        return model
    if has_adapters(model):
        raise ValueError("the model already has LoRA adapters")
    linears = _linears(model)
    chosen = [(name, m) for name, m in linears if re.search(lora.targets, name)]
    if not chosen:
        raise ValueError(f"model.lora.targets={lora.targets!r} matches no Linear layer; their names look like "
                         f"{[name for name, _ in linears[:4]]}")
    cfg = model.cfg
    shapes = [(m.kernel.shape, tuple(m.kernel.get_metadata()["logical_axes"])) for _, m in chosen]

    def make():
        # Not the model's own key stream: A must not repeat the bits of the first base weights.
        rngs = nnx.Rngs(params=jax.random.fold_in(jax.random.key(seed), 0x10A))
        return nnx.List([Adapter(din, dout, axes, rank=lora.rank, scale=lora.scale, cfg=cfg, rngs=rngs)
                         for (din, dout), axes in shapes])

    adapters = sharding_lib.create_sharded(make, mesh, rules)
    for (_, linear), adapter in zip(chosen, adapters):
        linear.lora = adapter
    return model


def trainable_regex(trainable: str) -> str:
    """The regex of the parameters that train with adapters attached: the adapters and the
    reward / value heads, those among them that `train.trainable` also matches (so the
    default '.*' trains all of them, and the base weights never train)."""
    return rf"^(?=.*?(?:{trainable}))(?=.*?(?:{ADAPTER_NAMES}|{HEAD_NAMES}))"


def split_trainable(model: nnx.Module, trainable: str) -> tuple[ModelDef, dict, dict]:
    """`ModelDef.split(model, trainable)`, by `trainable_regex` when the model has adapters;
    raises, naming `train.trainable`, when nothing would train."""
    lora = has_adapters(model)
    model_def, params, rest = ModelDef.split(model, trainable_regex(trainable) if lora else trainable)
    if not params:
        which = "LoRA adapter or reward/value head (with model.lora.rank > 0 only they train)" if lora else "parameter"
        raise ValueError(f"train.trainable={trainable!r} matches no {which}; names look like {model_def.names[:4]}")
    return model_def, params, rest


def base_model(model: nnx.Module) -> nnx.Module:
    """The same model with its adapters switched off: a new module over the same arrays (no
    copy), so inside a jitted program it is the base model at no memory cost."""
    if not has_adapters(model):
        return model
    graphdef, state = nnx.split(model)
    base = nnx.merge(graphdef, state)
    for _, linear in _linears(base):
        if linear.lora is not None:
            linear.lora.enabled = False
    return base


def _fold(kernels: dict, a: dict, b: dict, scales: dict) -> dict:
    return {n: (w.astype(jnp.float32) + scales[n] * jnp.dot(a[n].astype(jnp.float32), b[n].astype(jnp.float32),
                                                           precision=jax.lax.Precision.HIGHEST)).astype(w.dtype)
            for n, w in kernels.items()}


def merge_adapters(model: Transformer) -> Transformer:
    """A plain model (no adapters) whose kernels are W + A B · alpha/rank, in W's dtype and
    sharding; `model` is unchanged. A model without adapters is returned as is."""
    if not has_adapters(model):
        return model
    _, _, values = ModelDef.split(model, None)
    adapted = {name: m for name, m in _linears(model) if m.lora is not None}
    kernels = {n: values[f"{n}.kernel"] for n in adapted}
    folded = jax.jit(_fold, out_shardings={n: w.sharding for n, w in kernels.items()})(
        kernels, {n: values[f"{n}.lora.a"] for n in adapted}, {n: values[f"{n}.lora.b"] for n in adapted},
        {n: jnp.float32(m.lora.scale) for n, m in adapted.items()})
    plain = {k: v for k, v in values.items() if not re.search(ADAPTER_NAMES, k)}
    plain.update({f"{n}.kernel": w for n, w in folded.items()})
    from rlhf_jax.models.load import abstract_def  # load imports checkpoints, which imports this module

    return abstract_def(model.cfg, model.heads).merge(plain)

