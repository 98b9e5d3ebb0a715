"""The sweep launcher: a grid crossed with seeds, names from the overrides, commands for a
scheduler, finished runs skipped, and one table of mean ± std over seeds."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_jax import sweep

ROOT = Path(__file__).resolve().parents[1]


def test_expand_crosses_the_grid_the_list_and_the_seeds():
    runs = sweep.expand({"a": [1, 2], "b": ["x"]}, runs=[{"c": True}], seeds=[0, 1])
    assert runs == [{"c": True, "a": 1, "b": "x", "seed": 0}, {"c": True, "a": 1, "b": "x", "seed": 1},
                    {"c": True, "a": 2, "b": "x", "seed": 0}, {"c": True, "a": 2, "b": "x", "seed": 1}]
    assert sweep.parse_grid(["optimizer.lr=1e-3,0.01", "ppo.kl.adaptive=True,False"]) == {
        "optimizer.lr": [0.001, 0.01], "ppo.kl.adaptive": [True, False]}
    assert sweep.run_name({"optimizer.lr": 0.001, "seed": 1}) == "optimizer.lr=0.001,seed=1"
    with pytest.raises(ValueError, match="FIELD=V1,V2"):
        sweep.parse_grid(["optimizer.lr"])


def test_gather_means_and_stds_over_seeds(tmp_path):
    runs = sweep.expand({"lr": [1, 2]}, seeds=[0, 1])
    for o, score in zip(runs, [1.0, 3.0, 10.0, 10.0]):
        d = tmp_path / sweep.run_name(o)
        d.mkdir()
        (d / "summary.json").write_text(json.dumps({"score": score, "stage": "sft"}))
    rows, text = sweep.gather(tmp_path, runs, ["score"])
    assert len(rows) == 4
    assert "| 1 | 2 | 2.000 ± 1.414 |" in text and "| 2 | 2 | 10.000 ± 0.000 |" in text
    assert len(list(csv.DictReader((tmp_path / "runs.csv").open()))) == 4
    assert (tmp_path / "sweep.png").exists()


def test_two_by_two_grid_of_tiny_runs_then_a_second_call_skips_them(tmp_path):
    if not (ROOT / "../shared/data/alpaca_en_demo.json").exists():
        pytest.skip("../shared/data/alpaca_en_demo.json is absent")
    args = ["--config", "configs/sft.py", "--workdir", str(tmp_path), "--grid", "optimizer.lr=0.001,0.003",
            "--seeds", "0,1", "--metrics", "train/loss",
            "--set", "train.num_steps=3", "--set", "train.eval_every=0", "--set", "optimizer.warmup_steps=1",
            "--set", "data.max_length=48", "--set", "train.progress_bar=False"]
    cmd = [sys.executable, "-m", "rlhf_jax.sweep", *args]
    printed = subprocess.run([*cmd, "--print"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0 and len(printed.stdout.strip().splitlines()) == 4
    assert "--config.optimizer.lr=0.003 " in printed.stdout and "--config.seed=1" in printed.stdout
    assert "--config.train.num_steps=3" in printed.stdout
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    table = (tmp_path / "sweep.md").read_text()
    assert table.splitlines()[0] == "| optimizer.lr | seeds | train/loss |"
    assert "| 0.001 | 2 | " in table and "| 0.003 | 2 | " in table  # two settings of lr, two seeds each
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and second.stdout.count("finished, skipped") == 4
    assert (tmp_path / "optimizer.lr=0.003,seed=1" / "summary.json").exists()
