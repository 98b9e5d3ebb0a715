"""A command re-run in a workdir that holds a run: the same config resumes or, once that run
finished, does nothing; another config is refused, naming the fields, unless --overwrite."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_jax.train import workdir as workdir_lib
from rlhf_jax.train.logging import MetricWriter, last_values, read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", "configs/sft.py", "--config.train.num_steps=3", "--config.train.eval_every=0",
        "--config.train.log_every=1", "--config.train.checkpoint_every=0", "--config.train.progress_bar=False",
        "--config.data.max_length=64", "--config.optimizer.warmup_steps=1"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "rlhf_jax.main", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    if not (ROOT / "../shared/data/alpaca_en_demo.json").exists():
        pytest.skip("../shared/data/alpaca_en_demo.json is absent")
    workdir = tmp_path_factory.mktemp("sft")
    out = _cli(*TINY, "--workdir", str(workdir))
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


def _snapshot(workdir: Path) -> dict:
    return {p.name: p.read_bytes() for p in (workdir / "summary.json", workdir / "metrics.jsonl", workdir / "run.json")}


def test_same_config_in_a_finished_workdir_does_nothing(finished):
    before = _snapshot(finished)
    out = _cli(*TINY, "--workdir", str(finished))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "nothing to do" in out.stdout and "stage=sft" not in out.stdout
    assert _snapshot(finished) == before


def test_another_config_is_refused_naming_the_field(finished):
    before = _snapshot(finished)
    out = _cli(*TINY, "--config.optimizer.lr=0.01", "--workdir", str(finished))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "optimizer.lr (0.001 -> 0.01)" in lines[0] and "--overwrite" in lines[0], out.stderr
    assert _snapshot(finished) == before


def test_overwrite_runs_afresh(finished, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(finished, workdir)
    out = _cli(*TINY, "--config.optimizer.lr=0.01", "--overwrite", "--workdir", str(workdir))
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((workdir / "run.json").read_text())["config"]["optimizer"]["lr"] == 0.01
    assert [r["step"] for r in read_metrics(workdir) if "train/loss" in r] == [1, 2, 3]  # not appended to


def test_operational_fields_may_differ_and_a_failed_start_leaves_nothing_to_protect(tmp_path):
    cfg = {"optimizer": {"lr": 1e-3}, "train": {"progress_bar": True}, "mesh": {"data": -1}}
    assert not workdir_lib.begin(cfg, tmp_path)
    changed = {"optimizer": {"lr": 2e-3}, "train": {"progress_bar": False}, "mesh": {"data": 2}}
    assert workdir_lib.config_diff(cfg, changed) == [("optimizer.lr", 1e-3, 2e-3)]
    assert not workdir_lib.begin(changed, tmp_path)  # no metrics, checkpoints or summary yet: starts
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match=r"optimizer.lr \(0.002 -> 0.001\)"):
        workdir_lib.begin(cfg, tmp_path)
    assert not workdir_lib.begin(dict(changed, train={"progress_bar": True}), tmp_path)  # resumes
    workdir_lib.finish(changed, tmp_path)
    assert workdir_lib.begin(changed, tmp_path)  # finished: nothing to do


def test_wall_time_and_summary_span_every_process_of_a_resumed_run(tmp_path):
    first = MetricWriter(tmp_path, tensorboard=False)
    first.write(1, {"train/loss": 2.0, "eval/loss": 3.0})
    first.write(2, {"train/loss": 1.5})
    rows = read_metrics(tmp_path)
    for r in rows:
        r["time/seconds"] += 100.0  # the first process ran for 100 s
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    second = MetricWriter(tmp_path, tensorboard=False)  # a resumed process
    row = second.write(3, {"train/loss": 1.0})
    assert 100.0 < row["time/seconds"] < 160.0
    summary = last_values(tmp_path)
    assert summary["train/loss"] == 1.0 and summary["eval/loss"] == 3.0 and summary["time/seconds"] > 100.0


def test_a_round_export_reports_dropped_pairs_and_is_kept_once_its_rm_started(tmp_path, capsys):
    from rlhf_jax.feedback.store import ComparisonStore
    from rlhf_jax.pipeline import _export_round

    store = ComparisonStore(tmp_path / "comparisons")
    ids = store.add_items([{"prompt": "p1", "responses": ["good", "bad"]},
                           {"prompt": "p2", "responses": ["same", "same"]}])
    for i in ids:
        store.add_label(i, "alice", "choice", ranking=[0, 1])
    rd = tmp_path / "round_1"
    prefs = _export_round(store, rd)
    assert "2 labels -> 1 preference pairs" in capsys.readouterr().out
    assert json.loads((rd / "preferences_counts.json").read_text())["dropped_pairs"] == 1
    first = prefs.read_text()
    (rd / "rm").mkdir()  # the round's RM started on that file
    extra = store.add_items([{"prompt": "p3", "responses": ["x", "y"]}])
    store.add_label(extra[0], "bob", "choice", ranking=[1, 0])
    assert _export_round(store, rd).read_text() == first  # a rerun keeps what the RM trains on


def test_a_run_killed_before_its_first_checkpoint_starts_its_metrics_afresh(tmp_path):
    from rlhf_jax.train.checkpoint import Checkpointer, resume

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "ppo/score": 5.0, "time/seconds": 40.0}\n')
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=1, async_save=False)
    state, start = resume(ckpt, {"w": 1}, tmp_path)
    ckpt.close()
    assert start == 0 and read_metrics(tmp_path) == []  # no duplicate steps, no stale wall time
