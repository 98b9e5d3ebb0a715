"""Tests of the stage 0 data layer: documents, split, packing, shuffling, resuming, batches."""

import gzip
import json
import math

import numpy as np
import pytest

from rlhf_jax import data

EOS = 258  # the byte tokenizer's <eos>

CORPUS = [
    "The quick brown fox.",
    "jumps over\nthe lazy dog",
    "Hé 你好 <eos> is text here",  # a literal "<eos>" must stay bytes
    "x",
    "A somewhat longer document, so that a block can span three documents at once.",
    "",  # empty documents are skipped
    "last one!",
]


def b(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def stream_of(texts) -> np.ndarray:
    """The expected token stream: each non-empty document's bytes, then EOS."""
    return np.asarray([t for text in texts if text for t in b(text) + [EOS]], np.int32)


@pytest.fixture(scope="module")
def tok():
    return data.load_tokenizer("byte")


def blocks_of(it) -> list[tuple[int, ...]]:
    return [tuple(block.tolist()) for block in it]


# ------------------------------------------------------------------------------ packing


@pytest.mark.parametrize("max_length", [2, 7, 16, 1000])
def test_packing_keeps_every_token_once_and_reports_the_tail(tok, max_length):
    expected = stream_of(CORPUS)
    report = data.PackReport()
    blocks = list(data.pack_blocks(data.document_tokens(CORPUS, tok), max_length, report))
    assert all(block.dtype == np.int32 and block.shape == (max_length,) for block in blocks)
    assert report.complete and report.documents == 6 and report.tokens == len(expected)
    assert report.blocks == len(blocks) == len(expected) // max_length
    assert report.dropped_tokens == len(expected) % max_length
    joined = np.concatenate(blocks + [expected[len(expected) - report.dropped_tokens:]])
    np.testing.assert_array_equal(joined, expected)
    assert data.pack_report(CORPUS, "byte", max_length=max_length) == report


def test_document_boundaries_get_eos_and_only_there(tok):
    docs = list(data.document_tokens(CORPUS, tok))
    assert [d.tolist() for d in docs] == [b(t) + [EOS] for t in CORPUS if t]
    stream = np.concatenate(list(data.pack_blocks(docs, 3)))
    ends = np.cumsum([len(t.encode()) + 1 for t in CORPUS if t]) - 1
    ends = ends[ends < len(stream)]
    np.testing.assert_array_equal(np.flatnonzero(stream == EOS), ends)


def test_gpt2_documents_end_with_endoftext(shared_data):
    gpt2 = data.load_tokenizer(str(shared_data / "gpt2_tokenizer"))
    docs = list(data.document_tokens(["Hello world,", "a<|endoftext|>b"], gpt2))
    assert docs[0].tolist() == gpt2.encode("Hello world,") + [50256]
    assert docs[1][-1] == 50256 and 50256 not in docs[1][:-1].tolist()


# ------------------------------------------------------------------------------ sources


def test_text_file_whole_and_split_on_separator(tmp_path, monkeypatch):
    text = "para one\nline\n\npara two\n\n\n\n  \n\npara three\n"
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    assert list(data.load_documents(tmp_path / "a.txt")) == [text]
    want = ["para one\nline", "para two", "para three\n"]
    assert list(data.load_documents(tmp_path / "a.txt", doc_separator="\n\n")) == want
    # A separator straddling the read chunks is still found.
    monkeypatch.setattr("rlhf_jax.data.pretrain._READ_CHARS", 3)
    assert list(data.load_documents(tmp_path / "a.txt", doc_separator="\n\n")) == want
    docs = data.load_documents(tmp_path / "a.txt", doc_separator="<|endoftext|>")
    assert list(docs) == [text] and list(docs) == [text]  # re-iterable


def test_jsonl_folder_and_datasets_objects(tmp_path):
    import datasets

    rows = [{"text": t, "id": i} for i, t in enumerate(CORPUS)]
    (tmp_path / "corpus").mkdir()
    with open(tmp_path / "corpus" / "a.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[:3])
    with gzip.open(tmp_path / "corpus" / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[3:])
    (tmp_path / "corpus" / "c.txt").write_text("tail text")
    want = [t for t in CORPUS if t]
    assert list(data.load_documents(tmp_path / "corpus" / "a.jsonl")) == want[:3]
    assert list(data.load_documents(tmp_path / "corpus")) == want + ["tail text"]
    ds = datasets.Dataset.from_list([{"body": t} for t in CORPUS])
    assert list(data.load_documents(ds, text_field="body")) == want
    ds.save_to_disk(str(tmp_path / "saved"))
    assert list(data.load_documents(tmp_path / "saved", text_field="body")) == want


def test_streamed_iterable_dataset_gives_the_same_blocks_as_the_list():
    import datasets

    def gen():
        yield from ({"text": t, "meta": len(t)} for t in CORPUS * 5)

    stream = datasets.IterableDataset.from_generator(gen)
    assert isinstance(stream, datasets.IterableDataset)
    kw = dict(max_length=9, seed=3, shuffle_buffer=6, num_epochs=2)
    want = blocks_of(data.BlockIterator(CORPUS * 5, "byte", **kw))
    assert len(want) == 2 * (len(stream_of(CORPUS * 5)) // 9)
    assert blocks_of(data.BlockIterator(stream, "byte", **kw)) == want
    train, held = data.split_documents(stream, eval_fraction=0.3, seed=1)
    l_train, l_held = data.split_documents(CORPUS * 5, eval_fraction=0.3, seed=1)
    assert list(train) == list(l_train) and list(held) == list(l_held)


def test_user_errors_name_the_argument_or_file(tmp_path):
    import datasets

    with pytest.raises(FileNotFoundError, match="missing.txt"):
        data.load_documents(tmp_path / "missing.txt")
    (tmp_path / "rows.jsonl").write_text('{"body": "a"}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl: no column 'text' \(text_field\)"):
        data.load_documents(tmp_path / "rows.jsonl")
    with pytest.raises(ValueError, match="no column 'content'"):
        data.load_documents(datasets.Dataset.from_list([{"text": "a"}]), text_field="content")
    (tmp_path / "nulls.jsonl").write_text('{"text": "a"}\n{"text": null}\n')
    with pytest.raises(ValueError, match=r"nulls.jsonl: row 2: field 'text' \(text_field\) is a NoneType"):
        list(data.load_documents(tmp_path / "nulls.jsonl"))
    (tmp_path / "x.docx").write_text("")
    with pytest.raises(ValueError, match="x.docx: unsupported file type"):
        data.load_documents(tmp_path / "x.docx")
    with pytest.raises(ValueError, match="doc_separator"):
        data.load_documents(CORPUS, doc_separator="")
    for bad in (1, 1.5, -0.1):
        with pytest.raises(ValueError, match="eval_fraction"):
            data.split_documents(CORPUS, eval_fraction=bad)
    with pytest.raises(ValueError, match="max_length must be >= 2"):
        data.BlockIterator(CORPUS, "byte", max_length=1)
    with pytest.raises(ValueError, match="give no complete block of max_length=4096"):
        next(data.BlockIterator(CORPUS, "byte", max_length=4096))
    with pytest.raises(ValueError, match="divisible by process_count=3"):
        data.PretrainBatches(CORPUS, "byte", max_length=8, batch_size=4, process_count=3)


# ------------------------------------------------------------------------------ held-out split


def test_split_by_document_is_disjoint_deterministic_and_complete():
    docs = [f"document number {i}: " + "word " * (i % 7) for i in range(400)] + ["dup"] * 3
    train, held = data.split_documents(docs, eval_fraction=0.25, seed=0)
    train_l, held_l = list(train), list(held)
    assert not set(train_l) & set(held_l)
    assert sorted(train_l + held_l) == sorted(docs)
    assert 0.15 < len(held_l) / len(docs) < 0.35
    assert (list(train), list(held)) == (train_l, held_l)  # a second pass agrees
    assert list(data.split_documents(docs, eval_fraction=0.25, seed=1)[1]) != held_l
    train0, held0 = data.split_documents(docs, eval_fraction=0.0)
    assert list(train0) == docs and list(held0) == []


def test_single_document_is_split_into_a_line_aligned_tail():
    text = "".join(f"line {i:03d} of the only document\n" for i in range(100))
    train, held = data.split_documents([text], eval_fraction=0.1)
    (t,), (h,) = list(train), list(held)
    assert t + h == text and t.endswith("\n") and h.startswith("line ")
    assert abs(len(h) - 0.1 * len(text)) <= len("line 000 of the only document\n")
    # No token of the held-out tail is ever in a training block.
    blocks = np.concatenate(list(data.BlockIterator(train, "byte", max_length=8, num_epochs=1, shuffle_buffer=0)))
    assert len(blocks) <= len(t) + 1 and t.startswith(bytes(blocks[blocks != EOS].tolist()).decode())


# ------------------------------------------------------------------------------ shuffling and resuming


def test_shuffle_buffer_is_a_seeded_permutation():
    kw = dict(max_length=5, shuffle_buffer=4)
    ordered = blocks_of(data.BlockIterator(CORPUS, "byte", shuffle_buffer=0, max_length=5, num_epochs=1))
    epochs = blocks_of(data.BlockIterator(CORPUS, "byte", seed=0, num_epochs=2, **kw))
    e0, e1 = epochs[:len(ordered)], epochs[len(ordered):]
    assert sorted(e0) == sorted(e1) == sorted(ordered)
    assert e0 != ordered and e0 != e1  # shuffled, and differently each epoch
    other = blocks_of(data.BlockIterator(CORPUS, "byte", seed=1, num_epochs=1, **kw))
    assert sorted(other) == sorted(ordered) and other != e0
    assert blocks_of(data.BlockIterator(CORPUS, "byte", seed=0, num_epochs=1, **kw)) == e0
    # Streaming bound: a block comes out at most buffer_size places before its stream position.
    position = {block: i for i, block in enumerate(ordered)}
    assert all(position[block] - i <= 4 for i, block in enumerate(e0))
    rng = np.random.default_rng(0)
    assert sorted(data.shuffle_blocks(range(50), 100, rng)) == list(range(50))


def test_resumed_batches_equal_uninterrupted_ones_across_epochs():
    kw = dict(max_length=6, batch_size=4, seed=7, shuffle_buffer=5, num_epochs=3)
    full = list(data.PretrainBatches(CORPUS, "byte", **kw))
    per_epoch = len(stream_of(CORPUS)) // 6
    assert len(full) == 3 * per_epoch // 4 and per_epoch % 4  # batches straddle epoch ends
    for n in (0, 1, per_epoch // 4, per_epoch // 4 + 1, len(full) - 1):
        it = data.PretrainBatches(CORPUS, "byte", **kw)
        for _ in range(n):
            next(it)
        state = json.loads(json.dumps(it.state()))  # plain ints: survives any checkpoint format
        resumed = list(data.PretrainBatches(CORPUS, "byte", **kw, state=state))
        assert len(resumed) == len(full) - n
        for got, want in zip(resumed, full[n:]):
            for key in ("input_ids", "attention_mask", "loss_mask"):
                np.testing.assert_array_equal(got[key], want[key])
    it = data.PretrainBatches(CORPUS, "byte", **kw)
    for _ in range(per_epoch // 4 + 1):
        next(it)
    assert it.state() == {"epoch": 1, "blocks": 4 * (per_epoch // 4 + 1) - per_epoch}
    with pytest.raises(ValueError, match="past the end of epoch 0"):
        next(data.BlockIterator(CORPUS, "byte", max_length=6, state={"epoch": 0, "blocks": per_epoch + 1}))


def test_batch_keys_dtypes_process_slices_and_padded_last_batch():
    kw = dict(max_length=6, batch_size=4, shuffle_buffer=3, num_epochs=1)
    glob = list(data.PretrainBatches(CORPUS, "byte", **kw))
    b0 = glob[0]
    assert set(b0) == {"input_ids", "attention_mask", "loss_mask"}
    assert (b0["input_ids"].dtype, b0["attention_mask"].dtype, b0["loss_mask"].dtype) == (
        np.int32, np.int32, np.float32)
    assert b0["input_ids"].shape == (4, 6) and b0["attention_mask"].all() and b0["loss_mask"].all()
    parts = [list(data.PretrainBatches(CORPUS, "byte", **kw, process_index=i, process_count=2)) for i in (0, 1)]
    for g, p0, p1 in zip(glob, *parts, strict=True):
        np.testing.assert_array_equal(np.concatenate([p0["input_ids"], p1["input_ids"]]), g["input_ids"])
    padded = list(data.PretrainBatches(CORPUS, "byte", **kw, drop_last=False))
    n_blocks = len(stream_of(CORPUS)) // 6
    assert len(padded) == math.ceil(n_blocks / 4) > len(glob)
    last = padded[-1]
    rows = n_blocks % 4
    assert last["attention_mask"][:rows].all() and not last["attention_mask"][rows:].any()
    assert (last["input_ids"][rows:] == 256).all() and not last["loss_mask"][rows:].any()


# ------------------------------------------------------------------------------ baseline and real data


def test_unigram_cross_entropy_by_hand():
    train = [np.array([0, 0, 1])]  # counts 2, 1, 0 over V=3 → p = 3/6, 2/6, 1/6
    got = data.unigram_cross_entropy(train, [np.array([[0, 2]])], vocab_size=3)
    assert got == pytest.approx(-(math.log(3 / 6) + math.log(1 / 6)) / 2)
    with pytest.raises(ValueError, match="vocab_size=3"):
        data.unigram_cross_entropy(train, [np.array([3])], vocab_size=3)


def test_tinyshakespeare_block_count_split_and_unigram(shared_data, tok):
    path = shared_data / "tinyshakespeare.txt"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    n_bytes = path.stat().st_size
    report = data.pack_report(path, tok, max_length=256)
    assert (report.documents, report.tokens) == (1, n_bytes + 1)  # one document + its EOS
    assert report.blocks == (n_bytes + 1) // 256 and report.dropped_tokens == (n_bytes + 1) % 256
    train, held = data.split_documents(path, eval_fraction=0.1)
    t_report, h_report = (data.pack_report(d, tok, max_length=256) for d in (train, held))
    assert t_report.tokens + h_report.tokens == n_bytes + 2  # the split adds one EOS
    assert h_report.tokens == pytest.approx(0.1 * n_bytes, rel=0.01)
    assert t_report.blocks + h_report.blocks in (report.blocks - 1, report.blocks)
    ce = data.unigram_cross_entropy(data.document_tokens(train, tok), data.document_tokens(held, tok), len(tok))
    assert 2.5 < ce < 3.5  # English characters: ~4.1-4.4 bits ≈ 3 nats per byte
