"""Orbax checkpoints of the train state: asynchronous saves, keep the last N, resume the latest.

A run killed mid-save leaves an unfinished step directory that Orbax never lists, so a
restart resumes from the last complete checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from rlhf_jax.train.logging import drop_metrics_after


class Checkpointer:
    def __init__(self, directory: Path, keep: int = 3, async_save: bool = True):
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, force: bool = False) -> None:
        self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

    def restore(self, state, step: int | None = None):
        """Restores into the structure, shapes, dtypes and shardings of `state`."""
        step = self.latest_step() if step is None else step
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def resume(ckpt: Checkpointer, state, workdir: Path, unit: str = "step"):
    """(state, start): the newest checkpoint that restores, and its step; (state, 0) for a new run.

    A step that cannot be read (a truncated file, a run killed mid-write) is skipped with a
    message naming it, and the one before is tried. metrics.jsonl keeps only the rows up to
    the resumed step: a killed run may have logged past it, and those steps are run again.
    """
    steps = sorted(ckpt.manager.all_steps(), reverse=True)
    problems = []
    for step in steps:
        try:
            restored = ckpt.restore(state, step)
        except Exception as e:  # noqa: BLE001 — Orbax and its file readers raise many kinds
            problems.append(f"{unit} {step}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            if jax.process_index() == 0:
                print(f"checkpoint {Path(ckpt.manager.directory) / str(step)} cannot be restored "
                      f"({problems[-1]}); trying the one before")
            continue
        if jax.process_index() == 0:
            print(f"resuming from {Path(workdir) / 'checkpoints'} at {unit} {step}")
            drop_metrics_after(workdir, step)
        return restored, int(step)
    if steps:
        raise ValueError(f"{Path(workdir) / 'checkpoints'}: no checkpoint can be restored into this run "
                         f"({'; '.join(problems)}); move the folder away to start afresh")
    if jax.process_index() == 0:
        drop_metrics_after(workdir, -1)  # a run killed before its first checkpoint starts afresh
    return state, 0
