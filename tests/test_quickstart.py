"""The main job: the whole RLHF pipeline on the built-in task, as a newcomer runs it.

Runs `python -m rlhf_jax.main --config experiments/quickstart.py` once per module (about three
minutes on 2 cores) and checks that the gold score rises clearly from SFT to PPO; then PPO
from `configs/ppo.py` on the quickstart's SFT policy and learned RM.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rlhf_jax.train.logging import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def _cli(args, timeout=900):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the job as a user runs it: one CPU device
    return subprocess.run([sys.executable, "-m", "rlhf_jax.main", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("quickstart")
    out = _cli(["--config", "experiments/quickstart.py", "--workdir", str(workdir)])
    assert out.returncode == 0, out.stderr[-4000:]
    return workdir, out.stdout


def test_quickstart_raises_the_gold_score(quickstart):
    workdir, stdout = quickstart
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["gold_score_ppo"] > summary["gold_score_sft"] + 0.3, summary  # on a [-1, 1] scale
    assert summary["rm_eval_accuracy"] > 0.6  # labels are 10% noisy: ~0.9 is the ceiling
    assert summary["comparisons"] == summary["labels"] == 512
    for name in ("sft/model/model.safetensors", "round_1/rm/model/rlhf_jax_heads.safetensors",
                 "round_1/ppo/model/model.safetensors", "round_1/preferences.jsonl", "ppo_curves.png"):
        assert (workdir / name).exists(), name
    assert "| SFT" in stdout and "| PPO" in stdout and "gold score" in stdout


def _ppo_flags(workdir, out, *extra):
    return ["--config", "configs/ppo.py", "--workdir", str(out),
            f"--config.model.path={workdir / 'sft' / 'model'}",
            f"--config.reward.rm_path={workdir / 'round_1' / 'rm' / 'model'}",
            f"--config.data.path={workdir / 'data' / 'prompts.jsonl'}",
            "--config.ppo.batch_size=64", "--config.optimizer.lr=1e-3", "--config.sampling.max_new_tokens=40",
            "--config.train.progress_bar=False", *extra]


@pytest.fixture(scope="module")
def ppo_from_config(quickstart, tmp_path_factory):
    workdir, _ = quickstart
    out_dir = tmp_path_factory.mktemp("ppo")
    out = _cli(_ppo_flags(workdir, out_dir, "--config.ppo.num_updates=16", "--config.ppo.sample_every=8"))
    assert out.returncode == 0, out.stderr[-4000:]
    return out_dir, out.stdout


def test_ppo_config_with_learned_rm_raises_score(ppo_from_config):
    out_dir, stdout = ppo_from_config
    score = np.array([m["ppo/score"] for m in read_metrics(out_dir)])
    assert len(score) == 16
    # Iteration 0 scores the initial policy's rollouts; every later one follows updates (the
    # score can rise within two or three iterations, so a mean over the first four is no baseline).
    assert score[-4:].mean() > score[0] + 0.5, score
    assert "samples at PPO iteration 8" in stdout


def test_separate_critic_and_rm_with_its_own_tokenizer(quickstart, ppo_from_config, tmp_path):
    """The RM scores decoded text re-encoded with its tokenizer (here the same byte tokenizer,
    so the first rollout, drawn with the same key, must score as when it reads the tokens)."""
    workdir, _ = quickstart
    out = _cli(_ppo_flags(workdir, tmp_path, "--config.ppo.num_updates=2", "--config.ppo.critic=separate",
                          f"--config.reward.rm_tokenizer={workdir / 'round_1' / 'rm' / 'model'}"))
    assert out.returncode == 0, out.stderr[-4000:]
    rows = read_metrics(tmp_path)
    direct = read_metrics(ppo_from_config[0])
    assert "critic=separate" in out.stdout
    assert abs(rows[0]["ppo/rm_score"] - direct[0]["ppo/rm_score"]) < 0.05
    assert all(np.isfinite(r["ppo/value_loss"]) for r in rows)
