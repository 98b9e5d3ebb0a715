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
    logp_C = jnp.take_along_axis(logits_CV, targets_C[:, None], axis=-1)[:, 0] - lse_C
    logits_CV, lse_C = jax.lax.stop_gradient((logits_CV, lse_C))  # the rest are statistics
    entropy_C = lse_C - (jnp.exp(logits_CV - lse_C[:, None]) * logits_CV).sum(-1)
    return logp_C, (jnp.argmax(logits_CV, -1) == targets_C).astype(jnp.float32), entropy_C


def selected_token_logprobs(model: Transformer, h_BTD: jax.Array, targets_BT: jax.Array, weight_BT: jax.Array,
                            *, temperature: float = 1.0, chunk_size: int = 512) -> TokenStats:
    """log p(target), argmax hit and entropy [B, T] of the logits / `temperature` where
    `weight_BT` > 0 (zeros elsewhere), without materialising the [B, T, V] logits.

    The positions a loss reads are moved to the front (a stable sort, so shapes stay static),
    and their logits are computed `chunk_size` positions at a time in a scan; a chunk past the
    last read position is skipped (`lax.cond`), so padding, prompts and (in packed rows) the
    unused tail cost no logits. Each chunk is rematerialised in the backward pass, so the
    largest logits array ever alive is [chunk_size, V].
    """
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
    stats = functools.partial(_chunk_stats, temperature=temperature)
    skipped = lambda h, w, y: (jnp.zeros((c,), jnp.float32),) * 3

    # The skip sits inside the rematerialised function: its residuals are then its inputs,
    # and the scan keeps the loop-invariant w_DV once. (With the cond outside, the cond's own
    # residuals made w_DV a per-chunk output of the scan: a [chunks, D, V] copy.)
    @jax.checkpoint
    def chunk(read, h_CD, w_DV, tgt_C):
        return jax.lax.cond(read, stats, skipped, h_CD, w_DV, tgt_C)

    def body(_, xs):
        k, h_CD, tgt_C = xs
        return None, chunk(k * c < count, h_CD, w_DV, tgt_C)

    _, stats_KC = jax.lax.scan(body, None, (jnp.arange(num_chunks), h_KCD, tgt_KC))
    keep_BT = read_N.reshape(b, t)

    def unsort(x_KC):
        x_BT = jnp.zeros((n,), jnp.float32).at[order_N].set(x_KC.reshape(-1)[:n]).reshape(b, t)
        return jnp.where(keep_BT, x_BT, 0.0)

    return TokenStats(*(unsort(x) for x in stats_KC))


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
