"""What a command does with a workdir that already holds a run: `run.json` records the config
a workdir was started with and whether that run finished.

- no `run.json`: a new run;
- same config, finished: nothing to do (the earlier results are kept as they are);
- same config, not finished: resume from the checkpoints;
- another config: refused, naming the fields that differ, unless `--overwrite` (which deletes
  the earlier run's files first) or the earlier run left no results (it failed at start-up, say
  on a mistyped path, and the corrected command simply starts). Fields that change how a run is executed but not what it
  computes (`OPERATIONAL`) may differ, so a run can resume on another machine or mesh.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from rlhf_jax.fileio import atomic_write_text
from rlhf_jax.train import cluster as cluster_lib

RUN_FILE = "run.json"
# Dotted field names (or prefixes ending in '.') that may differ between a run and its resumption.
OPERATIONAL = ("train.progress_bar", "train.tensorboard", "train.async_checkpointing", "train.keep_checkpoints",
               "train.checkpoint_every", "distributed.", "mesh.", "sharding_rules", "labeler.poll_s",
               "labeler.wait_timeout_s")


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _plain(cfg_dict: dict) -> dict:
    return json.loads(json.dumps(cfg_dict, default=str))  # tuples -> lists, as the file holds them


def _operational(field: str) -> bool:
    return any(field.startswith(p) if p.endswith(".") else field == p or field.startswith(p + ".")
               for p in OPERATIONAL)


def config_diff(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(field, old value, new value) for every field that differs, operational ones left out."""
    a, b = flatten(_plain(old)), flatten(_plain(new))
    missing = object()
    return [(k, a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))
            if a.get(k, missing) != b.get(k, missing) and not _operational(k)]


def _describe(diff) -> str:
    def show(v):
        return "(absent)" if not isinstance(v, (str, int, float, bool, list, dict, type(None))) else json.dumps(v)

    shown = [f"{k} ({show(a)} -> {show(b)})" for k, a, b in diff[:6]]
    more = f" and {len(diff) - 6} more" if len(diff) > 6 else ""
    return ", ".join(shown) + more


def _holds_results(workdir: Path) -> bool:
    """Metrics, a summary, a checkpoint step or comparisons anywhere under `workdir`."""
    for p in workdir.rglob("*"):
        if p.name in ("metrics.jsonl", "summary.json") or (p.parent.name == "checkpoints" and p.is_dir()):
            return True
        if p.parent.name == "comparisons" and p.is_file():
            return True
    return False


def _clear(workdir: Path) -> None:
    for p in workdir.iterdir():
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _is_main(cfg_dict: dict) -> bool:
    """Process 0 of a multi-process run, read from the config, or with `num_processes=0` from the
    launcher's environment: this runs before `jax.distributed.initialize`, which must come before
    anything touches a JAX backend."""
    dist = cfg_dict.get("distributed") or {}
    if cluster_lib.requested_processes(dist) == cluster_lib.AUTO:
        info = cluster_lib.current_cluster()
        return info is None or info.process_id == 0
    return int(dist.get("process_id", 0) or 0) == 0


def begin(cfg_dict: dict, workdir: str | Path, overwrite: bool = False) -> bool:
    """Checks `workdir` against the config before anything is loaded; returns True when the
    same run already finished there (nothing to do). Raises ValueError naming the differing
    fields when the workdir holds another run and `overwrite` is False."""
    workdir = Path(workdir)
    path = workdir / RUN_FILE
    if path.exists() and not overwrite:
        try:
            record = json.loads(path.read_text())
            old = record["config"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path} cannot be read ({type(e).__name__}); pass --overwrite to start this "
                             f"workdir afresh, or use another --workdir") from None
        diff = config_diff(old, cfg_dict)
        if diff and _holds_results(workdir):
            raise ValueError(f"--workdir {workdir} holds a run with another config: {_describe(diff)}; use a new "
                             f"--workdir, or --overwrite to delete that run and start afresh")
        if not diff:
            return bool(record.get("finished"))
    if _is_main(cfg_dict):
        if overwrite and (path.exists() or (workdir / "config.json").exists()):
            # Only a directory that a run made is emptied, never one that merely exists.
            print(f"--overwrite: deleting the earlier run in {workdir}")
            _clear(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"config": _plain(cfg_dict), "started": time.time(), "finished": None},
                                           indent=2, sort_keys=True))
    return False


def finished(workdir: str | Path) -> bool:
    """Whether `workdir` holds a run that finished (its run.json says so)."""
    try:
        return bool(json.loads((Path(workdir) / RUN_FILE).read_text()).get("finished"))
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def finish(cfg_dict: dict, workdir: str | Path) -> None:
    """Marks the run in `workdir` finished (a rerun with the same config then does nothing)."""
    path = Path(workdir) / RUN_FILE
    if not _is_main(cfg_dict) or not path.exists():
        return
    record = json.loads(path.read_text())
    record["finished"] = time.time()
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True))
