"""The data side of the pretraining stage (stage 0) of the training loop.

The loop's SFT/RM stages draw batches of examples whose order is a pure function of (seed,
step); pretraining instead streams a corpus packed into blocks (`data.pretrain`). Its
position `{"epoch", "blocks"}` is saved next to every checkpoint, as
`workdir/data_state/<step>.json`, and a resumed run continues from the one matching the
restored step, so it sees exactly the blocks an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any

import jax

from rlhf_jax.data.pretrain import (DEFAULT_SHUFFLE_BUFFER, Documents, PackReport, PretrainBatches,
                                    document_tokens, load_documents, pack_report, split_documents,
                                    unigram_cross_entropy)
from rlhf_jax.fileio import atomic_write_text

DATA_STATE_DIR = "data_state"


@dataclasses.dataclass
class Corpus:
    """One side of the split of a text corpus, as the loop's dataset: its length is its number
    of blocks per epoch (one unshuffled pass, counted on first use)."""

    docs: Documents
    tokenizer: Any
    max_length: int

    @functools.cached_property
    def report(self) -> PackReport:
        return pack_report(self.docs, self.tokenizer, max_length=self.max_length)

    def __len__(self) -> int:
        return self.report.blocks


def corpora(path, tokenizer, *, max_length: int, eval_path: str = "", eval_fraction: float = 0.0,
            split_seed: int = 0, text_field: str = "text", doc_separator: str | None = None
            ) -> tuple[Corpus, Corpus | None]:
    """(train, held-out) corpora: `eval_path` if given, else a split by documents of
    `eval_fraction` (`split_documents`; one single document: its tail), else no held-out side."""
    read = functools.partial(load_documents, text_field=text_field, doc_separator=doc_separator or None)
    docs = read(path)
    if eval_path:
        train, held_out = docs, read(eval_path)
    elif eval_fraction > 0:
        train, held_out = split_documents(docs, eval_fraction=eval_fraction, seed=split_seed)
    else:
        train, held_out = docs, None
    return (Corpus(train, tokenizer, int(max_length)),
            None if held_out is None else Corpus(held_out, tokenizer, int(max_length)))


def pretrain_data(cfg, tokenizer) -> tuple[Corpus, Corpus | None]:
    """The stage's (train, held-out) corpora from `cfg.data`; held-out is None when it has no
    full block."""
    d = cfg.data
    train, held_out = corpora(d.path, tokenizer, max_length=d.max_length, eval_path=d.get("eval_path", ""),
                              eval_fraction=d.eval_fraction, split_seed=d.split_seed,
                              text_field=d.get("text_field", "text"), doc_separator=d.get("doc_separator"))
    if held_out is not None and len(held_out) == 0:
        print(f"[pretrain] {held_out.docs.source}: no full block of {d.max_length} tokens; no evaluation")
        held_out = None
    return train, held_out


def position(corpus: Corpus, blocks_done: int) -> dict[str, int]:
    """The iterator state after `blocks_done` blocks (batches run on across epochs)."""
    per_epoch = len(corpus)
    return {"epoch": blocks_done // per_epoch, "blocks": blocks_done % per_epoch}


def train_stream(r, start_micro: int, data_state: dict | None) -> PretrainBatches:
    """Micro-batches of shuffled blocks from `data_state` (or, without one, from the position
    of `start_micro` micro-batches, which is where it is: batches never skip a block)."""
    cfg = r.cfg
    size = int(cfg.train.batch_size)
    if data_state is None and start_micro:
        data_state = position(r.train_data, start_micro * size)
    return PretrainBatches(r.train_data.docs, r.tokenizer, max_length=int(cfg.data.max_length), batch_size=size,
                           seed=cfg.seed, state=data_state,
                           shuffle_buffer=int(cfg.data.get("shuffle_buffer", DEFAULT_SHUFFLE_BUFFER)),
                           process_index=jax.process_index(), process_count=jax.process_count())


def ptx_stream(corpus: Corpus, batch_size: int, seed: int, blocks_done: int) -> PretrainBatches:
    """PPO-ptx batches of shuffled training blocks, from the position after `blocks_done` blocks
    (a pure function of the PPO iteration, as PPO's other data)."""
    state = position(corpus, blocks_done) if blocks_done else None
    return PretrainBatches(corpus.docs, corpus.tokenizer, max_length=corpus.max_length, batch_size=batch_size,
                           seed=seed, state=state, process_index=jax.process_index(),
                           process_count=jax.process_count())


def eval_stream(r) -> PretrainBatches:
    """The held-out blocks in corpus order, once; a short last batch is padded (mask 0)."""
    return PretrainBatches(r.eval_data.docs, r.tokenizer, max_length=int(r.cfg.data.max_length),
                           batch_size=int(r.cfg.train.batch_size), shuffle_buffer=0, num_epochs=1, drop_last=False,
                           process_index=jax.process_index(), process_count=jax.process_count())


def num_batches(cfg, train: Corpus) -> int:
    """Full micro-batches in one epoch of the training corpus."""
    return len(train) // int(cfg.train.batch_size)


def save_data_state(workdir: Path, step: int, state: dict) -> None:
    """Writes the data position of checkpoint `step` (atomically)."""
    directory = Path(workdir) / DATA_STATE_DIR
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / f"{step}.json", json.dumps(state))


def load_data_state(workdir: Path, step: int) -> dict | None:
    """The data position saved with checkpoint `step`, or None."""
    path = Path(workdir) / DATA_STATE_DIR / f"{step}.json"
    return json.loads(path.read_text()) if path.exists() else None


def unigram_baseline(cfg, r) -> dict:
    """The floor a language model must beat: the held-out per-token loss of a unigram model
    fitted on the training corpus, scored on the targets the evaluation scores."""
    if r.eval_data is None:
        return {}
    targets = []
    for b in r.eval_batches():
        targets.append(b["input_ids"][:, 1:][b["loss_mask"][:, 1:] > 0])
        if cfg.train.eval_batches and len(targets) >= cfg.train.eval_batches:
            break
    loss = unigram_cross_entropy(document_tokens(r.train_data.docs, r.tokenizer), targets, len(r.tokenizer))
    return {"eval/unigram_loss": loss, "eval/unigram_perplexity": math.exp(loss),
            "train_tokens_per_epoch": r.train_data.report.tokens, "eval_blocks": len(r.eval_data)}
