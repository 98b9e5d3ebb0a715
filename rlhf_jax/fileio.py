"""Crash-safe file writes shared by the comparison store, the training loop and the pipeline."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

# Temporary files carry this prefix; readers of a directory (the comparison store) skip them.
TMP_PREFIX = ".tmp-"


def _fsync_dir(path: Path) -> None:
    # The rename is only durable once the directory entry itself reaches the disk.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Writes `text` to `path` so that readers see either the old file or all of the new one.

    The temporary file lives in the same directory (a rename across file systems is not
    atomic) and carries the `.tmp-` prefix that readers of a store skip.
    """
    path = Path(path)
    tmp = path.parent / f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)
