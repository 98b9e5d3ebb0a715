"""Stage 0 data: raw text → documents → one EOS-joined token stream → fixed-length blocks → batches.

    docs = load_documents("tinyshakespeare.txt")      # .txt / .jsonl / folder / datasets object / list
    train, held_out = split_documents(docs, eval_fraction=0.1, seed=0)
    it = PretrainBatches(train, "byte", max_length=256, batch_size=32, seed=0)
    batch = next(it)  # input_ids int32[B, T]; attention_mask int32[B, T], loss_mask float32[B, T]: ones
    saved = it.state()  # {"epoch": int, "blocks": int}: goes into a checkpoint
    it = PretrainBatches(train, "byte", max_length=256, batch_size=32, seed=0, state=saved)  # same next batch

Packing: every document is tokenised without special tokens (a literal "<eos>" in the text stays
text), its EOS token is appended, the documents are concatenated in corpus order and cut into
consecutive blocks of max_length tokens: no padding, no truncation; only the incomplete final
block of a pass is dropped (`PackReport.dropped_tokens`). Blocks may span document boundaries.

Shuffling and epochs: the block stream of epoch e goes through a shuffle buffer seeded with
[seed, e], so it is a pure function of (corpus, tokenizer, max_length, seed, e) and never holds
more than `shuffle_buffer` blocks; a corpus is only ever streamed, never materialised.

Resuming: the state is (epoch, blocks of that epoch already yielded). Restoring re-reads and
re-tokenises the epoch up to that point and discards it (fast-forward): exact, and cheap at our
sizes (Shakespeare: ~1.5 s with the byte tokenizer); a huge corpus would want a saved read offset.

Multi-host: every process reads the same global stream and keeps its contiguous row slice
[i·B/n, (i+1)·B/n) of each global batch, as `batching.batches` does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import datasets
import numpy as np

from rlhf_jax.data.records import SUPPORTED_SUFFIXES, _builder
from rlhf_jax.data.tokenizer import load_tokenizer

TEXT_SUFFIXES = (".txt", ".text", ".md")
DEFAULT_SHUFFLE_BUFFER = 10_000
_READ_CHARS = 1 << 20  # text files are read in chunks of this many characters when splitting
_TOKENIZE_DOCS, _TOKENIZE_CHARS = 256, 1 << 20  # documents per tokenizer call, at most


@dataclasses.dataclass(frozen=True)
class Documents:
    """A re-iterable corpus of text documents.

    Each `iter()` reads the source again from its first document (so an epoch is a new pass);
    empty documents are skipped. `read` must yield the same documents in the same order every
    time — do not pass a `datasets.IterableDataset` that shuffles itself.

    Attributes:
      source: the path or a description, for messages.
      read: returns a fresh iterator over the document texts.
    """

    source: str
    read: Callable[[], Iterator[str]]

    def __iter__(self) -> Iterator[str]:
        return (text for text in self.read() if text)


@dataclasses.dataclass
class PackReport:
    """Counts of one pass over a corpus, filled in while the pass is read.

    Attributes:
      documents: documents read.
      tokens: tokens read, including one EOS per document.
      blocks: full blocks produced.
      dropped_tokens: tokens of the incomplete final block (< max_length), dropped; final
        only once `complete`.
      complete: True once the pass reached the end of the corpus.
    """

    documents: int = 0
    tokens: int = 0
    blocks: int = 0
    dropped_tokens: int = 0
    complete: bool = False


# ------------------------------------------------------------------------------ documents


def load_documents(source: Any, *, text_field: str = "text", doc_separator: str | None = None) -> Documents:
    """A re-iterable corpus of documents from a file, a folder, a `datasets` object or strings.

    Args:
      source: a `.txt`/`.text`/`.md` file (UTF-8); a `.json`/`.jsonl`(.gz, …)/`.parquet`/
        `.csv`/`.arrow` file with one document per row; a folder of such files (recursively,
        sorted, hidden files ignored) or a `save_to_disk` folder (its "train" split); a
        `datasets.Dataset` or `datasets.IterableDataset` (iterated row by row, never
        materialised: use `load_dataset(..., streaming=True)` for corpora larger than memory);
        a list of strings; or `Documents` (returned as is).
      text_field: the column holding the text in row-based sources.
      doc_separator: for text files: None (default) makes each file one document; a non-empty
        string splits the file on it ("\\n\\n" = paragraphs separated by a blank line,
        "<|endoftext|>" = a dump of joined documents); pieces are kept verbatim and
        whitespace-only pieces are dropped. The file is read in chunks, not held in memory.

    Raises:
      FileNotFoundError: the path does not exist. ValueError: unsupported file type, empty
      folder, or no `text_field` column (a row whose value is not a string raises at reading,
      naming the file and the 1-based row).
    """
    if doc_separator == "":
        raise ValueError("doc_separator must be None (one document per text file) or a non-empty string")
    if isinstance(source, Documents):
        return source
    if isinstance(source, (list, tuple)):
        bad = [i for i, text in enumerate(source) if not isinstance(text, str)]
        if bad:
            raise ValueError(f"documents: item {bad[0]} is a {type(source[bad[0]]).__name__}, not a str")
        texts = tuple(source)
        return Documents(f"<{len(texts)} documents in memory>", lambda: iter(texts))
    if type(source).__module__.split(".")[0] == "datasets":
        if isinstance(source, dict):
            raise ValueError(f"source is a {type(source).__name__} with splits {list(source)}: pass one split, "
                             "e.g. ds['train']")
        name = f"<{type(source).__name__}>"
        _check_columns(name, source.column_names, text_field)
        return Documents(name, lambda: _dataset_texts(source, text_field, name))
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a path, a list of strings or a datasets object, "
                        f"got {type(source).__name__}")
    return _path_documents(Path(os.fspath(source)).expanduser(), text_field, doc_separator)


def _path_documents(path: Path, text_field: str, doc_separator: str | None) -> Documents:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ValueError(f"{path}: saved DatasetDict has no 'train' split ({list(ds)}); "
                                 "pass datasets.load_from_disk(path)[split] instead")
            ds = ds["train"]
        return load_documents(ds, text_field=text_field)
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and _file_kind(f) is not None
                       and not any(part.startswith(".") for part in f.relative_to(path).parts))
        if not files:
            raise ValueError(f"{path}: directory has no text or data files; supported endings: "
                             f"{', '.join(TEXT_SUFFIXES + SUPPORTED_SUFFIXES)}")
    elif _file_kind(path) is None:
        raise ValueError(f"{path}: unsupported file type; supported endings: "
                         f"{', '.join(TEXT_SUFFIXES + SUPPORTED_SUFFIXES)}")
    else:
        files = [path]
    data_files = [f for f in files if _file_kind(f) != "text"]
    if data_files:  # fail now, not at the first batch, when the text column is missing
        _check_columns(str(data_files[0]), _open_data_file(data_files[0]).column_names, text_field)
    return Documents(str(path), lambda: _files_texts(files, text_field, doc_separator))


def _file_kind(path: Path) -> str | None:
    """"text" for plain text files, the `datasets` builder name for data files, else None."""
    return "text" if path.name.lower().endswith(TEXT_SUFFIXES) else _builder(path)


def _open_data_file(path: Path):
    return datasets.load_dataset(_file_kind(path), data_files=str(path), split="train", streaming=True)


def _check_columns(name: str, columns: list[str] | None, text_field: str) -> None:
    if columns is not None and text_field not in columns:
        raise ValueError(f"{name}: no column {text_field!r} (text_field); columns: {list(columns)}")


def _files_texts(files: list[Path], text_field: str, doc_separator: str | None) -> Iterator[str]:
    for f in files:
        if _file_kind(f) == "text":
            yield from _text_file_texts(f, doc_separator)
        else:
            ds = _open_data_file(f)
            _check_columns(str(f), ds.column_names, text_field)
            yield from _dataset_texts(ds, text_field, str(f))


def _text_file_texts(path: Path, doc_separator: str | None) -> Iterator[str]:
    """The documents of one UTF-8 text file: the whole file, or its pieces between separators."""
    with open(path, encoding="utf-8") as f:
        if doc_separator is None:
            yield f.read()
            return
        pending = ""
        while chunk := f.read(_READ_CHARS):
            start = max(0, len(pending) - len(doc_separator) + 1)  # a separator may straddle chunks
            pending += chunk
            pieces = pending[start:].split(doc_separator)
            if len(pieces) == 1:
                continue
            pieces[0] = pending[:start] + pieces[0]
            pending = pieces.pop()
            yield from (p for p in pieces if p.strip())
        if pending.strip():
            yield pending


def _dataset_texts(ds: Any, text_field: str, name: str) -> Iterator[str]:
    """The `text_field` of every row of a `datasets` Dataset / IterableDataset, streamed."""
    if ds.column_names is not None and len(ds.column_names) > 1:
        ds = ds.select_columns([text_field])  # do not decode the other columns
    for i, row in enumerate(ds):
        text = row.get(text_field)
        if not isinstance(text, str):
            what = "missing" if text_field not in row else f"a {type(text).__name__}, not a string"
            raise ValueError(f"{name}: row {i + 1}: field {text_field!r} (text_field) is {what}")
        yield text


def split_documents(docs: Any, *, eval_fraction: float, seed: int = 0) -> tuple[Documents, Documents]:
    """Deterministic train / held-out split by document; the two sides share no document.

    A document is held out when a keyed hash of its text (blake2b, key = seed) maps below
    eval_fraction, so the split needs no pass over the corpus, streams, and puts identical
    documents on the same side. The held-out share is only ≈ eval_fraction (with few
    documents it can be far off, even empty: `pack_report` counts both sides).

    A corpus of exactly ONE document (a single text file such as Shakespeare) cannot be split
    by document; its text is split instead: the last ≈ eval_fraction of its characters,
    starting at a line start, are held out and the rest trains — two non-overlapping
    halves whose concatenation is the original text, each ending with its own EOS.

    Args:
      docs: anything `load_documents` accepts.
      eval_fraction: in [0, 1); 0 gives an empty held-out side.
      seed: the hash key; another seed gives another split.

    Returns:
      (train, held_out) `Documents`.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    docs = load_documents(docs)

    def side(held_out: bool) -> Callable[[], Iterator[str]]:
        return lambda: _split_side(docs, eval_fraction, seed, held_out)

    return (Documents(f"{docs.source} (train)", side(False)),
            Documents(f"{docs.source} (held out)", side(True)))


def _split_side(docs: Documents, eval_fraction: float, seed: int, held_out: bool) -> Iterator[str]:
    it = iter(docs)
    first, second = next(it, None), next(it, None)
    if first is None:
        return
    if second is None:  # one document: split its text (split_documents' docstring)
        cut = _tail_cut(first, eval_fraction)
        yield first[cut:] if held_out else first[:cut]
        return
    for text in itertools.chain((first, second), it):
        if (_unit_hash(text, seed) < eval_fraction) == held_out:
            yield text


def _unit_hash(text: str, seed: int) -> float:
    """A deterministic hash of `text` in [0, 1), keyed by `seed`."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def _tail_cut(text: str, eval_fraction: float) -> int:
    """Where the held-out tail of a single document starts: ≈ (1 − eval_fraction)·len, moved
    back to the start of its line when that leaves something to train on."""
    if eval_fraction == 0.0:
        return len(text)
    cut = len(text) - max(1, int(round(eval_fraction * len(text))))
    line_start = text.rfind("\n", 0, cut) + 1
    return line_start if line_start > 0 else cut


# ------------------------------------------------------------------------------ tokens and blocks


def document_tokens(docs: Any, tokenizer: Any) -> Iterator[np.ndarray]:
    """Token ids int32[L + 1] of each document: its text without special tokens, then EOS.

    Special-token strings inside the text (a literal "<|endoftext|>") are tokenised as plain
    text, so EOS appears exactly at document ends. Documents are tokenised a few hundred (or
    ~1M characters) per tokenizer call.
    """
    tok = load_tokenizer(tokenizer)
    eos = tok.eos_token_id
    for group in _text_groups(load_documents(docs)):
        enc = tok(group, add_special_tokens=False, return_attention_mask=False, verbose=False,
                  split_special_tokens=True)["input_ids"]
        for ids in enc:
            out_L = np.empty(len(ids) + 1, np.int32)
            out_L[:-1] = ids
            out_L[-1] = eos
            yield out_L


def _text_groups(docs: Iterable[str]) -> Iterator[list[str]]:
    group, chars = [], 0
    for text in docs:
        group.append(text)
        chars += len(text)
        if len(group) >= _TOKENIZE_DOCS or chars >= _TOKENIZE_CHARS:
            yield group
            group, chars = [], 0
    if group:
        yield group


def pack_blocks(token_docs: Iterable[np.ndarray], max_length: int,
                report: PackReport | None = None) -> Iterator[np.ndarray]:
    """Concatenates token arrays and cuts them into consecutive blocks int32[max_length].

    Every token lands in exactly one block, in order, except the final `len % max_length`
    tokens (an incomplete block), which are dropped and counted in `report.dropped_tokens`.
    `report`, when given, is updated as the stream is read.
    """
    _check_max_length(max_length)
    report = PackReport() if report is None else report
    pending, n_pending = [], 0
    for ids_L in token_docs:
        pending.append(np.asarray(ids_L, np.int32))
        n_pending += len(ids_L)
        report.documents += 1
        report.tokens += len(ids_L)
        if n_pending >= max_length:
            flat = np.concatenate(pending)
            n_full = len(flat) - len(flat) % max_length
            for k in range(0, n_full, max_length):
                report.blocks += 1
                yield flat[k:k + max_length]
            pending, n_pending = [flat[n_full:]], len(flat) - n_full
    report.dropped_tokens = n_pending
    report.complete = True


def shuffle_blocks(blocks: Iterable[np.ndarray], buffer_size: int,
                   rng: np.random.Generator) -> Iterator[np.ndarray]:
    """A seeded shuffle buffer: a permutation of `blocks` holding at most `buffer_size` of them.

    The buffer is filled with the first `buffer_size` blocks; then each new block replaces a
    uniformly drawn buffered one, which is yielded; at the end the rest of the buffer comes
    out in a random order. A block moves earlier by at most `buffer_size` places (a local
    shuffle for a streamed corpus; a full shuffle when buffer_size >= the number of blocks).
    buffer_size <= 1 keeps the order.
    """
    if buffer_size <= 1:
        yield from blocks
        return
    buffer: list[np.ndarray] = []
    for block in blocks:
        if len(buffer) < buffer_size:
            buffer.append(block)
            continue
        j = int(rng.integers(buffer_size))
        yield buffer[j]
        buffer[j] = block
    for j in rng.permutation(len(buffer)):
        yield buffer[j]


def pack_report(docs: Any, tokenizer: Any, *, max_length: int) -> PackReport:
    """One unshuffled pass over the corpus: documents, tokens, blocks per epoch, dropped tail."""
    report = PackReport()
    for _ in pack_blocks(document_tokens(docs, tokenizer), max_length, report):
        pass
    return report


def _check_max_length(max_length: int) -> None:
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (a block needs an input and a target token), got {max_length}")


# ------------------------------------------------------------------------------ iterators


class BlockIterator:
    """Shuffled blocks int32[max_length] over epochs, resumable from `state()`.

    Epoch e yields `shuffle_blocks(pack_blocks(document_tokens(docs)), shuffle_buffer,
    default_rng([seed, e]))`: the same blocks every epoch, in an order that depends only on
    (seed, e). `report` is the `PackReport` of the pass being read (complete at its end).

    Args:
      docs: anything `load_documents` accepts (re-read every epoch).
      tokenizer: anything `load_tokenizer` accepts.
      max_length: T, tokens per block (>= 2).
      seed: the shuffle seed.
      shuffle_buffer: blocks held by the shuffle buffer; 0 keeps corpus order (evaluation).
      num_epochs: passes to make; None = forever.
      state: a `state()` dict to continue from; None starts at epoch 0.
    """

    def __init__(self, docs: Any, tokenizer: Any, *, max_length: int, seed: int = 0,
                 shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, num_epochs: int | None = None,
                 state: dict | None = None):
        _check_max_length(max_length)
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be None (forever) or >= 1, got {num_epochs}")
        self.docs = load_documents(docs)
        self.tokenizer = load_tokenizer(tokenizer)
        self.max_length, self.seed = max_length, seed
        self.shuffle_buffer, self.num_epochs = shuffle_buffer, num_epochs
        state = {"epoch": 0, "blocks": 0} if state is None else state
        self.epoch, self.blocks = int(np.asarray(state["epoch"])), int(np.asarray(state["blocks"]))
        if self.epoch < 0 or self.blocks < 0:
            raise ValueError(f"state must have epoch >= 0 and blocks >= 0, got {state}")
        self.report = PackReport()
        self._stream: Iterator[np.ndarray] | None = None

    def state(self) -> dict[str, int]:
        """{"epoch": e, "blocks": k}: k blocks of epoch e have been yielded. Plain ints."""
        return {"epoch": self.epoch, "blocks": self.blocks}

    def epoch_blocks(self, epoch: int, report: PackReport | None = None) -> Iterator[np.ndarray]:
        """All blocks of epoch `epoch`, in that epoch's order (a pure function of the settings)."""
        blocks = pack_blocks(document_tokens(self.docs, self.tokenizer), self.max_length, report)
        return shuffle_blocks(blocks, self.shuffle_buffer, np.random.default_rng([self.seed, epoch]))

    def __iter__(self) -> "BlockIterator":
        return self

    def __next__(self) -> np.ndarray:
        while self.num_epochs is None or self.epoch < self.num_epochs:
            if self._stream is None:
                self.report = PackReport()
                self._stream = self.epoch_blocks(self.epoch, self.report)
                skipped = sum(1 for _ in itertools.islice(self._stream, self.blocks))  # fast-forward
                if skipped < self.blocks:
                    raise ValueError(
                        f"state {self.state()} is past the end of epoch {self.epoch} ({skipped} blocks): "
                        "was it saved with another corpus, tokenizer or max_length?")
            block = next(self._stream, None)
            if block is not None:
                self.blocks += 1
                return block
            if self.blocks == 0:
                raise ValueError(
                    f"{self.docs.source}: {self.report.tokens} tokens in {self.report.documents} documents "
                    f"give no complete block of max_length={self.max_length}")
            self.epoch, self.blocks, self._stream = self.epoch + 1, 0, None
        raise StopIteration


class PretrainBatches:
    """Batches of `batch_size` blocks, this process's row slice of each; resumable.

    Each `next()` returns {"input_ids": int32[B/n, T], "attention_mask": int32[B/n, T],
    "loss_mask": float32[B/n, T]}, the keys `sft.sft_loss` reads. Real rows have attention and
    loss mask all ones (the loss reads loss_mask[:, 1:], so every token but a block's first is
    a target). Batches run on across epoch boundaries, so no block is skipped. At the end of
    the last epoch (num_epochs given), a short final batch is dropped (drop_last) or filled
    with padding rows: pad ids, attention_mask and loss_mask 0.

    Args:
      docs, tokenizer, max_length, seed, shuffle_buffer, num_epochs, state: as `BlockIterator`.
      batch_size: global B, divisible by process_count.
      drop_last: drop (True) or pad (False) a short final batch.
      process_index, process_count: this process and the number of processes.
    """

    def __init__(self, docs: Any, tokenizer: Any, *, max_length: int, batch_size: int, seed: int = 0,
                 shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, num_epochs: int | None = None,
                 state: dict | None = None, drop_last: bool = True, process_index: int = 0,
                 process_count: int = 1):
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
        if batch_size < 1 or batch_size % process_count:
            raise ValueError(f"batch_size must be positive and divisible by process_count={process_count}, "
                             f"got {batch_size}")
        self.blocks = BlockIterator(docs, tokenizer, max_length=max_length, seed=seed,
                                    shuffle_buffer=shuffle_buffer, num_epochs=num_epochs, state=state)
        self.batch_size, self.drop_last = batch_size, drop_last
        self.process_index, self.process_count = process_index, process_count

    def state(self) -> dict[str, int]:
        """The block iterator's state after the batches returned so far (`BlockIterator.state`)."""
        return self.blocks.state()

    def __iter__(self) -> "PretrainBatches":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = list(itertools.islice(self.blocks, self.batch_size))  # the global batch
        if not rows or (len(rows) < self.batch_size and self.drop_last):
            raise StopIteration
        size = self.batch_size // self.process_count
        mine = rows[self.process_index * size:(self.process_index + 1) * size]
        T = self.blocks.max_length
        ids_BT = np.full((size, T), self.blocks.tokenizer.pad_token_id, np.int32)
        mask_BT = np.zeros((size, T), np.int32)
        if mine:
            ids_BT[:len(mine)] = np.stack(mine)
            mask_BT[:len(mine)] = 1
        return {"input_ids": ids_BT, "attention_mask": mask_BT, "loss_mask": mask_BT.astype(np.float32)}


# ------------------------------------------------------------------------------ baseline


def unigram_cross_entropy(train_tokens: Iterable[np.ndarray], eval_tokens: Iterable[np.ndarray],
                          vocab_size: int) -> float:
    """Per-token cross-entropy (nats) on `eval_tokens` of a unigram model fitted on `train_tokens`.

    p(v) = (count_train(v) + 1) / (N_train + vocab_size) (add-one smoothing, so unseen tokens
    have a finite cost). The floor a language model must beat: e.g. pass
    `document_tokens(train, tok)` and `(b["input_ids"][:, 1:] for b in eval_batches)` (the
    targets the SFT loss scores), with vocab_size = len(tok).

    Args:
      train_tokens, eval_tokens: iterables of integer arrays of any shape, ids in [0, vocab_size).
      vocab_size: V.
    """
    counts_V = np.zeros(vocab_size, np.int64)
    for ids in train_tokens:
        counts_V += np.bincount(_checked_ids(ids, vocab_size), minlength=vocab_size)
    logp_V = np.log(counts_V + 1.0) - np.log(counts_V.sum() + float(vocab_size))
    total, n = 0.0, 0
    for ids in eval_tokens:
        ids_N = _checked_ids(ids, vocab_size)
        total -= float(logp_V[ids_N].sum())
        n += ids_N.size
    if n == 0:
        raise ValueError("eval_tokens holds no tokens")
    return total / n


def _checked_ids(ids: Any, vocab_size: int) -> np.ndarray:
    ids_N = np.ravel(np.asarray(ids)).astype(np.int64)
    if ids_N.size and (ids_N.min() < 0 or ids_N.max() >= vocab_size):
        raise ValueError(f"token ids must be in [0, vocab_size={vocab_size}), got {ids_N.min()}..{ids_N.max()}")
    return ids_N
