"""Supervised fine-tuning: masked next-token loss (plain pretraining is a full mask).

Loss functions return sums and counts rather than means, so gradient accumulation and
multi-device reductions give exactly the mean over the whole global batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.models import Transformer


def token_logprobs(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """log p(target) per position [B, T], float32.

    Targets at padding may be a pad id outside the vocabulary (GPT-2's added <pad>): they are
    clipped into range, since an out-of-range gather gives NaN and NaN * (mask 0) is NaN."""
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    targets_BT = jnp.clip(targets_BT, 0, logits_BTV.shape[-1] - 1)
    return jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]


def sft_loss(model: Transformer, batch: dict) -> tuple[jax.Array, jax.Array, dict]:
    """Sum of response-token NLL, the number of response tokens, and metric (sum, count) pairs.

    batch: input_ids int32[B, T], attention_mask int32[B, T], loss_mask float32[B, T] (1 on the
    tokens whose prediction counts). Position t predicts token t + 1.
    """
    ids_BT, mask_BT = batch["input_ids"], batch["attention_mask"]
    logits_BTV = model(ids_BT, mask_BT)
    logp_BT = token_logprobs(logits_BTV[:, :-1], ids_BT[:, 1:])
    weight_BT = batch["loss_mask"][:, 1:].astype(jnp.float32)
    nll_sum = -(logp_BT * weight_BT).sum()
    n_tokens = weight_BT.sum()
    correct = (jnp.argmax(logits_BTV[:, :-1], -1) == ids_BT[:, 1:]).astype(jnp.float32)
    stats = {"loss": (nll_sum, n_tokens), "token_accuracy": ((correct * weight_BT).sum(), n_tokens),
             "tokens_per_batch": (n_tokens, jnp.float32(1.0))}
    return nll_sum, n_tokens, stats


def finalize_sft_metrics(metrics: dict) -> dict:
    """Adds perplexity = exp(mean response NLL)."""
    if "loss" in metrics:
        metrics = dict(metrics, perplexity=jnp.exp(jnp.asarray(metrics["loss"])))
    return metrics
