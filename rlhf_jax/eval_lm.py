"""Held-out language-modelling loss of a saved model: the measure of the alignment tax.

    loss = lm_loss("runs/recipe/round_1/ppo/model", text_batches(corpus, tok, 128, 32))

`lm_loss` is the mean next-token NLL (nats per target token) over the batches' loss-mask
tokens: every token but a block's first on packed pretraining text, the response tokens on
SFT demonstrations. Comparing a policy's loss with the SFT model's on the same held-out
batches gives the alignment tax of RL fine-tuning (InstructGPT §3.5, PPO-ptx).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from rlhf_jax import data as data_lib
from rlhf_jax import sharding as sharding_lib
from rlhf_jax.data.pretrain import PretrainBatches
from rlhf_jax.models import load_frozen
from rlhf_jax.sft import sft_loss
from rlhf_jax.train.pretrain import Corpus

_KEYS = ("input_ids", "attention_mask", "loss_mask")


def text_batches(corpus: Corpus, tokenizer, max_length: int, batch_size: int) -> list[dict]:
    """Every block of a (held-out) corpus once, in corpus order; the last batch padded."""
    return list(PretrainBatches(corpus.docs, tokenizer, max_length=max_length, batch_size=batch_size,
                                shuffle_buffer=0, num_epochs=1, drop_last=False))


def demo_batches(dataset: data_lib.Dataset, batch_size: int) -> list[dict]:
    """Every SFT example once, in order; the last batch padded (loss mask 0)."""
    return [{k: b[k] for k in _KEYS} for b in data_lib.batches(dataset, batch_size=batch_size, shuffle=False,
                                                                  drop_last=False, num_epochs=1)]


def _nll_program(model_def):
    def nll(params, batch):
        total, n_tokens, _ = sft_loss(model_def.merge(params), batch)
        return total, n_tokens

    return jax.jit(nll)


def lm_loss(model_path: str | Path, batches: Iterable[dict]) -> dict:
    """{"loss": mean NLL per target token, "perplexity", "tokens"} of the model directory
    `model_path` (a stage's `model/`) on `batches` (sums and counts, so batches weigh by tokens)."""
    return lm_losses(model_path, {"": batches})[""]


def lm_losses(model_path: str | Path, sets: dict[str, Iterable[dict]]) -> dict[str, dict]:
    """`lm_loss` of one model on each named set of batches, the model loaded once."""
    mesh = sharding_lib.make_mesh(devices=jax.devices()[:1])
    model_def, params, _ = load_frozen(dict(init="pretrained", path=str(model_path)), heads=("lm",), mesh=mesh)
    program = _nll_program(model_def)
    placed = NamedSharding(mesh, P())
    out = {}
    for name, batches in sets.items():
        total, n_tokens = 0.0, 0.0
        for b in batches:
            s, n = program(params, {k: jax.device_put(np.asarray(b[k]), placed) for k in _KEYS})
            total, n_tokens = total + float(s), n_tokens + float(n)
        if n_tokens == 0:
            raise ValueError(f"lm_loss: the batches{f' of {name}' if name else ''} hold no target tokens")
        out[name] = {"loss": total / n_tokens, "perplexity": math.exp(total / n_tokens), "tokens": int(n_tokens)}
    return out
