"""The one way to get a model: from a config, a path or a (model, tokenizer) pair to a sharded
`Transformer` and its tokenizer, or to `(ModelDef, params)` for a frozen model.

A spec is one of:
  * a model config (`init` = 'tiny' | 'pretrained' | 'gguf', `path`, `tiny` fields, and the
    `ModelConfig.RUNTIME_OPTIONS` dtype, param_dtype, remat, attention), as every stage config has under `model`;
  * a path: a Hugging Face directory (an earlier stage's `workdir/model`) or a `.gguf` file;
  * a `(Transformer, tokenizer)` pair, already loaded (its heads are checked).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from rlhf_jax import sharding as sharding_lib
from rlhf_jax.data.tokenizer import load_tokenizer
from rlhf_jax.models import lora
from rlhf_jax.models.checkpoints import load_gguf, load_pretrained, runtime_overrides, saved_heads, saved_meta
from rlhf_jax.models.config import ATTENTION_IMPLEMENTATIONS, RUNTIME_OPTIONS, ModelConfig
from rlhf_jax.models.modeldef import ModelDef
from rlhf_jax.models.transformer import Transformer

KINDS = ("tiny", "pretrained", "gguf")


@dataclasses.dataclass(frozen=True)
class Source:
    """A resolved spec: which reader, from where, with which overrides."""

    kind: str  # one of KINDS, or "pair"
    path: str = ""  # resolved path ('' for tiny, or gguf's packaged default)
    options: Mapping[str, Any] | None = None  # RUNTIME_OPTIONS overrides (None = the default)
    tiny: Mapping[str, Any] | None = None
    pair: tuple | None = None


def resolve(spec: Any) -> Source:
    """Normalises any spec (see the module docstring) into a `Source`."""
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], Transformer):
        return Source("pair", pair=tuple(spec))
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        if path.suffix == ".gguf":
            return Source("gguf", str(path))
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory, e.g. a "
                                    f"stage's workdir/model, or a .gguf file)")
        return Source("pretrained", str(path.resolve()))
    if hasattr(spec, "get") and "init" in spec:
        kind = spec["init"]
        if kind not in KINDS:
            raise ValueError(f"model.init={kind!r} is not one of {KINDS}")
        if kind == "pretrained" and not spec.get("path"):
            raise ValueError("model.init='pretrained' needs model.path (a Hugging Face directory)")
        options = {name: spec.get(name) for name in RUNTIME_OPTIONS}
        if options["attention"] not in (None,) + ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"model.attention={options['attention']!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
        if kind == "tiny":
            return Source("tiny", tiny=dict(spec["tiny"]), options=options)
        source = resolve(spec["path"]) if spec.get("path") else Source("gguf")
        return dataclasses.replace(source, options=options)
    raise TypeError(f"expected a model config, a path or a (Transformer, tokenizer) pair, got {type(spec).__name__}")


def check_trained_heads(src: Source, heads: tuple[str, ...], role: str = "model") -> None:
    """Refuses a checkpoint without trained `heads` (an LM given where an RM is needed)."""
    have = src.pair[0].heads if src.kind == "pair" else saved_heads(src.path) if src.kind == "pretrained" else ("lm",)
    missing = [h for h in heads if h not in have]
    if missing:
        raise ValueError(f"{role} {src.path or src.kind!r} has no trained {'/'.join(missing)} head (it has "
                         f"{'/'.join(have)}); give the workdir/model of a stage that trained one")


def saved_scoring(spec: Any) -> dict | None:
    """The scoring settings an RM stage saved with its model (`save_pretrained(scoring=...)`),
    or None: a pair, a GGUF file, a foreign checkpoint or a model saved without them."""
    src = resolve(spec)
    return saved_meta(src.path).get("scoring") if src.kind == "pretrained" else None


def load_model(spec: Any, *, heads: tuple[str, ...] = ("lm",), tokenizer: Any = "", mesh: Mesh | None = None,
               rules: Mapping | None = None, seed: int = 0, require_trained: tuple[str, ...] = (),
               role: str = "model") -> tuple[Transformer, Any]:
    """(model, tokenizer), the model's parameters sharded on `mesh` (default: all devices).

    `tokenizer` '' takes the model's own ('byte' for a tiny model); anything else is passed to
    `data.load_tokenizer`. Heads the checkpoint lacks are freshly initialised from `seed`,
    except those in `require_trained`, which must have been trained (`role` names the
    config field in the error). A model config with `lora.rank` > 0 gets LoRA adapters
    (`models/lora.py`).
    """
    src = resolve(spec)
    lora_cfg = lora.LoraConfig.from_spec(spec)
    check_trained_heads(src, require_trained, role)
    mesh = mesh if mesh is not None else sharding_lib.make_mesh()
    model, tok = _load(src, heads, tokenizer, mesh, rules, seed)
    return lora.attach(model, lora_cfg, mesh=mesh, rules=rules, seed=seed), tok  # model.lora (a config's)


def _load(src: Source, heads, tokenizer, mesh, rules, seed) -> tuple[Transformer, Any]:
    if src.kind == "pair":
        model, tok = src.pair
        missing = set(heads) - set(model.heads)
        if missing:
            raise ValueError(f"the model has heads {model.heads}, this needs {sorted(missing)}")
        return model, load_tokenizer(tokenizer or tok)
    options = dict(src.options or {})
    if src.kind == "tiny":
        tok = load_tokenizer(tokenizer or "byte")
        cfg = ModelConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, **src.tiny, **runtime_overrides(options))
        model = sharding_lib.create_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(seed), heads=heads), mesh, rules)
        return model, tok
    if src.kind == "pretrained":
        model = load_pretrained(src.path, heads=heads, mesh=mesh, rules=rules, seed=seed, **options)
        return model, load_tokenizer(tokenizer or src.path)
    model, tok = load_gguf(src.path or None, heads=heads, mesh=mesh, rules=rules, seed=seed, **options)
    return model, load_tokenizer(tokenizer or tok)


def load_frozen(spec: Any, *, heads: tuple[str, ...], tokenizer: Any = "", mesh: Mesh | None = None,
                rules: Mapping | None = None, seed: int = 0) -> tuple[ModelDef, dict, Any]:
    """(ModelDef, every variable as one {dotted name: array} dict, tokenizer): a model that is
    only read (a KL reference, a reward model), ready to pass to a jitted program."""
    model, tok = load_model(spec, heads=heads, tokenizer=tokenizer, mesh=mesh, rules=rules, seed=seed)
    model_def, _, params = ModelDef.split(model, None)
    return model_def, params, tok


def load_tokenizer_of(spec: Any, tokenizer: Any = "") -> Any:
    """The tokenizer a spec's model uses, without reading its weights (GGUF files excepted)."""
    src = resolve(spec)
    if tokenizer:
        return load_tokenizer(tokenizer)
    if src.kind == "pair":
        return load_tokenizer(src.pair[1])
    if src.kind == "tiny":
        return load_tokenizer("byte")
    if src.kind == "pretrained":
        return load_tokenizer(src.path)
    return load_model(spec, mesh=sharding_lib.make_mesh(devices=jax.devices()[:1]))[1]


def model_mesh(model: nnx.Module) -> Mesh:
    """The mesh a model's parameters live on (a one-device mesh for unsharded arrays)."""
    leaf = jax.tree.leaves(nnx.state(model))[0]
    if isinstance(leaf.sharding, NamedSharding):
        return leaf.sharding.mesh
    return sharding_lib.make_mesh(devices=sorted(leaf.sharding.device_set, key=lambda d: d.id))


def abstract_def(cfg: ModelConfig, heads: tuple[str, ...]) -> ModelDef:
    """The `ModelDef` of a model with these heads, without allocating its parameters."""
    return ModelDef.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), heads=heads)), None)[0]
