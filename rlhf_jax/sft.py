"""Supervised fine-tuning: masked next-token loss (plain pretraining is a full mask).

Loss functions return sums and counts rather than means, so gradient accumulation and
multi-device reductions give exactly the mean over the whole global batch.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.models import Transformer, dense


def token_logprobs(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """log p(target) per position [B, T], float32.

    Targets at padding may be a pad id outside the vocabulary (GPT-2's added <pad>): they are
    clipped into range, since an out-of-range gather gives NaN and NaN * (mask 0) is NaN."""
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    targets_BT = jnp.clip(targets_BT, 0, logits_BTV.shape[-1] - 1)
    return jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]


class TokenStats(NamedTuple):
    """Per-position results of `selected_token_logprobs`, float32 [B, T], 0 where not read."""

    logp: jax.Array  # log p(target)
    hit: jax.Array  # 1 where the target is the argmax
    entropy: jax.Array  # entropy of the next-token distribution (no gradient)


def _chunk_stats(h_CD: jax.Array, w_DV: jax.Array, targets_C: jax.Array, temperature: float):
    """(log p(target), argmax hit, entropy) of C positions, float32."""
    logits_CV = dense(h_CD.astype(w_DV.dtype), w_DV, jnp.float32) / temperature
    lse_C = jax.nn.logsumexp(logits_CV, axis=-1)
    target_logit_C = jnp.take_along_axis(logits_CV, targets_C[:, None], axis=-1)[:, 0]
    logp_C = target_logit_C - lse_C
    logits_CV, lse_C, target_logit_C = jax.lax.stop_gradient((logits_CV, lse_C, target_logit_C))  # statistics
    entropy_C = lse_C - (jnp.exp(logits_CV - lse_C[:, None]) * logits_CV).sum(-1)
    return logp_C, _is_top(target_logit_C, logits_CV.max(-1)), entropy_C


def _is_top(target_logit_C: jax.Array, max_logit_C: jax.Array) -> jax.Array:
    """1.0 where the target's logit is the row's maximum: argmax == target, a tie counting as a
    hit. Read off the max the log-sum-exp needs anyway: the (value, index) reduce that
    `jnp.argmax` lowers to took as long as the logits' matmul itself on CPU (2.3 ms for a
    [512, 2048] slice, ~10% of an SFT step at a 50k vocabulary)."""
    return (target_logit_C >= max_logit_C).astype(jnp.float32)


def selected_token_logprobs(model: Transformer, h_BTD: jax.Array, targets_BT: jax.Array, weight_BT: jax.Array,
                            *, temperature: float = 1.0, chunk_size: int = 512,
                            vocab_chunk_size: int | None = None) -> TokenStats:
    """log p(target), argmax hit and entropy [B, T] of the logits / `temperature` where
    `weight_BT` > 0 (zeros elsewhere), without materialising the [B, T, V] logits.

    The positions a loss reads are moved to the front (a stable sort, so shapes stay static)
    and taken `chunk_size` positions at a time in a scan; a chunk past the last read position
    is skipped (`lax.cond`), so padding, prompts and (in packed rows) the unused tail cost no
    logits. Within a chunk:
      * 0 < `vocab_chunk_size` < V (the default on CPU is 2048): the vocabulary is walked in slices
        of that many columns, the log-sum-exp, entropy and max kept as running sums
        (`_vocab_sliced_stats`), and the backward pass walks it again, writing each slice of
        the head's gradient once; the largest logits array is [chunk_size, vocab_chunk_size],
        which stays in cache (`benchmarks/lm_head.py` times both ways).
      * otherwise (0 is the default off CPU): the chunk's [chunk_size, V] logits at once,
        rematerialised in the backward pass.
    """
    if vocab_chunk_size is None:
        vocab_chunk_size = 2048 if jax.default_backend() == "cpu" else 0
    b, t, d = h_BTD.shape
    n = b * t
    c = min(chunk_size, n)
    num_chunks = -(-n // c)
    w_DV = model.unembedding()
    targets_N = jnp.clip(targets_BT.reshape(n), 0, w_DV.shape[-1] - 1)  # pad ids may lie outside V
    read_N = weight_BT.reshape(n) > 0
    order_N = jnp.argsort(~read_N, stable=True)  # read positions first, in order
    count = read_N.sum()
    pad = num_chunks * c - n
    h_KCD = jnp.pad(h_BTD.reshape(n, d)[order_N], ((0, pad), (0, 0))).reshape(num_chunks, c, d)
    tgt_KC = jnp.pad(targets_N[order_N], (0, pad)).reshape(num_chunks, c)
    read_K = jnp.arange(num_chunks) * c < count
    if 0 < vocab_chunk_size < w_DV.shape[1]:
        stats_KC = _vocab_sliced_stats(h_KCD, w_DV, tgt_KC, read_K, temperature, vocab_chunk_size)
    else:
        stats_KC = _whole_row_stats(h_KCD, w_DV, tgt_KC, read_K, temperature)
    keep_BT = read_N.reshape(b, t)

    def unsort(x_KC):
        x_BT = jnp.zeros((n,), jnp.float32).at[order_N].set(x_KC.reshape(-1)[:n]).reshape(b, t)
        return jnp.where(keep_BT, x_BT, 0.0)

    return TokenStats(*(unsort(x) for x in stats_KC))


def _whole_row_stats(h_KCD, w_DV, tgt_KC, read_K, temperature):
    """(log p, hit, entropy) [K, C] from each chunk's whole [C, V] logits, rematerialised."""
    c = h_KCD.shape[1]
    stats = functools.partial(_chunk_stats, temperature=temperature)
    skipped = lambda h, w, y: (jnp.zeros((c,), jnp.float32),) * 3

    # The skip sits inside the rematerialised function: its residuals are then its inputs,
    # and the scan keeps the loop-invariant w_DV once. (With the cond outside, the cond's own
    # residuals made w_DV a per-chunk output of the scan: a [chunks, D, V] copy.)
    @jax.checkpoint
    def chunk(read, h_CD, w_DV, tgt_C):
        return jax.lax.cond(read, stats, skipped, h_CD, w_DV, tgt_C)

    def body(_, xs):
        read, h_CD, tgt_C = xs
        return None, chunk(read, h_CD, w_DV, tgt_C)

    return jax.lax.scan(body, None, (read_K, h_KCD, tgt_KC))[1]


# ------------------------------------------------------------------ vocabulary slices
# A custom VJP over all the chunks at once: what the backward pass keeps is the inputs and
# each position's log-sum-exp (a VJP per chunk inside the scan would make the head a
# per-chunk residual). Forward: one pass over the vocabulary slices with a running max,
# Σ exp and Σ exp·logit (online softmax). Backward: the logits of each slice again, then
# d logits = g · (onehot − p) / T, dh += d logits · W_slice^T, dW_slice += h^T · d logits.

def _walk_slices(step, carry, v: int, width: int):
    """`carry = step(carry, start, size)` over the slices [start, start + size) of v columns:
    the full ones of `width` in a loop, then the partial last one, if any."""
    full, rest = v // width, v % width
    carry = jax.lax.fori_loop(0, full, lambda j, cr: step(cr, j * width, width), carry)
    return step(carry, full * width, rest) if rest else carry


def _slice_logits(h_CD, w_DV, start, width, temperature):
    w_DS = jax.lax.dynamic_slice_in_dim(w_DV, start, width, axis=1)
    return jnp.dot(h_CD.astype(w_DS.dtype), w_DS, preferred_element_type=jnp.float32) / temperature, w_DS


def _forward_slices(h_CD, w_DV, tgt_C, temperature, width):
    """(log p, hit, entropy, log-sum-exp) [C] of one chunk."""
    c = h_CD.shape[0]

    def step(carry, start, size):
        m_C, s0_C, s1_C, tl_C = carry
        logits_CS, _ = _slice_logits(h_CD, w_DV, start, size, temperature)
        top_C = logits_CS.max(-1)
        m_new_C = jnp.maximum(m_C, top_C)
        scale_C = jnp.exp(m_C - m_new_C)
        e_CS = jnp.exp(logits_CS - m_new_C[:, None])
        s0_C = s0_C * scale_C + e_CS.sum(-1)
        s1_C = s1_C * scale_C + (e_CS * logits_CS).sum(-1)
        idx_C = tgt_C - start
        inside_C = (idx_C >= 0) & (idx_C < size)
        picked_C = jnp.take_along_axis(logits_CS, jnp.clip(idx_C, 0, size - 1)[:, None], -1)[:, 0]
        tl_C = jnp.where(inside_C, picked_C, tl_C)
        return m_new_C, s0_C, s1_C, tl_C

    low = jnp.full((c,), -jnp.inf, jnp.float32)
    zero = jnp.zeros((c,), jnp.float32)
    m_C, s0_C, s1_C, tl_C = _walk_slices(step, (low, zero, zero, zero), w_DV.shape[1], width)
    lse_C = m_C + jnp.log(s0_C)
    return tl_C - lse_C, _is_top(tl_C, m_C), lse_C - s1_C / s0_C, lse_C


def _backward_slices(h_CD, w_DV, tgt_C, lse_C, g_C, dw_DV, temperature, width):
    """(dh [C, D], dw_DV + this chunk's head gradient) for cotangent g_C of log p."""

    def step(carry, start, size):
        dh_CD, dw_DV = carry
        logits_CS, w_DS = _slice_logits(h_CD, w_DV, start, size, temperature)
        onehot_CS = (tgt_C - start)[:, None] == jnp.arange(size)[None, :]
        dlogits_CS = (g_C / temperature)[:, None] * (onehot_CS - jnp.exp(logits_CS - lse_C[:, None]))
        dh_CD = dh_CD + jnp.dot(dlogits_CS.astype(w_DS.dtype), w_DS.T, preferred_element_type=jnp.float32)
        dw_DS = jnp.dot(h_CD.T.astype(jnp.float32), dlogits_CS, preferred_element_type=jnp.float32)
        dw_DV = jax.lax.dynamic_update_slice_in_dim(
            dw_DV, jax.lax.dynamic_slice_in_dim(dw_DV, start, size, axis=1) + dw_DS, start, axis=1)
        return dh_CD, dw_DV

    return _walk_slices(step, (jnp.zeros(h_CD.shape, jnp.float32), dw_DV), w_DV.shape[1], width)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _vocab_sliced_stats(h_KCD, w_DV, tgt_KC, read_K, temperature, width):
    """(log p, hit, entropy) [K, C] of the logits / T; chunks with read_K False give zeros."""
    return _vocab_sliced_fwd(h_KCD, w_DV, tgt_KC, read_K, temperature, width)[0]


def _vocab_sliced_fwd(h_KCD, w_DV, tgt_KC, read_K, temperature, width):
    zeros = (jnp.zeros((h_KCD.shape[1],), jnp.float32),) * 4
    forward = functools.partial(_forward_slices, temperature=temperature, width=width)

    def body(_, xs):
        read, h_CD, tgt_C = xs
        return None, jax.lax.cond(read, forward, lambda *_: zeros, h_CD, w_DV, tgt_C)

    logp_KC, hit_KC, entropy_KC, lse_KC = jax.lax.scan(body, None, (read_K, h_KCD, tgt_KC))[1]
    return (logp_KC, hit_KC, entropy_KC), (h_KCD, w_DV, tgt_KC, read_K, lse_KC)


def _vocab_sliced_bwd(temperature, width, residuals, cotangents):
    h_KCD, w_DV, tgt_KC, read_K, lse_KC = residuals
    g_KC = cotangents[0]  # hit and entropy are statistics: no gradient
    backward = functools.partial(_backward_slices, temperature=temperature, width=width)
    skipped = lambda h, w, y, l, g, dw: (jnp.zeros(h.shape, jnp.float32), dw)

    def body(dw_DV, xs):
        read, h_CD, tgt_C, lse_C, g_C = xs
        dh_CD, dw_DV = jax.lax.cond(read, backward, skipped, h_CD, w_DV, tgt_C, lse_C, g_C, dw_DV)
        return dw_DV, dh_CD

    dw_DV, dh_KCD = jax.lax.scan(body, jnp.zeros(w_DV.shape, jnp.float32), (read_K, h_KCD, tgt_KC, lse_KC, g_KC))
    return dh_KCD.astype(h_KCD.dtype), dw_DV.astype(w_DV.dtype), None, None


_vocab_sliced_stats.defvjp(_vocab_sliced_fwd, _vocab_sliced_bwd)


def sft_loss(model: Transformer, batch: dict) -> tuple[jax.Array, jax.Array, dict]:
    """Sum of response-token NLL, the number of response tokens, and metric (sum, count) pairs.

    batch: input_ids int32[B, T], attention_mask int32[B, T], loss_mask float32[B, T] (1 on the
    tokens whose prediction counts), and for packed rows segment_ids int32[B, T]
    (`data.packed_sft_batch`). Position t predicts token t + 1. Logits are computed only where
    the loss reads them (`selected_token_logprobs`).
    """
    ids_BT, mask_BT = batch["input_ids"], batch["attention_mask"]
    h_BTD, _ = model.hidden(ids_BT, mask_BT, segment_ids_BT=batch.get("segment_ids"))
    weight_BT = batch["loss_mask"][:, 1:].astype(jnp.float32)
    logp_BT, hit_BT, _ = selected_token_logprobs(model, h_BTD[:, :-1], ids_BT[:, 1:], weight_BT)
    nll_sum = -(logp_BT * weight_BT).sum()
    n_tokens = weight_BT.sum()
    stats = {"loss": (nll_sum, n_tokens), "token_accuracy": ((hit_BT * weight_BT).sum(), n_tokens),
             "tokens_per_batch": (n_tokens, jnp.float32(1.0))}
    return nll_sum, n_tokens, stats


def finalize_sft_metrics(metrics: dict) -> dict:
    """Adds perplexity = exp(mean response NLL)."""
    if "loss" in metrics:
        metrics = dict(metrics, perplexity=jnp.exp(jnp.asarray(metrics["loss"])))
    return metrics
