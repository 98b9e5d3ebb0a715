"""The pretraining stage of the loop: it learns (held-out perplexity falls below the unigram
baseline), saves its data position with every checkpoint, and an interrupted run resumed from
its checkpoint ends with exactly the parameters of an uninterrupted one."""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from rlhf_jax.config_lib import load_config
from rlhf_jax.train import loop
from rlhf_jax.train.logging import read_metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A few short documents of repetitive text (easy to learn, hard for a unigram model)."""
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["the cat sat", "on the mat", "a dog ran", "to the sun"]
    docs = [" ".join(words[j] for j in rng.integers(0, 4, 12)) + "." for _ in range(40)]
    (d / "docs.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in docs))
    return d / "docs.jsonl"


def tiny_pretrain_config(path, **changes):
    c = load_config(ROOT / "configs" / "pretrain.py")
    c.model.tiny.update(dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64))
    c.data.path = str(path)
    c.data.text_field = "body"
    c.data.max_length = 32
    c.data.eval_fraction = 0.2
    c.data.shuffle_buffer = 16
    c.optimizer.lr = 1e-2
    c.optimizer.warmup_steps = 2
    c.train.batch_size = 8
    c.train.num_steps = 30
    c.train.log_every = 5
    c.train.eval_every = 10
    c.train.checkpoint_every = 10
    c.train.async_checkpointing = False
    c.train.tensorboard = False
    c.train.progress_bar = False
    c.mesh.num_devices = 1
    c.update_from_flattened_dict(changes)
    return c


def test_pretrain_learns_below_the_unigram_baseline(corpus, tmp_path):
    summary = loop.run(tiny_pretrain_config(corpus), tmp_path)
    evals = [r["eval/perplexity"] for r in read_metrics(tmp_path) if "eval/perplexity" in r]
    assert len(evals) == 4 and evals[-1] < 0.5 * evals[0]
    assert summary["eval/perplexity"] < 0.8 * summary["eval/unigram_perplexity"]
    assert summary["stage"] == "pretrain" and summary["train_examples"] > 0  # blocks per epoch
    assert (tmp_path / "model" / "model.safetensors").exists()
    # The data position of each checkpoint: 8 blocks a step, across epoch boundaries.
    per_epoch = summary["train_examples"]
    for step in (10, 20, 30):
        saved = json.loads((tmp_path / "data_state" / f"{step}.json").read_text())
        assert saved == {"epoch": 8 * step // per_epoch, "blocks": 8 * step % per_epoch}


class _Stop(Exception):
    pass


def test_interrupted_pretrain_resumes_to_identical_parameters(corpus, tmp_path, monkeypatch):
    cfg = tiny_pretrain_config(corpus, **{"train.num_steps": 12, "train.checkpoint_every": 5,
                                          "train.eval_every": 0})
    loop.run(cfg, tmp_path / "straight")

    original = loop.Runtime.to_global
    seen = []

    def dies_at_step_8(self, arrays, stacked=False):  # after the checkpoint of step 5
        if stacked and len(seen) == 7:
            raise _Stop
        seen.append(1) if stacked else None
        return original(self, arrays, stacked)

    monkeypatch.setattr(loop.Runtime, "to_global", dies_at_step_8)
    with pytest.raises(_Stop):
        loop.run(cfg, tmp_path / "resumed")
    monkeypatch.setattr(loop.Runtime, "to_global", original)
    assert not (tmp_path / "resumed" / "model").exists()
    assert json.loads((tmp_path / "resumed" / "data_state" / "5.json").read_text())["blocks"] > 0
    loop.run(cfg, tmp_path / "resumed")

    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    losses = [[(r["step"], r["train/loss"]) for r in read_metrics(tmp_path / d) if "train/loss" in r]
              for d in ("straight", "resumed")]
    assert losses[0] == losses[1]
