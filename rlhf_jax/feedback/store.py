"""A crash-safe directory of comparisons (prompt + K responses) and their labels.

Layout of a store directory::

    DIR/store.json                 format marker {"format": "rlhf_jax.comparisons", "version": 1}
    DIR/items/<ns>-<hex>.jsonl     one file per `add_items` call, one item per line
    DIR/labels/<label id>.json     one file per label
    DIR/.lock                      held (flock) only while `add_items` checks ids and writes

Every file is written to a `.tmp-*` file in the same directory, fsynced, renamed over its
final name with `os.replace` and the directory is fsynced. A reader only ever sees complete
files, a batch of items appears all at once or not at all, and two people labeling at the
same time write different files, so they never conflict. A process killed mid-write leaves
at most a `.tmp-*` file, which every reader ignores (`remove_stale_tmp` deletes old ones).
Committed files are never rewritten, which is why readers can cache them by name.

Item::

    {"id": str, "prompt": str | [{"role", "content"}, ...], "responses": [str, ...  K >= 2],
     "meta": {...}}

`meta` is free-form JSON (sampling round, policy checkpoint, temperature, ...). A list prompt
is a conversation (a `messages` prompt: the turns a chat model answered, as
`rlhf_jax.chat` stores them); exporting it needs a `render` that turns it into text.

Label::

    {"id": str, "item_id": str, "labeler": str, "time": ISO-8601 UTC,
     "kind": "choice" | "ranking" | "tie" | "skip", "ranking": [int, ...] | None}

`ranking` holds ORIGINAL response indices (positions in `item["responses"]`), best first:

- "ranking": a full permutation of range(K); every ordered pair in it is a preference.
- "choice": only the winner is known. Stored as `[winner, *others]` with the others in
  ascending index order; the only claim is `ranking[0]` beats each of `ranking[1:]`, the
  order among `ranking[1:]` means nothing. `add_label` accepts `[winner]` or any full
  permutation starting with the winner and normalises to that form. For K = 2 a choice
  and a ranking carry the same information.
- "tie": all K responses judged equally good; `ranking` is None.
- "skip": the labeler declined (unclear prompt, both unusable, ...); `ranking` is None.

Any label, skips and ties included, takes the item off that labeler's `unlabeled` queue.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import fcntl
import itertools
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from rlhf_jax.fileio import TMP_PREFIX, atomic_write_text  # noqa: F401  (part of this module's API)

__all__ = [
    "KINDS",
    "ComparisonStore",
    "atomic_write_text",
    "normalize_ranking",
    "preference_pairs",
    "read_preferences",
    "validate_item",
]

KINDS = ("choice", "ranking", "tie", "skip")
FORMAT_NAME = "rlhf_jax.comparisons"
FORMAT_VERSION = 1
_ITEM_KEYS = {"id", "prompt", "responses", "meta"}


def _utc_now_iso() -> str:
    # Microseconds so that labels written in quick succession still order by time.
    now = dt.datetime.now(dt.timezone.utc)
    return now.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _is_committed(name: str, suffix: str) -> bool:
    return not name.startswith(TMP_PREFIX) and name.endswith(suffix)


def validate_item(item: Any, where: str = "item") -> dict[str, Any]:
    """Returns a normalised copy of one item, or raises ValueError naming the bad field.

    A missing `id` is filled in with a fresh hex id, a missing `meta` with {}.
    """
    if not isinstance(item, Mapping):
        raise ValueError(f"{where}: expected a dict, got {type(item).__name__}")
    unknown = set(item) - _ITEM_KEYS
    if unknown:
        raise ValueError(
            f"{where}: unknown field(s) {sorted(unknown)}; put extra data under 'meta'")
    item_id = item.get("id", uuid.uuid4().hex)
    if not isinstance(item_id, str) or not item_id.strip():
        raise ValueError(f"{where}.id: expected a non-empty string, got {item_id!r}")
    prompt = item.get("prompt")
    if isinstance(prompt, list):
        prompt = _check_messages(prompt, f"{where}.prompt")
    elif not isinstance(prompt, str):
        raise ValueError(f"{where}.prompt: expected a string or a list of messages, got {type(prompt).__name__}")
    responses = item.get("responses")
    if not isinstance(responses, (list, tuple)) or len(responses) < 2:
        raise ValueError(f"{where}.responses: expected a list of at least 2 strings")
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            raise ValueError(
                f"{where}.responses[{i}]: expected a string, got {type(r).__name__}")
    meta = item.get("meta", {})
    if not isinstance(meta, Mapping):
        raise ValueError(f"{where}.meta: expected a dict, got {type(meta).__name__}")
    try:
        meta = json.loads(json.dumps(meta))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}.meta: not JSON-serialisable ({e})") from None
    return {"id": item_id, "prompt": prompt, "responses": list(responses), "meta": meta}


def _check_messages(messages: list, where: str) -> list[dict[str, str]]:
    if not messages:
        raise ValueError(f"{where}: the conversation is empty")
    out = []
    for i, m in enumerate(messages):
        if (not isinstance(m, Mapping) or set(m) != {"role", "content"} or not isinstance(m["role"], str)
                or not isinstance(m["content"], str)):
            raise ValueError(f"{where}[{i}]: expected {{'role': str, 'content': str}}, got {m!r:.80}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def normalize_ranking(kind: str, ranking: Any, num_responses: int) -> list[int] | None:
    """Checks a label's `ranking` against its `kind` and returns the stored form.

    See the module docstring for what each kind stores. Raises ValueError naming `kind` or
    `ranking`.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    if kind in ("tie", "skip"):
        if ranking not in (None, []):
            raise ValueError(f"ranking: must be empty for kind {kind!r}, got {ranking!r}")
        return None
    if not isinstance(ranking, (list, tuple)):
        raise ValueError(f"ranking: expected a list of response indices for kind {kind!r}, "
                         f"got {ranking!r}")
    # bool is an int subclass; True as an index is almost certainly a bug upstream.
    if any(not isinstance(r, int) or isinstance(r, bool) for r in ranking):
        raise ValueError(f"ranking: expected integer response indices, got {ranking!r}")
    if any(not 0 <= r < num_responses for r in ranking):
        raise ValueError(
            f"ranking: indices must be in [0, {num_responses}), got {list(ranking)}")
    if len(set(ranking)) != len(ranking):
        raise ValueError(f"ranking: repeated index in {list(ranking)}")
    if kind == "ranking":
        if len(ranking) != num_responses:
            raise ValueError(f"ranking: kind 'ranking' needs a permutation of all "
                             f"{num_responses} indices, got {list(ranking)}")
        return list(ranking)
    if len(ranking) not in (1, num_responses):
        raise ValueError(f"ranking: kind 'choice' needs [winner] or a permutation of all "
                         f"{num_responses} indices starting with the winner, "
                         f"got {list(ranking)}")
    winner = ranking[0]
    return [winner] + [i for i in range(num_responses) if i != winner]


def preference_pairs(label: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(better, worse) original-index pairs that one label asserts; none for tie and skip."""
    ranking = label.get("ranking")
    if label["kind"] == "ranking":
        return list(itertools.combinations(ranking, 2))
    if label["kind"] == "choice":
        return [(ranking[0], loser) for loser in ranking[1:]]
    return []


class ComparisonStore:
    """Comparisons and human (or simulated) labels kept in one directory.

    Safe to use from several threads and several processes at once. Committed files are
    immutable, so each instance caches what it has parsed and only reads files it has not
    seen before.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.items_dir = self.path / "items"
        self.labels_dir = self.path / "labels"
        marker = self.path / "store.json"
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"store path {self.path} exists and is not a directory")
        self.items_dir.mkdir(parents=True, exist_ok=True)
        self.labels_dir.mkdir(exist_ok=True)
        if marker.exists():
            try:
                info = json.loads(marker.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{marker}: invalid JSON ({e})") from None
            expected = {"format": FORMAT_NAME, "version": FORMAT_VERSION}
            if not isinstance(info, dict) or {k: info.get(k) for k in expected} != expected:
                raise ValueError(f"{marker}: not a version {FORMAT_VERSION} {FORMAT_NAME} store "
                                 f"(found {info})")
        else:
            # Two processes may both create it; the content is identical, so either rename wins.
            atomic_write_text(marker, json.dumps(
                {"format": FORMAT_NAME, "version": FORMAT_VERSION}) + "\n")
        self._lock = threading.RLock()
        self._batches: dict[str, list[dict[str, Any]]] = {}
        self._items: dict[str, dict[str, Any]] = {}
        self._labels: dict[str, dict[str, Any]] = {}

    def __repr__(self) -> str:
        return f"ComparisonStore({str(self.path)!r})"

    # ---- items ----

    def _refresh_items(self) -> None:
        with self._lock:
            names = sorted(n for n in os.listdir(self.items_dir) if _is_committed(n, ".jsonl"))
            for name in names:
                if name in self._batches:
                    continue
                file = self.items_dir / name
                batch = []
                for lineno, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
                    if line.strip():
                        try:
                            batch.append(validate_item(json.loads(line), where=f"{file}:{lineno}"))
                        except json.JSONDecodeError as e:
                            raise ValueError(f"{file}:{lineno}: invalid JSON ({e})") from None
                self._batches[name] = batch
                for item in batch:
                    # add_items rejects duplicates under a lock, so a clash means a hand-copied
                    # file; the first batch (in add order) wins so ids stay stable.
                    self._items.setdefault(item["id"], item)

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        # Only add_items needs it: the id-uniqueness check and the write must be one step
        # across processes. flock is released by the kernel if the holder dies.
        with self._lock, open(self.path / ".lock", "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def add_items(self, items: Iterable[Mapping[str, Any]]) -> list[str]:
        """Adds a batch of items atomically (all or none) and returns their ids in order.

        Items without an "id" get a fresh one. Raises ValueError naming the item and field
        for a malformed item or an id that is already in the store or repeated in the batch.
        """
        batch = [validate_item(it, where=f"items[{i}]") for i, it in enumerate(items)]
        if not batch:
            return []
        seen: set[str] = set()
        for i, item in enumerate(batch):
            if item["id"] in seen:
                raise ValueError(f"items[{i}].id: {item['id']!r} repeated in this batch")
            seen.add(item["id"])
        with self._exclusive():
            self._refresh_items()
            for i, item in enumerate(batch):
                if item["id"] in self._items:
                    raise ValueError(f"items[{i}].id: {item['id']!r} is already in {self.path}")
            # Names sort in add order, which is the order items() and unlabeled() return.
            name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.jsonl"
            text = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in batch)
            atomic_write_text(self.items_dir / name, text)
            self._refresh_items()
        return [item["id"] for item in batch]

    def items(self) -> list[dict[str, Any]]:
        """All items in the order they were added (copies; mutating them changes nothing)."""
        with self._lock:
            self._refresh_items()
            # Sorted by name, i.e. by commit time: batch names come from the clock under
            # the add_items lock, whatever order this instance happened to read them in.
            return [_copy_item(item) for name in sorted(self._batches)
                    for item in self._batches[name] if self._items[item["id"]] is item]

    def get_item(self, item_id: str) -> dict[str, Any]:
        """One item by id; ValueError naming `item_id` when it is not in the store."""
        with self._lock:
            if item_id not in self._items:
                self._refresh_items()
            if item_id not in self._items:
                raise ValueError(f"item_id: unknown item {item_id!r} in {self.path}")
            return _copy_item(self._items[item_id])

    def __len__(self) -> int:
        with self._lock:
            self._refresh_items()
            return len(self._items)

    # ---- labels ----

    def add_label(self, item_id: str, labeler: str, kind: str,
                  ranking: Sequence[int] | None = None) -> dict[str, Any]:
        """Records one judgement and returns the stored label (with its new "id").

        `ranking` uses original response indices, best first; see the module docstring for
        what each kind expects. Once this returns, the label survives a crash of this process.
        Raises ValueError naming `item_id`, `labeler`, `kind` or `ranking`.
        """
        if not isinstance(item_id, str):
            raise ValueError(f"item_id: expected a string, got {item_id!r}")
        if not isinstance(labeler, str) or not labeler.strip():
            raise ValueError(f"labeler: expected a non-empty string, got {labeler!r}")
        item = self.get_item(item_id)
        label = {
            "id": uuid.uuid4().hex,
            "item_id": item_id,
            "labeler": labeler.strip(),
            "time": _utc_now_iso(),
            "kind": kind,
            "ranking": normalize_ranking(kind, ranking, len(item["responses"])),
        }
        atomic_write_text(self.labels_dir / f"{label['id']}.json",
                          json.dumps(label, ensure_ascii=False) + "\n")
        with self._lock:
            self._labels[f"{label['id']}.json"] = label
        return _copy_label(label)

    def _refresh_labels(self) -> None:
        with self._lock:
            for name in os.listdir(self.labels_dir):
                if name in self._labels or not _is_committed(name, ".json"):
                    continue
                file = self.labels_dir / name
                try:
                    self._labels[name] = json.loads(file.read_text(encoding="utf-8"))
                except json.JSONDecodeError as e:
                    # Cannot come from add_label (atomic rename), so the file was edited by hand.
                    raise ValueError(f"{file}: invalid JSON ({e})") from None

    def labels(self, item_id: str | None = None,
               labeler: str | None = None) -> list[dict[str, Any]]:
        """Labels ordered by time (oldest first), optionally only one item's or labeler's."""
        with self._lock:
            self._refresh_labels()
            out = [_copy_label(lb) for lb in self._labels.values()
                   if (item_id is None or lb["item_id"] == item_id)
                   and (labeler is None or lb["labeler"] == labeler)]
        out.sort(key=lambda lb: (lb["time"], lb["id"]))
        return out

    def latest_labels(self) -> list[dict[str, Any]]:
        """The newest label of each (item, labeler) pair, in time order.

        A labeler who labels an item again is correcting themselves, so only the newest
        judgement counts; different labelers on one item each keep their own label.
        """
        latest: dict[tuple[str, str], dict[str, Any]] = {}
        for lb in self.labels():
            latest[(lb["item_id"], lb["labeler"])] = lb
        return sorted(latest.values(), key=lambda lb: (lb["time"], lb["id"]))

    def unlabeled(self, labeler: str | None = None) -> list[dict[str, Any]]:
        """Items in add order that `labeler` has not labeled (any kind, skip included).

        With labeler=None: items nobody has labeled yet.
        """
        done = {lb["item_id"] for lb in self.labels(labeler=labeler)}
        return [item for item in self.items() if item["id"] not in done]

    # ---- export ----

    def export_preferences(self, out_path: str | os.PathLike[str], *, format: str = "pairs",
                           include_ids: bool = False, render: Callable[[dict[str, Any]], tuple[str, list[str]]]
                           | None = None) -> dict[str, int]:
        """Writes the preference data the reward-model stage reads, as JSONL; returns counts.

        One row format per file, because the reader detects the format from the columns:

        - format="pairs": {"prompt", "chosen", "rejected"} for every pair a label asserts,
          K·(K−1)/2 for a full ranking, K−1 for a choice (winner over each other response).
        - format="ranked": {"prompt", "ranked": [text, ... best first]}; a full ranking is
          one row, a choice is K−1 rows [winner, other] (the others stay unordered).

        The reader merges rows of one prompt that share a response into one comparison
        group, so both formats train the same pairs and keep a prompt's pairs in one batch.

        Policy: only each labeler's newest label of an item counts (`latest_labels`);
        several labelers on one item each contribute their own rows, so agreement adds
        weight and disagreement adds both directions. Ties and skips produce no rows. A
        pair the reader would reject carries no usable preference and is dropped: one with
        an empty (or whitespace) response or two identical texts; a text repeated within
        one item counts once, at its best-ranked place (`_text_rankings`). Rows follow item
        add order, then label time. `include_ids` adds "item_id" and "labeler" to every
        row. The file is replaced atomically.

        An item with a conversation prompt is written as `render(item)` gives it: (prompt
        text, the responses as rendered after it), e.g. `chat.template.comparison_renderer`
        (the chat template the policy saw); without `render` such an item is an error.

        Returns {"labels": labels with a preference, "no_preference": ties and skips,
        "rows": rows written, "pairs": pairs they express, "dropped_pairs": pairs left out}.
        """
        if format not in ("pairs", "ranked"):
            raise ValueError(f"format: expected 'pairs' or 'ranked', got {format!r}")
        items = {item["id"]: item for item in self.items()}
        order = {item_id: i for i, item_id in enumerate(items)}
        labels = sorted(self.latest_labels(), key=lambda lb: order[lb["item_id"]])
        counts = dict.fromkeys(("labels", "no_preference", "rows", "pairs", "dropped_pairs"), 0)
        lines = []
        for lb in labels:
            item = items[lb["item_id"]]
            prompt, texts = _prompt_and_texts(item, render)
            asserted = preference_pairs(lb)
            if not asserted:
                counts["no_preference"] += 1
                continue
            counts["labels"] += 1
            rankings = _text_rankings(lb, texts)
            if format == "pairs":
                rankings = [list(pair) for r in rankings for pair in itertools.combinations(r, 2)]
            extra = {"item_id": item["id"], "labeler": lb["labeler"]} if include_ids else {}
            for ranked in rankings:
                if format == "pairs":
                    row = {"prompt": prompt, "chosen": ranked[0], "rejected": ranked[1]}
                else:
                    row = {"prompt": prompt, "ranked": ranked}
                lines.append(json.dumps(row | extra, ensure_ascii=False))
                counts["rows"] += 1
            written = sum(len(r) * (len(r) - 1) // 2 for r in rankings)
            counts["pairs"] += written
            counts["dropped_pairs"] += len(asserted) - written
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_path, "".join(line + "\n" for line in lines))
        return counts

    # ---- maintenance ----

    def remove_stale_tmp(self, max_age_s: float = 3600.0) -> int:
        """Deletes `.tmp-*` files older than `max_age_s` seconds left by crashed writers.

        Younger ones may belong to a write still in progress in another process, so they are
        kept. Returns how many were removed.
        """
        removed = 0
        cutoff = time.time() - max_age_s
        for d in (self.path, self.items_dir, self.labels_dir):
            for name in os.listdir(d):
                if not name.startswith(TMP_PREFIX):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if (d / name).stat().st_mtime < cutoff:
                        (d / name).unlink()
                        removed += 1
        return removed


def _prompt_and_texts(item: dict[str, Any], render) -> tuple[str, list[str]]:
    """An item's prompt and responses as text: as stored, or rendered for a conversation."""
    if isinstance(item["prompt"], str):
        return item["prompt"], item["responses"]
    if render is None:
        raise ValueError(f"item {item['id']!r} has a conversation prompt: export it with render= (e.g. "
                         "rlhf_jax.chat.template.comparison_renderer(tokenizer)), or from the command line "
                         "`python -m rlhf_jax.feedback.server --store DIR --export OUT --model PATH`")
    prompt, texts = render(item)
    if len(texts) != len(item["responses"]):
        raise ValueError(f"render: gave {len(texts)} responses for item {item['id']!r}, which has "
                         f"{len(item['responses'])}")
    return prompt, list(texts)


def _text_rankings(label: Mapping[str, Any], texts: Sequence[str]) -> list[list[str]]:
    """A label's preferences as rankings of distinct, non-empty texts, best first.

    A full ranking gives one list, with each repeated text at its best-ranked place (a
    labeler who put two copies of one text apart contradicted themselves; the better
    place wins, as in the reward-model reader). A choice gives [winner, other] per other
    distinct text. Empty or whitespace responses are left out: the reader rejects them.
    """
    def usable(candidates: Iterable[str]) -> list[str]:
        out: list[str] = []
        for text in candidates:
            if text.strip() and text not in out:
                out.append(text)
        return out

    ranking = label["ranking"]
    if label["kind"] == "ranking":
        ranked = usable(texts[i] for i in ranking)
        return [ranked] if len(ranked) >= 2 else []
    winner = texts[ranking[0]]
    if not winner.strip():
        return []
    return [[winner, other] for other in usable(texts[i] for i in ranking[1:])
            if other != winner]


def _copy_item(item: dict[str, Any]) -> dict[str, Any]:
    # Strings are immutable; only the containers need copying to protect the cache.
    prompt = item["prompt"] if isinstance(item["prompt"], str) else [dict(m) for m in item["prompt"]]
    return {"id": item["id"], "prompt": prompt, "responses": list(item["responses"]),
            "meta": copy.deepcopy(item["meta"])}


def _copy_label(label: dict[str, Any]) -> dict[str, Any]:
    ranking = label["ranking"]
    return dict(label, ranking=None if ranking is None else list(ranking))


def read_preferences(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Reads an `export_preferences` file back (one dict per row), naming the bad line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e})") from None
            if "ranked" in row:
                ok = isinstance(row["ranked"], list) and len(row["ranked"]) >= 2
            else:
                ok = isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str)
            if not isinstance(row.get("prompt"), str) or not ok:
                raise ValueError(f"{path}:{lineno}: expected 'prompt' and either 'ranked' or "
                                 f"'chosen'/'rejected', got keys {sorted(row)}")
            rows.append(row)
    return rows
