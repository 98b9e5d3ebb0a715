"""The alignment-tax evaluation: `eval_lm.lm_loss` against a hand computation, and the full
recipe (pretrain → SFT → comparisons → RM → PPO and PPO-ptx on pretraining blocks) at a tiny
size, with the held-out LM loss of every model in its summary."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import eval_lm, sharding
from rlhf_jax.config_lib import load_config
from rlhf_jax.data import load_tokenizer
from rlhf_jax.models import ModelConfig, Transformer, save_pretrained
from rlhf_jax.ppo.trainer import run_ppo
from rlhf_jax.reward_functions import count_substring
from rlhf_jax.train.logging import read_metrics
from rlhf_jax.train.pretrain import corpora

ROOT = Path(__file__).resolve().parents[1]
TEXT = "".join(f"Line {i}: to be or not to be, that is the question.\n" for i in range(60))


def test_lm_loss_matches_a_hand_computation(tmp_path):
    tok = load_tokenizer("byte")
    cfg = ModelConfig(model_type="llama", vocab_size=len(tok), hidden_size=32, num_layers=1, num_heads=4,
                      num_kv_heads=2, head_dim=8, mlp_dim=64, max_position_embeddings=64,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    model = sharding.create_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(1), heads=("lm",)), mesh)
    save_pretrained(model, tmp_path / "model", tokenizer=tok)
    (tmp_path / "text.txt").write_text(TEXT)
    train, _ = corpora(tmp_path / "text.txt", tok, max_length=16)
    batches = eval_lm.text_batches(train, tok, 16, 5)  # the last batch has padding rows
    got = eval_lm.lm_loss(tmp_path / "model", batches)

    ids = np.concatenate([b["input_ids"][b["attention_mask"][:, 0] > 0] for b in batches])  # real rows
    logits = np.asarray(model(ids, np.ones_like(ids)), np.float64)[:, :-1]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    targets = np.take_along_axis(logp, ids[:, 1:, None], -1)
    total, n = -targets.sum(), targets.size
    assert got["tokens"] == n == len(train) * 15
    assert got["loss"] == pytest.approx(total / n, rel=1e-5)
    assert got["perplexity"] == pytest.approx(np.exp(total / n), rel=1e-5)


def test_ppo_ptx_mixes_pretraining_blocks(tmp_path):
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}:"}) + "\n" for i in range(16)))
    (tmp_path / "corpus.txt").write_text(TEXT)
    c = load_config(ROOT / "configs" / "ppo.py")
    c.model.init = "tiny"
    c.model.tiny.update(dict(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64))
    c.update_from_flattened_dict({
        "data.path": str(tmp_path / "prompts.jsonl"), "data.max_prompt_length": 8, "data.max_length": 32,
        "sampling.max_new_tokens": 6, "ppo.batch_size": 8, "ppo.num_minibatches": 2, "ppo.ppo_epochs": 1,
        "ppo.num_updates": 2, "ppo.kl_target": 0.0, "ppo.sample_every": 0, "ppo.ptx_coef": 1.0,
        "ppo.ptx_format": "pretrain", "ppo.ptx_data": str(tmp_path / "corpus.txt"), "ppo.ptx_batch_size": 4,
        "train.progress_bar": False, "train.checkpoint_every": 0, "train.tensorboard": False,
        "mesh.num_devices": 1})
    run_ppo(c, tmp_path / "ppo", reward_functions=[count_substring("a")])
    ptx = [m["ppo/ptx_loss"] for m in read_metrics(tmp_path / "ppo")]
    assert len(ptx) == 2 and all(2.0 < v < 7.0 for v in ptx)  # ≈ ln 259 for an untrained byte model
