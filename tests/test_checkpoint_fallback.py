"""A truncated file in the newest checkpoint: the run resumes from the step before and says
which step it skipped and why; with no readable step it stops with one clear error."""

import json
from pathlib import Path

import pytest

from rlhf_jax.config_lib import load_config
from rlhf_jax.train.loop import run

ROOT = Path(__file__).resolve().parents[1]


def _config(data, **changes):
    c = load_config(ROOT / "configs" / "common.py")
    c.stage = "sft"
    c.model.tiny.update(dict(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64))
    c.data.path = str(data)
    c.data.max_length = 24
    c.data.eval_fraction = 0.0
    c.train.batch_size = 8
    c.train.num_steps = 8
    c.train.log_every = 1
    c.train.checkpoint_every = 4
    c.train.async_checkpointing = False
    c.train.progress_bar = False
    c.train.tensorboard = False
    c.mesh.num_devices = 1
    c.update_from_flattened_dict(changes)
    return c


def _truncate_all(step_dir: Path) -> None:
    for f in step_dir.rglob("*"):
        if f.is_file() and f.stat().st_size > 2:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def test_truncated_latest_checkpoint_falls_back(tmp_path, capsys):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}:", "completion": " aa"}) + "\n" for i in range(64)))
    work = tmp_path / "run"
    run(_config(data, **{"train.num_steps": 8}), work)
    _truncate_all(work / "checkpoints" / "8")
    capsys.readouterr()
    summary = run(_config(data, **{"train.num_steps": 12}), work)
    out = capsys.readouterr().out
    assert "checkpoints/8 cannot be restored" in out and "at step 4" in out
    assert summary["steps"] == 12
    steps = [json.loads(line)["step"] for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 12 and steps.count(5) == 1

    for step in (4, 12):
        _truncate_all(work / "checkpoints" / str(step))
    with pytest.raises(ValueError, match="no checkpoint can be restored"):
        run(_config(data, **{"train.num_steps": 16}), work)
