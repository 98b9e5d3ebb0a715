"""The decoder-only transformer, in Flax NNX, with LM, reward and value heads on one trunk.

Shape suffixes: B batch, T new tokens, S key/value slots (cache length), D hidden size,
H query heads, K key/value heads, G = H / K query heads per key/value head, E head dim,
V vocabulary, L layers.

Every parameter carries `logical_axes` metadata (names such as 'embed', 'heads', 'mlp',
'vocab'); `rlhf_jax.sharding` maps those names to mesh axes with one rules table, so the model
code knows nothing about the device mesh.

Padding: batches may be left-padded (the project's convention) or right-padded. Position ids
are `cumsum(attention_mask) - 1` (clipped at 0), so padding never shifts the positions of real
tokens, and pad keys are masked everywhere, including inside the KV cache. A padded row thus
gives, on its real tokens, the logits of the same row unpadded.

There is no dropout: RLHF needs it off in every model (policy, reference, reward, value), and
the fine-tuning runs this project targets do not use it either.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.models.config import ModelConfig

Initializer = Callable[..., jax.Array]
# Whole-row attention without a cache takes its queries in this many causal blocks
# (`Attention._attend`), from this many queries on.
_QUERY_BLOCKS = 4
_MIN_BLOCKED_QUERIES = 128
_NEG_INF = -1e30  # finite, so a fully masked row (a pad query) gives a uniform softmax, not NaN


class RewardNorm(nnx.Variable):
    """Gain and bias applied to the raw reward-head output. Set after RM training (so that
    rewards on reference responses have mean 0 and std 1), never trained by the optimizer,
    and saved with the RM."""


def _param(init: Initializer, rngs: nnx.Rngs, shape, dtype, axes) -> nnx.Param:
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=tuple(axes))


def dense(x: jax.Array, w: jax.Array, preferred_element_type=None) -> jax.Array:
    """x @ w, contracting x's last axis with w's first (w [in, out]).

    On CPU the backward pass is written out (`_dense_cpu`): left to itself, XLA:CPU computes
    the weight gradient x^T dy by transposing the [tokens, out] gradient inside the fusion
    that produces it, a strided loop at ~60 ns an element (profiled: 1.0 s of a 4.4 s
    reward-model backward at d256, 4,096 tokens, with the matmuls themselves at ~0.4 s).
    Elsewhere (GPU, TPU) the compiler's own gradient is kept."""
    if jax.default_backend() == "cpu":
        return _dense_cpu(x, w, preferred_element_type)
    return jnp.dot(x, w, preferred_element_type=preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense_cpu(x, w, preferred_element_type):
    return jnp.dot(x, w, preferred_element_type=preferred_element_type)


def _dense_cpu_fwd(x, w, preferred_element_type):
    return _dense_cpu(x, w, preferred_element_type), (x, w)


def _dense_cpu_bwd(preferred_element_type, res, dy):
    x, w = res
    x_ND, dy_NF = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    dx = jnp.dot(dy, w.T.astype(dy.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
    # The weight gradient from an explicit transpose of the narrower operand, kept a separate
    # op (optimization_barrier) so that the simplifier cannot fold it back into the dot.
    if x_ND.shape[1] <= dy_NF.shape[1]:
        x_DN = jax.lax.optimization_barrier(x_ND.T.astype(dy.dtype))
        dw = jnp.dot(x_DN, dy_NF, preferred_element_type=jnp.float32)
    else:
        dy_FN = jax.lax.optimization_barrier(dy_NF.T)
        dw = jnp.dot(dy_FN, x_ND.astype(dy.dtype), preferred_element_type=jnp.float32).T
    return dx, dw.astype(w.dtype)


_dense_cpu.defvjp(_dense_cpu_fwd, _dense_cpu_bwd)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias), kernel stored [in, out] with logical axis names; plus, when a
    LoRA adapter is attached (`rlhf_jax.models.lora.attach`) and enabled, (x @ A) @ B · alpha/rank."""

    def __init__(self, din: int, dout: int, axes: tuple[str, str], *, cfg: ModelConfig, rngs: nnx.Rngs,
                 bias: bool = False, init: Initializer | None = None):
        init = init or nnx.initializers.normal(0.02)
        self.kernel = _param(init, rngs, (din, dout), cfg.storage_dtype, axes)
        self.bias = _param(nnx.initializers.zeros, rngs, (dout,), cfg.storage_dtype, axes[1:]) if bias else None
        self.dtype = cfg.compute_dtype
        self.lora = nnx.data(None)  # a lora.Adapter once attached

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = dense(x, self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None and self.lora.enabled:
            y = y + self.lora(x)
        return y


class Norm(nnx.Module):
    """RMSNorm (Llama) or LayerNorm (GPT-2), computed in float32."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.kind, self.eps, self.dtype = cfg.norm, cfg.norm_eps, cfg.compute_dtype
        self.scale = _param(nnx.initializers.ones, rngs, (d,), cfg.storage_dtype, ("norm",))
        self.bias = (_param(nnx.initializers.zeros, rngs, (d,), cfg.storage_dtype, ("norm",))
                     if cfg.norm == "layernorm" else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        if self.kind == "layernorm":
            x32 = x32 - x32.mean(-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
        y = y * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def rope(x_BTNE: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding in the Hugging Face (rotate-half) layout."""
    e = x_BTNE.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e))
    angles_BTF = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    angles_BT1E = jnp.concatenate([angles_BTF, angles_BTF], -1)[:, :, None, :]
    x = x_BTNE.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], -1)
    return (x * jnp.cos(angles_BT1E) + rotated * jnp.sin(angles_BT1E)).astype(x_BTNE.dtype)


@flax.struct.dataclass
class KVCache:
    """Keys and values of the tokens seen so far, for incremental decoding.

    Slots are filled left to right, one call's tokens at a time (`index` is the next free
    slot). `mask_BS` marks which slots hold real tokens (padding in a left-padded prompt does
    not), and `lengths_B` counts the real tokens of each row, which gives the next position id.

    Keys and values are stored [B, K, S, E] (kv heads before slots), the layout the attention
    matmuls read: each call transposes only its T new tokens when writing them, instead of
    the compiler copying the whole cache of every layer into that layout at every decode step.
    """

    k: tuple[jax.Array, ...]  # L × [B, K, S, E]
    v: tuple[jax.Array, ...]
    mask_BS: jax.Array  # int32
    lengths_B: jax.Array  # int32
    index: jax.Array  # int32 scalar

    @classmethod
    def create(cls, cfg: ModelConfig, batch_size: int, max_length: int, dtype=None) -> "KVCache":
        dtype = dtype or cfg.compute_dtype
        shape = (batch_size, cfg.num_kv_heads, max_length, cfg.head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        return cls(
            k=zeros,
            v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
            mask_BS=jnp.zeros((batch_size, max_length), jnp.int32),
            lengths_B=jnp.zeros((batch_size,), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def max_length(self) -> int:
        return self.mask_BS.shape[1]


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, k, e = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.q = Linear(d, h * e, ("embed", "heads"), cfg=cfg, rngs=rngs, bias=cfg.qkv_bias)
        self.k = Linear(d, k * e, ("embed", "kv_heads"), cfg=cfg, rngs=rngs, bias=cfg.qkv_bias)
        self.v = Linear(d, k * e, ("embed", "kv_heads"), cfg=cfg, rngs=rngs, bias=cfg.qkv_bias)
        self.o = Linear(h * e, d, ("heads", "embed"), cfg=cfg, rngs=rngs, bias=cfg.out_bias)

    def __call__(self, x_BTD, positions_BT, q_slots_T, k_slots_S, key_mask_BS, cache_kv=None, index=None,
                 segment_ids_BT=None):
        """Returns the attention output and the updated (k, v) cache of this layer, if any.

        Query t sits at cache slot `q_slots_T[t]`; it may attend to key slot s when
        `k_slots_S[s] <= q_slots_T[t]` (causal), the key is real (`key_mask_BS`), with a
        sliding window `q_slot - k_slot < window`, and in packed rows (`segment_ids_BT`, no
        cache) the key belongs to the query's sequence.
        """
        q_BTHE = self._queries(x_BTD, positions_BT)
        k_BTKE, v_BTKE = self._keys_values(x_BTD, positions_BT)
        allowed_BTS = self._allowed(q_slots_T[None, :], k_slots_S, key_mask_BS)
        if cache_kv is not None:
            # The cache is [B, K, S, E]: only the T new tokens are transposed, on the way in.
            k_cache, v_cache = cache_kv
            k_BKSE = jax.lax.dynamic_update_slice(
                k_cache, k_BTKE.transpose(0, 2, 1, 3).astype(k_cache.dtype), (0, 0, index, 0))
            v_BKSE = jax.lax.dynamic_update_slice(
                v_cache, v_BTKE.transpose(0, 2, 1, 3).astype(v_cache.dtype), (0, 0, index, 0))
            return self.o(self._attend(q_BTHE, k_BKSE, v_BKSE, allowed_BTS, cached=True)), (k_BKSE, v_BKSE)
        if segment_ids_BT is not None:
            allowed_BTS &= segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
        # Without a cache the slots are the row's positions 0..T-1 (`_call_block`).
        return self.o(self._attend(q_BTHE, k_BTKE, v_BTKE, allowed_BTS, q_start=0)), None

    def at(self, x_BTD, positions_BT, key_mask_BT, segment_ids_BT, rows_N, columns_N):
        """The attention output [N, D] of the queries at tokens (rows_N[n], columns_N[n]) only,
        each over the keys of its own row (no cache): what `__call__` gives at those tokens,
        without the queries, output projections and scores of the others."""
        q_N1HE = self._queries(x_BTD[rows_N, columns_N][:, None], positions_BT[rows_N, columns_N][:, None])
        k_BTKE, v_BTKE = self._keys_values(x_BTD, positions_BT)  # once per row, then a row per query
        k_NTKE, v_NTKE, key_mask_NT = k_BTKE[rows_N], v_BTKE[rows_N], key_mask_BT[rows_N]
        allowed_N1T = self._allowed(columns_N[:, None], jnp.arange(x_BTD.shape[1]), key_mask_NT)
        if segment_ids_BT is not None:
            segments_NT = segment_ids_BT[rows_N]
            allowed_N1T &= (segments_NT == segments_NT[jnp.arange(len(rows_N)), columns_N][:, None])[:, None, :]
        return self.o(self._attend(q_N1HE, k_NTKE, v_NTKE, allowed_N1T))[:, 0]

    def span(self, x_BTD, positions_BT, key_mask_BT, segment_ids_BT, start: int):
        """The attention output [B, T - start, D] of the queries at tokens start, start + 1, …
        of every row (no cache): `__call__`'s there, without the queries, output projection and
        scores of the earlier tokens (whose keys and values it still reads)."""
        t = x_BTD.shape[1]
        q_BMHE = self._queries(x_BTD[:, start:], positions_BT[:, start:])
        k_BTKE, v_BTKE = self._keys_values(x_BTD, positions_BT)
        allowed_BMT = self._allowed(jnp.arange(start, t)[None, :], jnp.arange(t), key_mask_BT)
        if segment_ids_BT is not None:
            allowed_BMT &= segment_ids_BT[:, start:, None] == segment_ids_BT[:, None, :]
        return self.o(self._attend(q_BMHE, k_BTKE, v_BTKE, allowed_BMT, q_start=start))

    def _queries(self, x_BTD, positions_BT):
        """Rotated queries [B, T, H, E]."""
        cfg = self.cfg
        q_BTHE = self.q(x_BTD).reshape(*x_BTD.shape[:2], cfg.num_heads, cfg.head_dim)
        return rope(q_BTHE, positions_BT, cfg.rope_theta) if cfg.position == "rope" else q_BTHE

    def _keys_values(self, x_BSD, positions_BS):
        """Rotated keys and values [B, S, K, E]."""
        cfg = self.cfg
        k_BSKE = self.k(x_BSD).reshape(*x_BSD.shape[:2], cfg.num_kv_heads, cfg.head_dim)
        v_BSKE = self.v(x_BSD).reshape(*x_BSD.shape[:2], cfg.num_kv_heads, cfg.head_dim)
        if cfg.position == "rope":
            k_BSKE = rope(k_BSKE, positions_BS, cfg.rope_theta)
        return k_BSKE, v_BSKE

    def _allowed(self, q_slots_BT, k_slots_S, key_mask_BS):
        """[B, T, S]: causal (`k_slot <= q_slot`), within the sliding window if any, real keys."""
        q_BTS = q_slots_BT[:, :, None]
        allowed_BTS = k_slots_S[None, None, :] <= q_BTS
        if self.cfg.sliding_window is not None:
            allowed_BTS &= q_BTS - k_slots_S[None, None, :] < self.cfg.sliding_window
        return allowed_BTS & (key_mask_BS[:, None, :] > 0)

    def _attend(self, q_BTHE, keys, values, allowed_BTS, cached=False, q_start=None):
        """softmax(q k^T / sqrt(E)) v over the allowed keys, [B, T, H·E]; keys and values are
        [B, S, K, E], or [B, K, S, E] when `cached` (the cache's layout).

        `q_start` (static): the queries sit at key slots q_start, q_start + 1, …, so causality
        is known before the mask is read. The einsum path then takes the queries in
        `_QUERY_BLOCKS` blocks, each over the keys up to its last query (and from its first
        query's window start): the key slices no query of a block may attend are never scored.
        Four blocks over a whole row score 10/16 of the [T, T] matrix; a query's output is the
        same up to float rounding (what it skips has softmax weight exactly 0), except a query
        with no allowed key at all (padding), which averages the values of its block's keys
        rather than of all keys."""
        cfg = self.cfg
        b, t, h, e = q_BTHE.shape
        s = keys.shape[1]
        if (q_start is not None and not cached and cfg.attention == "einsum" and t >= _MIN_BLOCKED_QUERIES
                and q_start + t == s):
            size = -(-t // _QUERY_BLOCKS)
            outs = []
            for lo in range(0, t, size):
                hi = min(lo + size, t)
                first = 0 if cfg.sliding_window is None else max(0, q_start + lo - cfg.sliding_window + 1)
                last = q_start + hi  # keys past the block's last query are never allowed
                outs.append(self._attend(q_BTHE[:, lo:hi], keys[:, first:last], values[:, first:last],
                                         allowed_BTS[:, lo:hi, first:last]))
            return jnp.concatenate(outs, axis=1)
        kv = cfg.num_kv_heads
        if cfg.attention == "dot_product" and not cached:
            # jax.nn.dot_product_attention: XLA's fused attention on CPU/TPU, cuDNN's flash
            # kernel on a GPU when it supports the inputs. (Decoding keeps the einsum path,
            # which reads the cache in its stored [B, K, S, E] layout.)
            out_BTHE = jax.nn.dot_product_attention(q_BTHE, keys.astype(q_BTHE.dtype), values.astype(q_BTHE.dtype),
                                                    mask=allowed_BTS[:, None])
            return out_BTHE.reshape(b, t, h * e)
        kv_axes = "bkse" if cached else "bske"
        q_BTKGE = q_BTHE.reshape(b, t, kv, h // kv, e)
        scores_BKGTS = jnp.einsum(f"btkge,{kv_axes}->bkgts", q_BTKGE, keys.astype(q_BTKGE.dtype),
                                  preferred_element_type=jnp.float32) / math.sqrt(e)
        scores_BKGTS = jnp.where(allowed_BTS[:, None, None], scores_BKGTS, _NEG_INF)
        probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(values.dtype)
        if cached:
            # Output [B, K, G, T, E] makes einsum contract probs @ v with v as the right-hand
            # [S, E] operand, as stored; "->btkge" would make it v^T @ probs^T, which copies the
            # whole v cache into [B, K, E, S]. Only the small output is transposed.
            out_BTKGE = jnp.einsum("bkgts,bkse->bkgte", probs_BKGTS, values).transpose(0, 3, 1, 2, 4)
        else:
            out_BTKGE = jnp.einsum("bkgts,bske->btkge", probs_BKGTS, values)
        return out_BTKGE.reshape(b, t, h * e)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, m = cfg.hidden_size, cfg.mlp_dim
        self.gate = Linear(d, m, ("embed", "mlp"), cfg=cfg, rngs=rngs, bias=cfg.mlp_bias) if cfg.gated_mlp else None
        self.up = Linear(d, m, ("embed", "mlp"), cfg=cfg, rngs=rngs, bias=cfg.mlp_bias)
        self.down = Linear(m, d, ("mlp", "embed"), cfg=cfg, rngs=rngs, bias=cfg.mlp_bias)
        self.activation = cfg.activation

    def _act(self, x):
        if self.activation == "silu":
            return jax.nn.silu(x)
        return jax.nn.gelu(x, approximate=self.activation == "gelu_tanh")

    def __call__(self, x_BTD):
        if self.gate is not None:
            return self.down(self._act(self.gate(x_BTD)) * self.up(x_BTD))
        return self.down(self._act(self.up(x_BTD)))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = Norm(cfg, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = Norm(cfg, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x_BTD, positions_BT, q_slots_T, k_slots_S, key_mask_BS, cache_kv=None, index=None,
                 segment_ids_BT=None):
        a, new_kv = self.attn(self.attn_norm(x_BTD), positions_BT, q_slots_T, k_slots_S, key_mask_BS,
                              cache_kv, index, segment_ids_BT)
        x_BTD = x_BTD + a
        return x_BTD + self.mlp(self.mlp_norm(x_BTD)), new_kv

    def at(self, x_BTD, positions_BT, key_mask_BT, segment_ids_BT, rows_N, columns_N):
        """The block's output [N, D] at tokens (rows_N, columns_N) only (no cache)."""
        a_ND = self.attn.at(self.attn_norm(x_BTD), positions_BT, key_mask_BT, segment_ids_BT, rows_N, columns_N)
        x_ND = x_BTD[rows_N, columns_N] + a_ND
        return x_ND + self.mlp(self.mlp_norm(x_ND))

    def span(self, x_BTD, positions_BT, key_mask_BT, segment_ids_BT, start: int):
        """The block's output [B, T - start, D] at tokens start, start + 1, … of every row (no cache)."""
        a_BMD = self.attn.span(self.attn_norm(x_BTD), positions_BT, key_mask_BT, segment_ids_BT, start)
        x_BMD = x_BTD[:, start:] + a_BMD
        return x_BMD + self.mlp(self.mlp_norm(x_BMD))


class Transformer(nnx.Module):
    """A decoder-only transformer trunk with optional heads.

    Heads:
      * `lm`: next-token logits (tied to the embedding when `cfg.tie_embeddings`);
      * `reward`: a scalar read at the last real token (InstructGPT reward model), init
        N(0, 1/sqrt(D+1)), followed by a stored normalisation `gain * r + bias`;
      * `value`: a scalar per token (PPO critic), init zeros as in OpenAI's code.

    Call `model(input_ids, attention_mask)` for LM logits; `hidden` + the head methods for
    everything else (one trunk pass can feed several heads); `reward_model.scores` for an
    RM's score.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, heads: tuple[str, ...] = ("lm",)):
        unknown = set(heads) - {"lm", "reward", "value"}
        if unknown:
            raise ValueError(f"unknown heads {sorted(unknown)}; expected a subset of ('lm', 'reward', 'value')")
        self.cfg = cfg
        self.heads = tuple(heads)
        d = cfg.hidden_size
        self.embed = _param(nnx.initializers.normal(0.02), rngs, (cfg.vocab_size, d), cfg.storage_dtype,
                            ("vocab", "embed"))
        self.pos_embed = (_param(nnx.initializers.normal(0.01), rngs, (cfg.max_position_embeddings, d),
                                 cfg.storage_dtype, ("positions", "embed"))
                          if cfg.position == "learned" else None)
        self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = Norm(cfg, rngs=rngs)
        self.lm_head = (Linear(d, cfg.vocab_size, ("embed", "vocab"), cfg=cfg, rngs=rngs)
                        if "lm" in heads and not cfg.tie_embeddings else None)
        self.reward_head = (Linear(d, 1, ("embed", "head_out"), cfg=cfg, rngs=rngs, bias=True,
                                   init=nnx.initializers.normal(1.0 / math.sqrt(d + 1)))
                            if "reward" in heads else None)
        if "reward" in heads:
            self.reward_gain = RewardNorm(jnp.ones((), jnp.float32), logical_axes=())
            self.reward_bias = RewardNorm(jnp.zeros((), jnp.float32), logical_axes=())
        self.value_head = (Linear(d, 1, ("embed", "head_out"), cfg=cfg, rngs=rngs, bias=True,
                                  init=nnx.initializers.zeros)
                           if "value" in heads else None)

    # ------------------------------------------------------------------ trunk
    def hidden(self, input_ids_BT: jax.Array, attention_mask_BT: jax.Array | None = None, *,
               positions_BT: jax.Array | None = None, cache: KVCache | None = None,
               segment_ids_BT: jax.Array | None = None):
        """Final-norm hidden states [B, T, D] (compute dtype), and the updated cache or None.

        With a cache, the T new tokens are written at slots [cache.index, cache.index + T) and
        attend to every real token already in the cache.

        Packed rows (several sequences in one row, no cache): `segment_ids_BT` numbers each
        row's sequences 1, 2, … (0 = padding; it then replaces the attention mask); a token
        attends only within its sequence, and positions restart at 0 at each sequence's first
        token, so every sequence gets the hidden states it would get alone.
        """
        if segment_ids_BT is not None and cache is not None:
            raise ValueError("packed rows (segment_ids) are for training and scoring, not a KV cache")
        x_BTD, positions_BT, attention_mask_BT, segment_ids_BT = self._embed_tokens(
            input_ids_BT, attention_mask_BT, positions_BT, cache, segment_ids_BT)
        if cache is None:
            for layer in self.layers:
                x_BTD = self._block(layer, x_BTD, positions_BT, attention_mask_BT, segment_ids_BT)
            return self.final_norm(x_BTD), None
        t = input_ids_BT.shape[1]
        q_slots_T = cache.index + jnp.arange(t)
        k_slots_S = jnp.arange(cache.max_length)
        key_mask_BS = jax.lax.dynamic_update_slice(cache.mask_BS, attention_mask_BT, (0, cache.index))
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            x_BTD, (k_BKSE, v_BKSE) = layer(x_BTD, positions_BT, q_slots_T, k_slots_S, key_mask_BS,
                                            (cache.k[i], cache.v[i]), cache.index)
            new_k.append(k_BKSE)
            new_v.append(v_BKSE)
        new_cache = KVCache(k=tuple(new_k), v=tuple(new_v), mask_BS=key_mask_BS,
                            lengths_B=cache.lengths_B + attention_mask_BT.sum(-1), index=cache.index + t)
        return self.final_norm(x_BTD), new_cache

    def hidden_at(self, input_ids_BT: jax.Array, attention_mask_BT: jax.Array | None, rows_N: jax.Array,
                  columns_N: jax.Array, *, segment_ids_BT: jax.Array | None = None) -> jax.Array:
        """`hidden(...)[0][rows_N, columns_N]`, [N, D], for a head read at a few tokens (a
        reward model's at each sequence's last one): every layer but the last runs on all
        tokens, the last one only on the N read tokens (it still reads every key and value of
        their rows), which skips its queries, attention, output projection and MLP elsewhere.
        Packed rows as in `hidden`."""
        x_BTD, positions_BT, attention_mask_BT, segment_ids_BT = self._before_last_layer(
            input_ids_BT, attention_mask_BT, segment_ids_BT)
        rows_N, columns_N = rows_N.astype(jnp.int32), columns_N.astype(jnp.int32)
        return self.final_norm(self.layers[-1].at(x_BTD, positions_BT, attention_mask_BT, segment_ids_BT, rows_N,
                                                  columns_N))

    def hidden_span(self, input_ids_BT: jax.Array, attention_mask_BT: jax.Array | None, start: int, stop: int, *,
                    segment_ids_BT: jax.Array | None = None) -> jax.Array:
        """`hidden(...)[0][:, start:stop]`, [B, stop - start, D], for heads read on a span of
        every row (a policy's log-probs and a critic's values at the response tokens). Tokens
        from `stop` on are never read (attention is causal) and the last layer runs only on
        the span, as in `hidden_at`; packed rows as in `hidden`."""
        if not 0 <= start < stop <= input_ids_BT.shape[1]:
            raise ValueError(f"hidden_span: [{start}, {stop}) is not a span of {input_ids_BT.shape[1]} tokens")
        cut = lambda a: None if a is None else a[:, :stop]
        x_BTD, positions_BT, attention_mask_BT, segment_ids_BT = self._before_last_layer(
            input_ids_BT[:, :stop], cut(attention_mask_BT), cut(segment_ids_BT))
        span = lambda layer, *args: layer.span(*args, start)
        call = nnx.remat(span) if self.cfg.remat else span  # as `_block`: only its input kept
        return self.final_norm(call(self.layers[-1], x_BTD, positions_BT, attention_mask_BT, segment_ids_BT))

    def _before_last_layer(self, input_ids_BT, attention_mask_BT, segment_ids_BT):
        """`_embed_tokens` (no cache) and every layer but the last: what `hidden_at` and
        `hidden_span` give their last layer, (x [B, T, D], positions, attention mask, segment ids)."""
        x_BTD, positions_BT, attention_mask_BT, segment_ids_BT = self._embed_tokens(
            input_ids_BT, attention_mask_BT, None, None, segment_ids_BT)
        for layer in self.layers[:-1]:
            x_BTD = self._block(layer, x_BTD, positions_BT, attention_mask_BT, segment_ids_BT)
        return x_BTD, positions_BT, attention_mask_BT, segment_ids_BT

    def _embed_tokens(self, input_ids_BT, attention_mask_BT, positions_BT, cache, segment_ids_BT):
        """The token (+ position) embeddings [B, T, D], the positions, the int32 attention mask
        and segment ids (see `hidden`)."""
        b, t = input_ids_BT.shape
        if segment_ids_BT is not None:
            segment_ids_BT = jnp.asarray(segment_ids_BT, jnp.int32)
            attention_mask_BT = (segment_ids_BT > 0).astype(jnp.int32)
            if positions_BT is None:
                positions_BT = segment_positions(segment_ids_BT)
        if attention_mask_BT is None:
            attention_mask_BT = jnp.ones((b, t), jnp.int32)
        attention_mask_BT = jnp.asarray(attention_mask_BT, jnp.int32)  # (numpy input: indexed by tracers below)
        # A pad id may lie outside the embedding table (GPT-2's added <pad> is id 50257 of a
        # 50257-row table); an out-of-range gather gives NaN, which even a zero attention
        # weight would spread (0 * NaN). Padding carries no information: read row 0 instead.
        input_ids_BT = jnp.where(attention_mask_BT > 0, input_ids_BT, 0)
        if positions_BT is None:
            past_B = cache.lengths_B if cache is not None else jnp.zeros((b,), jnp.int32)
            positions_BT = jnp.maximum(past_B[:, None] + jnp.cumsum(attention_mask_BT, -1) - 1, 0)
        x_BTD = jnp.take(self.embed[...], input_ids_BT, axis=0).astype(self.cfg.compute_dtype)
        if self.pos_embed is not None:
            x_BTD = x_BTD + jnp.take(self.pos_embed[...], positions_BT, axis=0).astype(x_BTD.dtype)
        return x_BTD, positions_BT, attention_mask_BT, segment_ids_BT

    def _block(self, layer, x_BTD, positions_BT, attention_mask_BT, segment_ids_BT):
        """One layer over whole rows without a cache (rematerialised when `cfg.remat`: only its
        input is kept for the backward pass)."""
        call = nnx.remat(_call_block) if self.cfg.remat else _call_block
        return call(layer, x_BTD, positions_BT, attention_mask_BT, segment_ids_BT)

    # ------------------------------------------------------------------ heads
    def unembedding(self) -> jax.Array:
        """The LM head's matrix [D, V] in the compute dtype (the embedding's transpose when tied)."""
        if "lm" not in self.heads:
            raise ValueError("this model was built without an LM head (heads=%r)" % (self.heads,))
        dtype = self.cfg.compute_dtype
        if self.lm_head is None:
            return self.embed[...].T.astype(dtype)
        w_DV = self.lm_head.kernel[...].astype(dtype)
        adapter = self.lm_head.lora
        if adapter is not None and adapter.enabled:  # W + A B · scale, the adapted head as one matrix
            w_DV = w_DV + adapter.delta(dtype)
        return w_DV

    def logits(self, h_BTD: jax.Array) -> jax.Array:
        """Next-token logits [B, T, V] in float32."""
        w_DV = self.unembedding()
        return dense(h_BTD.astype(w_DV.dtype), w_DV, jnp.float32)

    def values(self, h_BTD: jax.Array) -> jax.Array:
        """Per-token value estimates [B, T] in float32."""
        if self.value_head is None:
            raise ValueError("this model was built without a value head (heads=%r)" % (self.heads,))
        return self.value_head(h_BTD)[..., 0].astype(jnp.float32)

    def raw_rewards(self, h_BTD: jax.Array) -> jax.Array:
        """Unnormalised reward-head output at every position [B, T], float32."""
        if self.reward_head is None:
            raise ValueError("this model was built without a reward head (heads=%r)" % (self.heads,))
        return self.reward_head(h_BTD)[..., 0].astype(jnp.float32)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 position_ids: jax.Array | None = None, cache: KVCache | None = None):
        """LM logits [B, T, V] (float32) of ids [B, T] and mask [B, T] (the Hugging Face
        keywords); with a `cache`, returns `(logits, new_cache)`."""
        h_BTD, new_cache = self.hidden(input_ids, attention_mask, positions_BT=position_ids, cache=cache)
        logits = self.logits(h_BTD)
        return logits if cache is None else (logits, new_cache)


def _call_block(block: Block, x_BTD, positions_BT, key_mask_BT, segment_ids_BT):
    slots_T = jnp.arange(x_BTD.shape[1])
    return block(x_BTD, positions_BT, slots_T, slots_T, key_mask_BT, None, None, segment_ids_BT)[0]


def segment_positions(segment_ids_BT: jax.Array) -> jax.Array:
    """Position of each token within its sequence of a packed row [B, T] (0 at each sequence's
    first token; padding gets positions too, which nothing reads)."""
    t = segment_ids_BT.shape[-1]
    idx_T = jnp.arange(t)
    starts_BT = jnp.concatenate([jnp.ones_like(segment_ids_BT[:, :1], bool),
                                 segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=-1)
    start_BT = jax.lax.cummax(jnp.where(starts_BT, idx_T, 0), axis=1)
    return idx_T - start_BT


def last_index(mask_BT: jax.Array) -> jax.Array:
    """Index of the last nonzero entry of each row [B] (0 for an all-zero row).

    Works for left and right padding alike, so a score is never read at a pad position.
    """
    t = mask_BT.shape[-1]
    positions = jnp.where(mask_BT > 0, jnp.arange(t), -1)
    return jnp.maximum(positions.max(-1), 0)


def gather_last(x_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """x at the last real token of each row [B]."""
    return jnp.take_along_axis(x_BT, last_index(mask_BT)[:, None], axis=-1)[:, 0]
