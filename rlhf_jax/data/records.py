"""Reading raw rows with `datasets`, and the bad-row policy shared by all formats.

`load_records` turns a local file, a directory of files, or a hub name into plain Python
rows (`list[dict]`) and remembers which file each row came from, so a bad row can be
reported as `file, row N` (1-based) in one clear error. A file `datasets` cannot read (e.g.
a malformed JSON line) is one `ValueError` naming the file and, for JSON, the 1-based line.
"""

from __future__ import annotations

import bisect
import bz2
import dataclasses
import gzip
import json
import logging
import lzma
import os
from pathlib import Path
from typing import Any, Iterable

import datasets

_log = logging.getLogger(__name__)

# File name endings → `datasets` packaged builder. Compressed JSON is handled by `datasets`.
_BUILDERS = {
    ".json": "json", ".jsonl": "json", ".json.gz": "json", ".jsonl.gz": "json",
    ".json.bz2": "json", ".jsonl.bz2": "json", ".json.xz": "json", ".jsonl.xz": "json",
    ".json.zst": "json", ".jsonl.zst": "json",
    ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow",
}
SUPPORTED_SUFFIXES = tuple(_BUILDERS)

ON_BAD_ROW = ("error", "skip")


@dataclasses.dataclass(frozen=True)
class Records:
    """Raw rows plus where they came from.

    Attributes:
      rows: the rows, as plain Python dicts (a column missing from a row reads as None).
      source: the path or hub name given to `load_records`, for messages about the whole set.
      files: (file name, number of rows) per file, in the order the rows were concatenated.
    """

    rows: list[dict[str, Any]]
    source: str
    files: tuple[tuple[str, int], ...]

    def location(self, index: int) -> tuple[str, int]:
        """(file name, 1-based row number within that file) of `rows[index]`."""
        starts = []
        total = 0
        for _, n in self.files:
            starts.append(total)
            total += n
        k = bisect.bisect_right(starts, index) - 1
        return self.files[k][0], index - starts[k] + 1

    @classmethod
    def from_rows(cls, rows: Iterable[dict[str, Any]], source: str = "<memory>") -> "Records":
        rows = list(rows)
        return cls(rows=rows, source=source, files=((source, len(rows)),))


class BadRowError(ValueError):
    """A row that cannot be used; the message names the file, the 1-based row and the field."""

    def __init__(self, file: str, row: int, field: str, reason: str, detail: str):
        self.file, self.row, self.field, self.reason, self.detail = file, row, field, reason, detail
        super().__init__(
            f"{file}: row {row}: field {field!r}: {detail} [{reason}]. Fix or remove the row, "
            "or pass on_bad_row='skip' to skip bad rows and count them."
        )


class RowProblem(Exception):
    """Raised by the row parsers; turned into `BadRowError` or a skip by `LoadReport`."""

    def __init__(self, reason: str, field: str, detail: str):
        super().__init__(detail)
        self.reason, self.field, self.detail = reason, field, detail


@dataclasses.dataclass
class LoadReport:
    """What happened to the rows of one source while building a dataset.

    Attributes:
      source: the path or hub name.
      format: the row format used (detected or given).
      rows: rows read.
      kept: rows that gave examples.
      skipped: number of skipped rows by reason (only with on_bad_row='skip').
      truncated: sequences (SFT examples, preference responses, prompts) shortened to fit
        max_length / max_prompt_length.
      pairs: preference pairs the kept rows express (before `dropped_pairs`).
      dropped_pairs: preference pairs left out by reason, e.g. "identical_after_truncation":
        chosen and rejected are the same token ids once truncated, so the pair carries no
        preference (the loss is log 2 whatever the model, and a held-out tie).
      notes: other counts worth logging (e.g. duplicate ranked responses merged).
      first_skipped: the messages of the first few skipped rows, for a log line.
    """

    source: str
    format: str = ""
    rows: int = 0
    kept: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    truncated: int = 0
    pairs: int = 0
    dropped_pairs: dict[str, int] = dataclasses.field(default_factory=dict)
    notes: dict[str, int] = dataclasses.field(default_factory=dict)
    first_skipped: list[str] = dataclasses.field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def bad_row(self, records: Records, index: int, problem: RowProblem, on_bad_row: str) -> None:
        """Raises `BadRowError` for `records.rows[index]`, or counts it when skipping."""
        file, row = records.location(index)
        error = BadRowError(file, row, problem.field, problem.reason, problem.detail)
        if on_bad_row == "error":
            raise error
        self.skipped[problem.reason] = self.skipped.get(problem.reason, 0) + 1
        if len(self.first_skipped) < 5:
            self.first_skipped.append(f"{file}: row {row}: field {problem.field!r}: {problem.detail}")

    def note(self, key: str, n: int = 1) -> None:
        self.notes[key] = self.notes.get(key, 0) + n

    def drop_pairs(self, reason: str, n: int) -> None:
        """Counts `n` preference pairs left out for `reason` (see `dropped_pairs`)."""
        if n:
            self.dropped_pairs[reason] = self.dropped_pairs.get(reason, 0) + n

    def log(self) -> None:
        if self.num_skipped:
            _log.warning("%s: skipped %d of %d rows %s; first: %s", self.source, self.num_skipped,
                         self.rows, self.skipped, self.first_skipped[0])
        if self.dropped_pairs:
            _log.warning("%s: dropped %d of %d preference pairs %s: chosen and rejected are the same tokens "
                         "after truncation, so the pair carries no preference; raise max_length to keep them",
                         self.source, sum(self.dropped_pairs.values()), self.pairs, self.dropped_pairs)
        if self.truncated:
            _log.info("%s: %d examples truncated to fit the length limits", self.source, self.truncated)


def check_on_bad_row(on_bad_row: str) -> None:
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")


def _builder(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in sorted(_BUILDERS, key=len, reverse=True):
        if name.endswith(suffix):
            return _BUILDERS[suffix]
    return None


def _looks_local(path: str) -> bool:
    """True for strings that are meant as file paths rather than hub dataset names."""
    return (
        os.path.isabs(path) or path.startswith((".", "~")) or _builder(Path(path)) is not None
        or path.count("/") > 1 or os.sep != "/" and os.sep in path
    )


def _load_file(path: Path, cache_dir: str | None) -> list[dict[str, Any]]:
    builder = _builder(path)
    if builder is None:
        raise ValueError(f"{path}: unsupported file type; supported endings: {', '.join(SUPPORTED_SUFFIXES)}")
    # datasets keeps heterogeneous JSON columns (a string in one row, a list in another) as
    # a `Json` feature with the original Python values, so a wrong-type row survives
    # loading and is reported by the row checks with its row number.
    # Its JSON reader logs a bad file's error (with a 0-based row) before raising; the error
    # raised below says it once, 1-based.
    quiet = logging.getLogger("datasets.packaged_modules.json.json")
    was_disabled, quiet.disabled = quiet.disabled, True
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir)
    except datasets.exceptions.DatasetGenerationError as e:
        # `datasets` says only "An error occurred while generating the dataset", with the
        # cause (and a 0-based row) in the chained exceptions: find the line ourselves.
        where = _json_problem(path) if builder == "json" else None
        if where is None:
            cause = e.__cause__ or e.__context__ or e
            where = f"cannot be read as {builder} ({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})"
        raise ValueError(f"{path}: {where}. Fix or remove it.") from None
    finally:
        quiet.disabled = was_disabled
    return ds.to_list()


_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def _json_problem(path: Path) -> str | None:
    """'line N: what is wrong' (1-based) for the first bad line of a JSON or JSON-lines file,
    or None when Python's json reads it all (or the compression is unknown here)."""
    suffix = path.suffix.lower()
    if suffix not in _OPENERS and suffix not in (".json", ".jsonl"):
        return None  # .zst: no reader in the standard library
    opener = _OPENERS.get(suffix, open)
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, EOFError, UnicodeDecodeError, lzma.LZMAError) as e:
        return f"cannot be read as UTF-8 text ({type(e).__name__}: {e})"
    if text.lstrip().startswith("["):  # one JSON document: a list of rows
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            return f"line {e.lineno}, column {e.colno}: not valid JSON ({e.msg})"
        bad = next((k for k, row in enumerate(rows) if not isinstance(row, dict)), None)
        return None if bad is None else f"row {bad + 1}: expected a JSON object, got {type(rows[bad]).__name__}"
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {n}: not valid JSON ({e.msg} at column {e.colno})"
        if not isinstance(row, dict):
            return f"line {n}: expected a JSON object per line, got {type(row).__name__}"
    return None


def load_records(path: Any, *, split: str = "train", cache_dir: str | None = None) -> Records:
    """Reads rows from a local file or directory, a hub dataset, or passes rows through.

    Args:
      path: a file (.json, .jsonl, .jsonl.gz, .parquet, .csv, .arrow), a directory (every
        supported file in it, recursively, in sorted order; or a `save_to_disk` folder), a
        hub dataset name, a `Records`, or a list of dicts.
      split: the split to read from a hub dataset or a `save_to_disk` DatasetDict.
      cache_dir: the `datasets` cache folder (default: the `datasets` default).

    Returns:
      `Records` with the rows as plain dicts, the source name and the per-file row counts.
    """
    if isinstance(path, Records):
        return path
    if isinstance(path, (list, tuple)):
        return Records.from_rows(path)
    name = os.fspath(path)
    p = Path(name).expanduser()
    if p.is_file():
        rows = _load_file(p, cache_dir)
        return Records(rows=rows, source=name, files=((name, len(rows)),))
    if p.is_dir():

        if (p / "state.json").exists() or (p / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
            rows = ds.to_list()
            return Records(rows=rows, source=name, files=((name, len(rows)),))
        files = sorted(f for f in p.rglob("*") if f.is_file() and _builder(f) is not None
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise ValueError(f"{name}: directory has no data files; supported endings: {', '.join(SUPPORTED_SUFFIXES)}")
        all_rows: list[dict[str, Any]] = []
        counts = []
        for f in files:
            rows = _load_file(f, cache_dir)
            all_rows.extend(rows)
            counts.append((str(f), len(rows)))
        return Records(rows=all_rows, source=name, files=tuple(counts))
    if _looks_local(name):
        raise FileNotFoundError(f"{name}: no such file or directory")
    return _load_hub(name, split, cache_dir)


def _load_hub(name: str, split: str, cache_dir: str | None) -> Records:

    try:
        ds = datasets.load_dataset(name, split=split, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 — network, auth and offline errors all mean the same to the user
        cause = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(
            f"could not load dataset {name!r} from the Hugging Face Hub ({type(e).__name__}: {cause}). "
            f"It is not a local file either ({Path(name).resolve()} does not exist). Without network "
            "access (or with HF_HUB_OFFLINE=1), download the data elsewhere and pass a local path: "
            "a .json/.jsonl/.jsonl.gz/.parquet file or a directory of such files."
        ) from None
    rows = ds.to_list()
    return Records(rows=rows, source=name, files=((name, len(rows)),))
