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
    """(state, start): the latest checkpoint's state and step, or (state, 0) for a new run.

    metrics.jsonl keeps only the rows up to that step: a killed run may have logged past its
    last checkpoint, and the resumed run logs those steps again.
    """
    if ckpt.latest_step() is None:
        return state, 0
    start = int(ckpt.latest_step())
    state = ckpt.restore(state)
    if jax.process_index() == 0:
        print(f"resuming from {Path(workdir) / 'checkpoints'} at {unit} {start}")
        drop_metrics_after(workdir, start)
    return state, start
