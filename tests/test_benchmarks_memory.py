"""benchmarks/memory.py end to end on the tiny shape (--quick), SFT (the train loop's step) and
PPO (its update program), float32 and remat + bf16 + LoRA: each cell builds its stage through
the stage's entry point and compiles the real step in a subprocess; the table must have every
row, and the figures must move the way LoRA and remat move them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    for name in ("alpaca_en_demo.json", "hh_rlhf_harmless_dev.jsonl.gz"):
        if not (SHARED / name).exists():
            pytest.skip(f"needs {SHARED / name} (the stages' data; see ../shared/data/README.md)")
    out = tmp_path_factory.mktemp("memory") / "cells.json"
    proc = subprocess.run([sys.executable, "benchmarks/memory.py", "--quick", "--no-write", "--stages", "sft", "ppo",
                           "--settings", "fp32", "all", "--jobs", "2", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = {(r["stage"], r["setting"]): r for r in json.loads(out.read_text())["rows"]}
    return proc.stdout, cells


def test_the_table_has_a_row_per_cell(run):
    stdout, cells = run
    assert set(cells) == {(st, se) for st in ("sft", "ppo") for se in ("fp32", "all")}
    rows = [line for line in stdout.splitlines() if line.startswith("| SFT |") or line.startswith("| PPO update |")]
    # Two summary tables (one row per stage) and the table of every cell (one row per cell).
    assert len(rows) == 2 * 2 + 4, stdout
    for stage in ("SFT", "PPO update"):
        for setting in ("float32", "remat + bf16 + LoRA"):
            assert any(r.startswith(f"| {stage} | {setting} |") for r in rows), (stage, setting, stdout)
    assert "XLA peak estimate" in stdout and "Saved for backward" in stdout


@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_lora_trains_fewer_parameters_with_a_smaller_optimizer_state(run, stage):
    _, cells = run
    base, lora = cells[(stage, "fp32")], cells[(stage, "all")]
    assert 0 < lora["trainable"] < base["trainable"] / 4
    assert 0 < lora["opt_bytes"] < base["opt_bytes"] / 4
    # Adam: two float32 moments per trainable parameter (plus a few scalars).
    assert base["opt_bytes"] >= 2 * 4 * base["trainable"]
    # The frozen base weights are still arguments of the step.
    assert lora["argument"] > lora["params_bytes"] + lora["opt_bytes"]
    assert lora["frozen_bytes"] > base["frozen_bytes"]


@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_remat_recomputes_instead_of_saving(run, stage):
    _, cells = run
    base, remat = cells[(stage, "fp32")], cells[(stage, "all")]
    # Only each layer's input is kept: far below bf16's halving of what is saved.
    assert remat["residuals"] < base["residuals"] / 2
    assert remat["temp"] <= base["temp"]
    assert sum(remat["dots"].values()) > sum(base["dots"].values())  # the recomputed forward (and adapters)


def test_peak_is_the_documented_sum(run):
    _, cells = run
    for r in cells.values():
        assert r["peak"] == r["argument"] + r["output"] - r["alias"] + r["temp"]
        assert r["alias"] > 0  # the donated state's buffers are reused for the new state
        assert r["argument"] >= r["params_bytes"] + r["frozen_bytes"] + r["opt_bytes"]
