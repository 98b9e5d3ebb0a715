"""Metric writers: metrics.jsonl (one JSON object per logged step), TensorBoard, summary.json.

Only process 0 writes. Files are appended, so a resumed run continues the same files, and every
row carries `time/seconds`, the run's wall time so far over all its processes (a resumed run
starts from the last logged value), so a summary read from the whole history covers the whole run.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import jax
import numpy as np
from tensorboardX import SummaryWriter

from rlhf_jax.fileio import atomic_write_text


def _plain(v):
    v = np.asarray(v)
    if v.size == 1:
        f = float(v.reshape(()))
        return f if math.isfinite(f) else str(f)
    return v.tolist()


def write_json_atomic(path: Path, obj) -> None:
    """Writes JSON so that a crash never leaves half a file."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


class MetricWriter:
    def __init__(self, workdir: Path, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self.tb = None
        earlier = [r["time/seconds"] for r in read_metrics(workdir) if "time/seconds" in r]
        self.start = time.perf_counter() - (earlier[-1] if earlier else 0.0)
        if self.enabled and tensorboard:
            self.tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, metrics: dict) -> dict:
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()},
               "time/seconds": time.perf_counter() - self.start}
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            if self.tb is not None:
                for k, v in row.items():
                    if k != "step" and isinstance(v, float):
                        self.tb.add_scalar(k, v, step)
        return row

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def last_values(workdir: str | os.PathLike) -> dict:
    """The last logged value of every metric over the whole metrics.jsonl (all processes of a
    resumed run), without `step`: what a summary reports."""
    out = {}
    for row in read_metrics(workdir):
        out.update(row)
    out.pop("step", None)
    return out


def drop_metrics_after(workdir: str | os.PathLike, step: int) -> None:
    """Keeps only metrics.jsonl rows up to `step` (a resumed run logs the later steps again)."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
