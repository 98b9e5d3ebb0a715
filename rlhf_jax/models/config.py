"""Architecture description shared by every decoder the project supports.

One `ModelConfig` covers the GPT-2 family (learned positions, LayerNorm, GELU, biases, tied
embeddings) and the Llama family (RoPE, RMSNorm, SwiGLU, grouped-query attention, optional
q/k/v bias as in Qwen2, tied or untied embeddings: Llama, Mistral, Qwen2, SmolLM2). It is
converted from and to a Hugging Face `PretrainedConfig`, so a checkpoint directory written by
`save_pretrained` is one that `transformers.AutoModelForCausalLM` loads (a reward model:
`AutoModelForSequenceClassification`, see `checkpoints`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import transformers

LLAMA_LIKE = ("llama", "mistral", "qwen2")
SUPPORTED_MODEL_TYPES = ("gpt2",) + LLAMA_LIKE

ATTENTION_IMPLEMENTATIONS = ("einsum", "dot_product")
# ModelConfig fields that say how to compute, not what the model is: a config's `model.<field>`
# overrides them whatever the checkpoint, and they are not written to a saved config.
RUNTIME_OPTIONS = ("dtype", "param_dtype", "remat", "attention")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(name: str | Any):
    """Maps a dtype name from a config ('float32', 'bfloat16') to a JAX dtype."""
    if not isinstance(name, str):
        return name
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not one of {sorted(_DTYPES)}") from None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a decoder-only transformer.

    `dtype` is the compute dtype of activations and matmuls; `param_dtype` the storage dtype of
    parameters. Norms, softmax and the final logits are computed in float32 whatever `dtype` is.
    """

    model_type: str = "llama"  # Hugging Face model_type written back on save
    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 16
    mlp_dim: int = 128
    max_position_embeddings: int = 512
    # Family switches.
    position: str = "rope"  # "rope" | "learned"
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    norm_eps: float = 1e-6
    activation: str = "silu"  # "silu" | "gelu_tanh" | "gelu"
    gated_mlp: bool = True  # SwiGLU (Llama) vs up/act/down (GPT-2)
    qkv_bias: bool = False  # Qwen2 and GPT-2
    out_bias: bool = False  # GPT-2: attention output and MLP biases
    mlp_bias: bool = False
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    sliding_window: int | None = None  # Mistral
    # Token ids carried for generation and for writing the HF config back.
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # How to compute (RUNTIME_OPTIONS: set from a config's `model.<field>`, never saved).
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False  # recompute each layer's activations in the backward pass (less memory)
    attention: str = "einsum"  # "einsum" | "dot_product" (jax.nn.dot_product_attention: cuDNN flash on a GPU)

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {self.model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        for field, allowed in (
            ("position", ("rope", "learned")),
            ("norm", ("rmsnorm", "layernorm")),
            ("activation", ("silu", "gelu_tanh", "gelu")),
            ("attention", ATTENTION_IMPLEMENTATIONS),
        ):
            if getattr(self, field) not in allowed:
                raise ValueError(f"ModelConfig.{field}={getattr(self, field)!r} is not one of {allowed}")
        as_dtype(self.dtype), as_dtype(self.param_dtype)

    @property
    def compute_dtype(self):
        return as_dtype(self.dtype)

    @property
    def storage_dtype(self):
        return as_dtype(self.param_dtype)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self, include_embeddings: bool = True) -> int:
        """Number of trunk + LM-head parameters (used for FLOP estimates)."""
        d, h, kv, hd, m = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, self.mlp_dim
        attn = d * h * hd + 2 * d * kv * hd + h * hd * d
        mlp = (3 if self.gated_mlp else 2) * d * m
        per_layer = attn + mlp
        total = self.num_layers * per_layer
        if include_embeddings:
            total += self.vocab_size * d * (1 if self.tie_embeddings else 2)
            if self.position == "learned":
                total += self.max_position_embeddings * d
        return total

    # ------------------------------------------------------------------ Hugging Face
    @classmethod
    def from_hf(cls, hf_config: Any, **overrides) -> "ModelConfig":
        """Builds a ModelConfig from a transformers `PretrainedConfig` (or its dict)."""
        c = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
        model_type = c.get("model_type")
        if model_type == "gpt2":
            d = c["n_embd"]
            act = c.get("activation_function", "gelu_new")
            if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
                raise ValueError(f"GPT-2 activation_function {act!r} is not supported")
            kwargs = dict(
                model_type="gpt2",
                vocab_size=c["vocab_size"],
                hidden_size=d,
                num_layers=c["n_layer"],
                num_heads=c["n_head"],
                num_kv_heads=c["n_head"],
                head_dim=d // c["n_head"],
                mlp_dim=c.get("n_inner") or 4 * d,
                max_position_embeddings=c["n_positions"],
                position="learned",
                norm="layernorm",
                norm_eps=c.get("layer_norm_epsilon", 1e-5),
                activation="gelu" if act == "gelu" else "gelu_tanh",
                gated_mlp=False,
                qkv_bias=True,
                out_bias=True,
                mlp_bias=True,
                tie_embeddings=c.get("tie_word_embeddings", True),
            )
            if c.get("scale_attn_by_inverse_layer_idx") or c.get("reorder_and_upcast_attn"):
                raise ValueError("GPT-2 options scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn are not supported")
        elif model_type in LLAMA_LIKE:
            act = c.get("hidden_act", "silu")
            if act != "silu":
                raise ValueError(f"{model_type} hidden_act {act!r} is not supported (only silu)")
            rope_theta = _rope_theta(c)
            heads = c["num_attention_heads"]
            kwargs = dict(
                model_type=model_type,
                vocab_size=c["vocab_size"],
                hidden_size=c["hidden_size"],
                num_layers=c["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=c.get("num_key_value_heads") or heads,
                head_dim=c.get("head_dim") or c["hidden_size"] // heads,
                mlp_dim=c["intermediate_size"],
                max_position_embeddings=c.get("max_position_embeddings", 2048),
                position="rope",
                norm="rmsnorm",
                norm_eps=c.get("rms_norm_eps", 1e-6),
                activation="silu",
                gated_mlp=True,
                qkv_bias=model_type == "qwen2" or bool(c.get("attention_bias", False)),
                out_bias=model_type != "qwen2" and bool(c.get("attention_bias", False)),
                mlp_bias=bool(c.get("mlp_bias", False)),
                tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                rope_theta=rope_theta,
                sliding_window=_sliding_window(c),
            )
        else:
            raise ValueError(
                f"model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}"
            )
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = c.get(key)
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            kwargs[key] = value
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf(self):
        """The equivalent transformers config, for `save_pretrained`."""
        common = dict(
            vocab_size=self.vocab_size,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            tie_word_embeddings=self.tie_embeddings,
        )
        if self.model_type == "gpt2":
            return transformers.GPT2Config(
                n_embd=self.hidden_size,
                n_layer=self.num_layers,
                n_head=self.num_heads,
                n_inner=self.mlp_dim,
                n_positions=self.max_position_embeddings,
                layer_norm_epsilon=self.norm_eps,
                activation_function="gelu" if self.activation == "gelu" else "gelu_new",
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                **common,
            )
        kwargs = dict(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            intermediate_size=self.mlp_dim,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.norm_eps,
            hidden_act="silu",
            rope_theta=self.rope_theta,
            **common,
        )
        if self.model_type == "llama":
            return transformers.LlamaConfig(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias, **kwargs)
        if self.model_type == "mistral":
            return transformers.MistralConfig(sliding_window=self.sliding_window, **kwargs)
        return transformers.Qwen2Config(
            use_sliding_window=self.sliding_window is not None,
            sliding_window=self.sliding_window,
            **kwargs,
        )


def _rope_theta(c: dict) -> float:
    """RoPE base from either the legacy `rope_theta` or transformers 5's `rope_parameters`."""
    params = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} is not supported (only the default RoPE)")
    theta = params.get("rope_theta", c.get("rope_theta"))
    return float(theta if theta is not None else 10000.0)


def _sliding_window(c: dict) -> int | None:
    if c.get("model_type") == "qwen2":
        # Qwen2 applies its window only to some layers (`layer_types`); one window for every
        # layer would be a different network, so refuse it rather than load it wrong.
        if any(t != "full_attention" for t in c.get("layer_types") or ()) or c.get("use_sliding_window"):
            raise ValueError("Qwen2 per-layer sliding-window attention is not supported")
        return None
    window = c.get("sliding_window")
    return int(window) if window else None
