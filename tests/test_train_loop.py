"""The config-driven loop for SFT and the RM: outputs, resumption after SIGKILL, gradient
accumulation, sharding on 8 fake devices and 2 processes, freezing, normalisation."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from rlhf_jax import reward_model
from rlhf_jax.config_lib import load_config
from rlhf_jax.train.logging import read_metrics
from rlhf_jax.train.loop import run

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree"]
BAD_WORDS = ["mud", "ash", "rot", "dust"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A synthetic task: the completion repeats the prompt's word; the preferred response
    repeats it, the rejected one repeats a word from a 'bad' list."""
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    sft, pref = [], []
    for i in range(96):
        w = WORDS[i % len(WORDS)]
        prompt = f"say {w} {i % 7}:"
        sft.append({"prompt": prompt, "completion": f" {w} {w}"})
        other = BAD_WORDS[rng.integers(0, len(BAD_WORDS))]
        pref.append({"prompt": prompt, "chosen": f" {w} {w}", "rejected": f" {other} {other}"})
    (d / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    (d / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pref))
    return d


def tiny_config(stage, data_path, **changes):
    c = load_config(ROOT / "configs" / "common.py")  # the base fields every stage has
    c.stage = stage
    c.model.tiny.update(dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64))
    c.data.path = str(data_path)
    c.data.max_length = 32
    c.data.eval_fraction = 0.125
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 2
    c.train.batch_size = 8
    c.train.num_steps = 8
    c.train.log_every = 1
    c.train.eval_every = 4
    c.train.checkpoint_every = 4
    c.train.progress_bar = False
    c.rm.max_responses = 8
    c.rm.max_pairs = 4
    c.mesh.num_devices = 1
    c.update_from_flattened_dict(changes)
    return c


def _overrides(cfg) -> list[str]:
    """The config as --config.x=y flags for the CLI (scalars only)."""
    flat = []

    def walk(prefix, node):
        for k, v in node.items():
            if hasattr(v, "items"):
                walk(f"{prefix}{k}.", v)
            elif v is not None:
                flat.append(f"--config.{prefix}{k}={v}")
    walk("", cfg)
    return flat


def _losses(workdir):
    return [(m["step"], m["train/loss"]) for m in read_metrics(workdir) if "train/loss" in m]


def _params(workdir):
    return load_file(Path(workdir) / "model" / "model.safetensors")


def test_sft_run_writes_outputs_and_learns(data_dir, tmp_path):
    cfg = tiny_config("sft", data_dir / "sft.jsonl", **{"train.num_steps": 20, "optimizer.lr": 1e-2})
    summary = run(cfg, tmp_path)
    for name in ("config.json", "metrics.jsonl", "summary.json", "model/config.json", "model/model.safetensors",
                 "model/tokenizer.json"):
        assert (tmp_path / name).exists(), name
    assert any(p.name.startswith("events") for p in (tmp_path / "tensorboard").iterdir())
    assert json.loads((tmp_path / "config.json").read_text())["stage"] == "sft"
    losses = [loss for _, loss in _losses(tmp_path)]
    assert len(losses) == 20 and losses[-1] < 0.5 * losses[0]
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows if "eval/loss" in r] == [0, 4, 8, 12, 16, 20]
    evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
    assert evals[-1] < evals[0]
    assert summary["eval/perplexity"] == pytest.approx(np.exp(summary["eval/loss"]), rel=1e-5)
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 20


def test_gradient_accumulation_matches_one_big_batch(data_dir, tmp_path):
    big = run(tiny_config("sft", data_dir / "sft.jsonl", **{"train.num_steps": 4}), tmp_path / "big")
    acc = run(tiny_config("sft", data_dir / "sft.jsonl", **{"train.num_steps": 4, "train.batch_size": 4,
                                                            "train.grad_accum": 2}), tmp_path / "acc")
    np.testing.assert_allclose([l for _, l in _losses(tmp_path / "acc")], [l for _, l in _losses(tmp_path / "big")],
                               atol=1e-5)
    assert acc["eval/loss"] == pytest.approx(big["eval/loss"], abs=1e-5)


def test_eight_devices_fsdp_and_data_match_one_device(data_dir, tmp_path):
    run(tiny_config("sft", data_dir / "sft.jsonl"), tmp_path / "one")
    run(tiny_config("sft", data_dir / "sft.jsonl", **{"mesh.num_devices": 0, "mesh.data": 2, "mesh.fsdp": 4}),
        tmp_path / "eight")
    one, eight = _losses(tmp_path / "one"), _losses(tmp_path / "eight")
    assert [s for s, _ in one] == [s for s, _ in eight] == list(range(1, 9))
    np.testing.assert_allclose([l for _, l in eight], [l for _, l in one], atol=1e-5)


def test_freezing_by_regex_keeps_other_parameters(data_dir, tmp_path):
    run(tiny_config("sft", data_dir / "sft.jsonl", **{"train.num_steps": 2, "train.trainable": r"layers\.1\."}),
        tmp_path / "frozen")
    run(tiny_config("sft", data_dir / "sft.jsonl", **{"train.num_steps": 2, "optimizer.lr": 0.0}), tmp_path / "init")
    frozen, init = _params(tmp_path / "frozen"), _params(tmp_path / "init")
    for name in init:
        same = np.array_equal(frozen[name], init[name])
        assert same == (".layers.1." not in name), name


def test_rm_learns_preferences_and_is_normalised(data_dir, tmp_path):
    # Plus one pair that is the same 32 tokens on both sides once truncated: dropped, counted.
    twins = {"prompt": "say it:", "chosen": " " + "la " * 20 + "good", "rejected": " " + "la " * 20 + "bad"}
    prefs = tmp_path / "pref.jsonl"
    prefs.write_text((data_dir / "pref.jsonl").read_text() + json.dumps(twins) + "\n")
    cfg = tiny_config("rm", prefs, **{"train.num_steps": 30, "train.eval_every": 10})
    summary = run(cfg, tmp_path)
    assert summary["eval/accuracy"] > 0.8  # chance is 0.5
    assert {"rm/gain", "rm/bias"} <= set(summary)
    assert summary["dropped_pairs"] == {"identical_after_truncation": 1} and summary["eval/ties"] == 0.0
    # The saved RM carries its normalisation: held-out responses score mean 0, std 1.
    from rlhf_jax import data as data_lib
    from rlhf_jax import sharding
    from rlhf_jax.models import load_pretrained

    import jax
    rm = load_pretrained(tmp_path / "model", mesh=sharding.make_mesh(devices=jax.devices()[:1]))
    assert rm.heads == ("reward",)
    tok = data_lib.load_tokenizer(tmp_path / "model")
    ds = data_lib.preference_dataset(prefs, tok, max_length=32)
    _, held_out = data_lib.split(ds, eval_fraction=0.125, seed=0)
    scores = []
    for b in data_lib.batches(held_out, max_responses=8, max_pairs=4, shuffle=False, drop_last=False):
        real = b["attention_mask"].sum(-1) > 0
        scores.append(np.asarray(reward_model.scores(rm, b["input_ids"], b["attention_mask"]))[real])
    scores = np.concatenate(scores)
    assert abs(scores.mean()) < 1e-3 and abs(scores.std() - 1) < 1e-3


def test_packed_rm_run_matches_the_padded_run(data_dir, tmp_path):
    """Packed responses (over 4 devices, 2 accumulated micro-batches a step, so rows are
    rounded to a multiple of 4 and a step's micro-batches share a row count) train the same RM
    as one response per padded row: the same losses, evaluation and normalisation."""
    from rlhf_jax import data as data_lib

    kw = {"train.num_steps": 6, "train.eval_every": 3, "train.grad_accum": 2, "data.max_length": 64}
    ds = data_lib.preference_dataset(data_dir / "pref.jsonl", "byte", max_length=64)
    assert next(data_lib.batches(ds, max_responses=8, max_pairs=4, pack=True))["input_ids"].shape[0] < 8
    padded = run(tiny_config("rm", data_dir / "pref.jsonl", **kw), tmp_path / "padded")
    packed = run(tiny_config("rm", data_dir / "pref.jsonl", **kw, **{"data.packing": True, "mesh.num_devices": 4}),
                 tmp_path / "packed")
    np.testing.assert_allclose([l for _, l in _losses(tmp_path / "packed")],
                               [l for _, l in _losses(tmp_path / "padded")], atol=1e-5)
    for key in ("eval/loss", "eval/accuracy", "rm/gain", "rm/bias"):
        assert packed[key] == pytest.approx(padded[key], rel=2e-3, abs=1e-4), key  # gain = 1/std of close scores


def _cli(args, env=None, timeout=240):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "rlhf_jax.main", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


_KILLER = """
import os, signal, sys, time
from rlhf_jax.train import logging as lg
write = lg.MetricWriter.write
def killing_write(self, step, metrics):
    row = write(self, step, metrics)
    if step >= int(os.environ["KILL_AT_STEP"]):
        # Let the asynchronous save of the earlier checkpoint land, then die with no clean-up.
        done = self.path.parent / "checkpoints" / os.environ["WAIT_FOR_CHECKPOINT"]
        deadline = time.time() + 60
        while not done.is_dir() and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
    return row
lg.MetricWriter.write = killing_write
from absl import app
from rlhf_jax import main
sys.argv = ["rlhf_jax.main", *sys.argv[1:]]
app.run(main.main)
"""


def test_sigkilled_run_resumes_to_identical_parameters(data_dir, tmp_path):
    cfg = tiny_config("sft", data_dir / "sft.jsonl", **{"train.num_steps": 10, "train.checkpoint_every": 3,
                                                        "train.eval_every": 0})
    flags = ["--config", "configs/sft.py", *_overrides(cfg)]
    straight = _cli([*flags, "--workdir", str(tmp_path / "straight")])
    assert straight.returncode == 0, straight.stderr[-3000:]

    workdir = tmp_path / "killed"
    env = dict(os.environ, KILL_AT_STEP="5", WAIT_FOR_CHECKPOINT="3")
    killed = subprocess.run([sys.executable, "-c", _KILLER, *flags, "--workdir", str(workdir)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=240)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (workdir / "model").exists()  # it really died mid-training
    resumed = _cli([*flags, "--workdir", str(workdir)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "at step 3" in resumed.stdout

    a, b = _params(tmp_path / "straight"), _params(workdir)
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name  # bitwise
    assert _losses(workdir) == _losses(tmp_path / "straight")


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_with_four_devices_each_match_one_device(data_dir, tmp_path):
    cfg = tiny_config("sft", data_dir / "sft.jsonl", **{"train.eval_every": 0, "train.checkpoint_every": 4})
    baseline = _cli(["--config", "configs/sft.py", *_overrides(cfg), "--workdir", str(tmp_path / "one")])
    assert baseline.returncode == 0, baseline.stderr[-3000:]

    cfg.mesh.num_devices, cfg.mesh.data, cfg.mesh.fsdp = 0, 2, 4
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    procs = [subprocess.Popen([sys.executable, "-m", "rlhf_jax.main", "--config", "configs/sft.py",
                               *_overrides(cfg), "--workdir", str(tmp_path / "two"),
                               "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
                               f"--config.distributed.coordinator_address=localhost:{port}"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "processes=2" in outs[0][0] and "devices=8" in outs[0][0]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [s for s, _ in two] == list(range(1, 9))
    np.testing.assert_allclose([l for _, l in two], [l for _, l in one], atol=1e-5)


def test_config_errors_name_the_field(data_dir, tmp_path):
    with pytest.raises(ValueError, match="optimizer.decay"):
        run(tiny_config("sft", data_dir / "sft.jsonl", **{"optimizer.decay": "exp"}), tmp_path / "a")
    with pytest.raises(ValueError, match="train.trainable"):
        run(tiny_config("sft", data_dir / "sft.jsonl", **{"train.trainable": "nothing_matches"}), tmp_path / "b")
    with pytest.raises(ValueError, match="stage"):
        run(tiny_config("no_such_stage", data_dir / "sft.jsonl"), tmp_path / "c")
