"""Tests of the data layer: loading, tokenizers, formats, bad rows, batches and iteration."""

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest

from rlhf_jax import data
from rlhf_jax.data import formats

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Byte tokenizer ids used in the hand-checked examples.
PAD, BOS, EOS, USER, ASSISTANT = 256, 257, 258, 260, 261


def needs_shared(name: str) -> Path:
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"real data file {path} is absent (a fresh clone has no ../shared/data)")
    return path


def b(text: str) -> list[int]:
    return list(text.encode("utf-8"))


@pytest.fixture(scope="module")
def tok():
    return data.load_tokenizer("byte")


@pytest.fixture(scope="module")
def gpt2():
    return data.load_tokenizer(str(needs_shared("gpt2_tokenizer")))


# ------------------------------------------------------------------------------ tokenizers


def test_byte_tokenizer_ids_specials_and_save(tok, tmp_path):
    text = "Hé 你\n"
    assert tok(text, add_special_tokens=False)["input_ids"] == b(text)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, len(tok)) == (PAD, BOS, EOS, 262)
    assert tok("<|user|>x<eos>", add_special_tokens=False)["input_ids"] == [USER, ord("x"), EOS]
    assert tok.decode(b(text)) == text
    tok.save_pretrained(tmp_path)
    again = data.load_tokenizer(str(tmp_path))
    assert again(text, add_special_tokens=False)["input_ids"] == b(text)
    assert (again.pad_token_id, again.eos_token_id, again.chat_template) == (PAD, EOS, tok.chat_template)


def test_gpt2_tokenizer_folder(gpt2):
    assert gpt2.encode("Hello world, this is GPT-2.") == [15496, 995, 11, 428, 318, 402, 11571, 12, 17, 13]
    # A dedicated pad token, never EOS: pad positions must be distinguishable from a real EOS.
    assert gpt2.eos_token_id == 50256 and gpt2.pad_token_id == 50257 and len(gpt2) == 50258
    assert gpt2.chat_template == data.DEFAULT_CHAT_TEMPLATE
    assert data.load_tokenizer(gpt2) is gpt2  # objects pass through


def test_gpt2_prompt_batch_is_left_padded_with_pad_id(gpt2):
    ds = data.prompt_dataset(FIXTURES / "prompts.jsonl", gpt2, max_prompt_length=8)
    batch = next(data.batches(ds, batch_size=3, shuffle=False))
    hi = [50256, gpt2.encode("Hi")[0]]  # BOS (<|endoftext|>) + "Hi"
    np.testing.assert_array_equal(batch["input_ids"][2], [50257] * 6 + hi)
    np.testing.assert_array_equal(batch["attention_mask"][2], [0] * 6 + [1, 1])


# ------------------------------------------------------------------------------ loading


def test_load_json_jsonl_parquet_and_directory(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    array = data.load_records(FIXTURES / "sft_prompt_completion.json")
    lines = data.load_records(FIXTURES / "sft_text.jsonl")
    assert array.rows[0] == {"prompt": "ab", "completion": "c"} and len(lines.rows) == 3
    assert lines.location(2) == (str(FIXTURES / "sft_text.jsonl"), 3)

    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "c", "rejected": "d"}]
    folder = tmp_path / "prefs"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), folder / "a.parquet")
    with gzip.open(folder / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps(rows[0]) + "\n")
    parquet = data.load_records(folder / "a.parquet", cache_dir=str(tmp_path / "cache"))
    assert parquet.rows == rows
    both = data.load_records(folder, cache_dir=str(tmp_path / "cache"))
    assert both.rows == rows + rows[:1]
    assert both.location(2) == (str(folder / "b.jsonl.gz"), 1)  # rows are numbered per file
    ds = data.preference_dataset(parquet, "byte", max_length=8)
    assert ds.format == "explicit" and ds.num_pairs() == 2


@pytest.mark.parametrize("name, text, where", [
    ("bad.jsonl", '{"text": "a"}\n\n{"text": "b",\n{"text": "c"}\n', "bad.jsonl: line 3: not valid JSON"),
    ("bad.jsonl.gz", '{"text": "a"}\n[1, 2]\n', "bad.jsonl.gz: line 2: expected a JSON object per line, got list"),
    ("bad.json", '[{"text": "a"},\n {"text" "b"}]', "bad.json: line 2, column 10: not valid JSON"),
])
def test_malformed_json_names_the_file_and_the_1_based_line(tmp_path, name, text, where):
    path = tmp_path / name
    if name.endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    with pytest.raises(ValueError) as err:
        data.sft_dataset(path, "byte")
    message = str(err.value)
    assert where in message and str(tmp_path) in message and "\n" not in message
    assert type(err.value) is ValueError  # not datasets' DatasetGenerationError


def test_hub_name_offline_gives_one_clear_error(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="pass a local path") as err:
        data.load_records("no-such-org/no-such-dataset")
    assert err.value.__cause__ is None and "no-such-org/no-such-dataset" in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        data.load_records("data/missing.jsonl")


@pytest.mark.parametrize("name, task, expected", [
    ("sft_text.jsonl", "sft", "text"),
    ("sft_prompt_completion.json", "sft", "prompt_completion"),
    ("sft_messages.jsonl", "sft", "messages"),
    ("sft_alpaca.json", "sft", "alpaca"),
    ("pref_explicit.jsonl", "preference", "explicit"),
    ("pref_hh.jsonl", "preference", "implicit"),
    ("pref_ranked.jsonl", "preference", "ranked"),
    ("pref_oasst.json", "preference", "alpaca_ranked"),
    ("prompts.jsonl", "prompt", "prompt"),
    ("sft_messages.jsonl", "prompt", "messages"),
    ("sft_alpaca.json", "prompt", "alpaca"),
    ("pref_hh.jsonl", "prompt", "implicit"),
])
def test_format_detection(name, task, expected):
    records = data.load_records(FIXTURES / name)
    assert formats.resolve_format(records.rows, task, "auto", records.source) == expected


def test_undetectable_or_wrong_format_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot detect the sft format.*format="):
        data.sft_dataset([{"question": "q"}], "byte")
    with pytest.raises(ValueError, match="not a sft format"):
        data.sft_dataset(FIXTURES / "sft_text.jsonl", "byte", format="ranked")


# ------------------------------------------------------------------------------ SFT


def test_sft_prompt_completion_batch_exact(tok):
    ds = data.sft_dataset(FIXTURES / "sft_prompt_completion.json", tok, max_length=6)
    batch = data.batching.sft_batch(ds, [0, -1])
    assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
        "input_ids": ((2, 6), "int32"), "attention_mask": ((2, 6), "int32"), "loss_mask": ((2, 6), "float32")}
    # "ab" -> "c": [pad, BOS, a, b, c, EOS]; loss on "c" and EOS (each predicted from t-1).
    np.testing.assert_array_equal(batch["input_ids"][0], [PAD, BOS, 97, 98, 99, EOS])
    np.testing.assert_array_equal(batch["attention_mask"][0], [0, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(batch["loss_mask"][0], [0, 0, 0, 0, 1, 1])
    # A padding row is all pad with nothing attended or scored.
    np.testing.assert_array_equal(batch["input_ids"][1], [PAD] * 6)
    assert batch["attention_mask"][1].sum() == 0 and batch["loss_mask"][1].sum() == 0


def test_sft_truncation_exact(tok):
    rows = [{"prompt": "abcdef", "completion": "xyz"}, {"prompt": "abcdefgh", "completion": "xy"}]
    ds = data.sft_dataset(rows, tok, max_length=6, max_prompt_length=3)
    # Prompt cut from the left to 3 tokens incl. BOS; response cut from the right (EOS lost).
    np.testing.assert_array_equal(ds.examples[0].input_ids, [BOS] + b("ef") + b("xyz"))
    np.testing.assert_array_equal(ds.examples[0].loss_mask, [0, 0, 0, 1, 1, 1])
    # Without max_prompt_length a long prompt is cut so that one response token remains.
    ds = data.sft_dataset(rows[1:], tok, max_length=4)
    np.testing.assert_array_equal(ds.examples[0].input_ids, [BOS] + b("gh") + b("x"))
    np.testing.assert_array_equal(ds.examples[0].loss_mask, [0, 0, 0, 1])
    assert ds.report.truncated == 1


@pytest.mark.parametrize("prompt_len, response_len, max_length, max_prompt_length, expected", [
    (3, 4, 10, None, (3, 4)), (10, 5, 8, None, (7, 1)), (3, 10, 8, None, (3, 5)),
    (10, 10, 8, 5, (5, 3)), (0, 20, 8, None, (0, 8)), (2, 1, 3, 5, (2, 1)),
])
def test_truncation_lengths(prompt_len, response_len, max_length, max_prompt_length, expected):
    assert data.truncation_lengths(prompt_len, response_len, max_length, max_prompt_length) == expected


@pytest.mark.parametrize("prompt_len, response_len, max_length, max_prompt_length, expected", [
    (3, 4, 10, None, (3, 4)), (10, 5, 8, None, (3, 5)), (3, 10, 8, None, (0, 8)),
    (10, 10, 8, 5, (0, 8)), (10, 3, 8, 2, (2, 3)), (0, 20, 8, None, (0, 8)), (2, 1, 3, 5, (2, 1)),
])
def test_response_first_lengths(prompt_len, response_len, max_length, max_prompt_length, expected):
    assert data.response_first_lengths(prompt_len, response_len, max_length, max_prompt_length) == expected


def test_preference_truncation_keeps_the_responses_and_cuts_the_prompt_from_the_left(tok):
    rows = [{"prompt": "0123456789", "chosen": " good", "rejected": " bad"},
            {"prompt": "0123456789", "chosen": " a long answer", "rejected": " b"}]
    ds = data.preference_dataset(rows, tok, max_length=10)
    # [BOS] + the prompt's end + the whole response + EOS; the prompt-first rule kept
    # [BOS] + 8 prompt bytes + 1 response byte, the same for both responses.
    assert [tok.decode(r) for g in ds.examples for r in g.responses] == [
        "<bos>789 good<eos>", "<bos>6789 bad<eos>", "<bos> a long a", "<bos>456789 b<eos>"]
    assert [s for g in ds.examples for s in g.response_starts.tolist()] == [4, 5, 1, 7]
    assert ds.report.truncated == 4 and ds.report.dropped_pairs == {}
    # RM scoring encodes (prompt, response) text exactly as the data was.
    texts = [("0123456789", r) for r in (" good", " bad", " a long answer", " b")]
    for got, want in zip(data.encode_prompt_response(tok, texts, max_length=10),
                         [r for g in ds.examples for r in g.responses]):
        np.testing.assert_array_equal(got, want)
    capped = data.encode_prompt_response(tok, texts[1:2], max_length=10, max_prompt_length=3)
    assert tok.decode(capped[0]) == "<bos>89 bad<eos>"  # BOS counts towards max_prompt_length
    assert tok.decode(data.encode_prompt_response(tok, texts[1:2], max_length=10, add_bos=False)[0]) == "56789 bad<eos>"


def test_pairs_identical_after_truncation_are_dropped_counted_and_logged(tok, caplog):
    rows = [{"prompt": "q", "ranked": [" same start, then A", " same start, then B", " other"]},
            {"prompt": "r", "ranked": [" twin one", " twin two"]},
            {"prompt": "s", "ranked": [" x", " y"]}]
    with caplog.at_level("WARNING"):
        ds = data.preference_dataset(rows, tok, max_length=6)
    # " same start..." both become [BOS] " same": their pair is dropped, the other two kept;
    # both " twin ..." are [BOS] " twin": that group is gone.
    assert ds.report.pairs == 5 and ds.report.dropped_pairs == {"identical_after_truncation": 2}
    assert ds.num_pairs() == 3 and [g.prompt for g in ds.examples] == ["q", "s"]
    q = ds.examples[0]
    assert len(q.responses) == 3 and list(zip(q.chosen, q.rejected)) == [(0, 2), (1, 2)]
    assert ds.report.kept == 2  # the twin row gave nothing
    (line,) = [r.getMessage() for r in caplog.records if "preference pairs" in r.getMessage()]
    assert "dropped 2 of 5 preference pairs {'identical_after_truncation': 2}" in line and "max_length" in line
    # A response used by no remaining pair is removed with its pairs.
    ds = data.preference_dataset(rows[1:2] + [{"prompt": "r", "ranked": [" twin one", " z"]}], tok, max_length=6)
    (r,) = ds.examples  # one group: the rows share " twin one"
    assert [tok.decode(x) for x in r.responses] == ["<bos> twin", "<bos>r z<eos>"]
    assert list(zip(r.chosen, r.rejected)) == [(0, 1)]
    assert r.response_starts.tolist() == [1, 2]


def test_sft_text_format_trains_on_all_tokens(tok):
    ds = data.sft_dataset(FIXTURES / "sft_text.jsonl", tok, max_length=64)
    ex = ds.examples[0]
    text = "To be, or not to be."
    np.testing.assert_array_equal(ex.input_ids, [BOS] + b(text) + [EOS])
    np.testing.assert_array_equal(ex.loss_mask, [0] + [1] * (len(text) + 1))


def test_sft_messages_loss_on_every_assistant_turn(tok):
    ds = data.sft_dataset(FIXTURES / "sft_messages.jsonl", tok, max_length=64)
    ex = ds.examples[0]
    # <|user|>\nhi<eos><|assistant|>\nyo<eos><|user|>\nok<eos><|assistant|>\nk<eos>
    expected = ([BOS, USER, 10] + b("hi") + [EOS, ASSISTANT, 10] + b("yo") + [EOS]
                + [USER, 10] + b("ok") + [EOS, ASSISTANT, 10] + b("k") + [EOS])
    mask = [0] * 8 + [1, 1, 1] + [0] * 7 + [1, 1]
    np.testing.assert_array_equal(ex.input_ids, expected)
    np.testing.assert_array_equal(ex.loss_mask, mask)
    assert ds.examples[1].prompt.startswith("<|system|>\nBe brief.<eos><|user|>\nCapital of France?")


def test_sft_alpaca_loss_on_output_only(tok):
    ds = data.sft_dataset(FIXTURES / "sft_alpaca.json", tok, max_length=128)
    ex = ds.examples[0]
    assert tok.decode(ex.input_ids) == ("<bos><|user|>\nAdd the numbers.\n\n2 and 3<eos><|assistant|>\n5<eos>")
    np.testing.assert_array_equal(np.nonzero(ex.loss_mask)[0], [len(ex.input_ids) - 2, len(ex.input_ids) - 1])


# ------------------------------------------------------------------------------ preferences


def test_preference_batch_exact_with_margin_and_shared_responses(tok):
    ds = data.preference_dataset(FIXTURES / "pref_explicit.jsonl", tok, max_length=8)
    # Rows 2 and 3 share the prompt and the chosen " 4": one group, " 4" run once.
    assert [len(g.responses) for g in ds.examples] == [2, 3, 2] and ds.num_pairs() == 4
    batch = data.batching.preference_batch(ds, [0, 1], max_responses=6, max_pairs=4)
    np.testing.assert_array_equal(batch["input_ids"][0], [PAD] * 4 + [BOS, ord("p"), ord("a"), EOS])
    np.testing.assert_array_equal(batch["input_ids"][1], [PAD] * 3 + [BOS, ord("p"), ord("b"), ord("b"), EOS])
    np.testing.assert_array_equal(batch["attention_mask"][1], [0] * 3 + [1] * 5)
    assert batch["attention_mask"][5].sum() == 0  # unused response slot
    np.testing.assert_array_equal(batch["chosen_idx"], [0, 2, 2, 0])
    np.testing.assert_array_equal(batch["rejected_idx"], [1, 3, 4, 0])
    np.testing.assert_array_equal(batch["margin"], [1.5, 0, 0, 0])
    np.testing.assert_array_equal(batch["pair_mask"], [1, 1, 1, 0])
    assert {k: v.dtype.name for k, v in batch.items()} == {
        "input_ids": "int32", "attention_mask": "int32", "chosen_idx": "int32", "rejected_idx": "int32",
        "margin": "float32", "pair_mask": "float32"}


def test_hh_implicit_prompt_fixture():
    rows = data.load_records(FIXTURES / "pref_hh.jsonl").rows
    split = [formats.split_implicit_prompt(r["chosen"], r["rejected"]) for r in rows]
    assert split[0] == ("\n\nHuman: Hi\n\nAssistant:", " Hello! How can I help?", " Go away.")
    assert split[1] == ("\n\nHuman: A?\n\nAssistant: B.\n\nHuman: C?\n\nAssistant:", " D, sure.", " No.")
    # Extra turn on the chosen side: the prompt ends at the last shared "\n\nAssistant:".
    assert split[2] == ("\n\nHuman: X?\n\nAssistant:", " Y.\n\nAssistant: Z.", " W.")
    ds = data.preference_dataset(FIXTURES / "pref_hh.jsonl", "byte", max_length=128)
    assert ds.format == "implicit" and [g.prompt for g in ds.examples] == [s[0] for s in split]


def test_hh_real_file():
    path = needs_shared("hh_rlhf_harmless_dev.jsonl.gz")
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f]
    for row in rows:
        prompt, chosen, rejected = formats.split_implicit_prompt(row["chosen"], row["rejected"])
        assert prompt.endswith("\n\nAssistant:")
        assert prompt + chosen == row["chosen"] and prompt + rejected == row["rejected"]
    # Four real rows have an empty chosen response (rows 648, 692, 1442, 1622).
    with pytest.raises(data.BadRowError, match=r"hh_rlhf_harmless_dev.jsonl.gz: row 648: field 'chosen'"):
        data.preference_dataset(path, "byte", max_length=256)
    # configs/rm.py's settings: 256 bytes and no max_prompt_length. Cutting the prompt first
    # left 62% of the pairs with chosen == rejected; the response first leaves none.
    ds = data.preference_dataset(path, "byte", max_length=256, on_bad_row="skip")
    assert ds.report.skipped == {"empty_response": 4} and ds.report.kept == 1796
    assert ds.num_pairs() == 1796 and ds.report.dropped_pairs == {}
    assert all(len(r) <= 256 for g in ds.examples for r in g.responses)
    assert all(not np.array_equal(g.responses[c], g.responses[r])
               for g in ds.examples for c, r in zip(g.chosen, g.rejected))


def test_ranked_pairs_and_whole_groups_per_batch(tok):
    ds = data.preference_dataset(FIXTURES / "pref_ranked.jsonl", tok, max_length=32)
    ks = {"Two:": 2, "Three:": 3, "Four:": 4, "Two again:": 2, "Three again:": 3}
    assert {g.prompt: len(g.chosen) for g in ds.examples} == {p: k * (k - 1) // 2 for p, k in ks.items()}
    four = next(g for g in ds.examples if g.prompt == "Four:")
    assert list(zip(four.chosen, four.rejected)) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]

    seen: dict[str, int] = {}
    for step, batch in enumerate(data.batches(ds, max_responses=6, max_pairs=8, seed=3, drop_last=False)):
        texts = [tok.decode(row[mask == 1], skip_special_tokens=True)
                 for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
        for c, r, m in zip(batch["chosen_idx"], batch["rejected_idx"], batch["pair_mask"]):
            if m:
                prompt = texts[c].rsplit(" ", 1)[0]
                assert texts[r].rsplit(" ", 1)[0] == prompt and texts[c] < texts[r]  # best first = a < b < c
                assert seen.setdefault(prompt, step) == step  # every pair of a prompt in one batch
    assert set(seen) == set(ks)


def test_oasst_fixture_with_history(tok):
    ds = data.preference_dataset(FIXTURES / "pref_oasst.json", tok, max_length=128)
    assert ds.format == "alpaca_ranked" and ds.num_pairs() == 3 + 1
    second = ds.examples[1]
    assert second.prompt == "<|user|>\n你好<eos><|assistant|>\n你好！<eos><|user|>\n再说一遍\n\n简短<eos><|assistant|>\n"
    assert tok.decode(second.responses[0]).endswith("<|assistant|>\n好的。<eos>")


def test_oasst_real_file():
    path = needs_shared("oasst_rm_zh_ranked.json")
    rows = json.loads(path.read_text())
    distinct = [len(dict.fromkeys(r["output"])) for r in rows]
    expected_pairs = sum(k * (k - 1) // 2 for k in distinct if k >= 2)
    # Three real rows rank two identical responses (rows 145, 300, 592).
    with pytest.raises(data.BadRowError, match=r"oasst_rm_zh_ranked.json: row 145: field 'output'"):
        data.preference_dataset(path, "byte", max_length=64)
    ds = data.preference_dataset(path, "byte", max_length=64, on_bad_row="skip")
    assert ds.report.skipped == {"too_few_responses": sum(k < 2 for k in distinct)} == {"too_few_responses": 3}
    assert ds.report.pairs == expected_pairs == 1798
    # At 64 bytes five pairs of long Chinese answers share their first 63 bytes: dropped.
    assert ds.report.dropped_pairs == {"identical_after_truncation": 5} and ds.num_pairs() == 1793


# ------------------------------------------------------------------------------ bad rows


@pytest.mark.parametrize("name, field, reason", [
    ("bad_missing.jsonl", "rejected", "missing_field"),
    ("bad_empty.jsonl", "chosen", "empty_response"),
    ("bad_type.jsonl", "chosen", "wrong_type"),
    ("bad_ranked.jsonl", "ranked", "too_few_responses"),
])
def test_bad_rows_error_and_skip(name, field, reason):
    path = FIXTURES / name
    with pytest.raises(data.BadRowError) as err:
        data.preference_dataset(path, "byte", max_length=16)
    assert str(path) in str(err.value) and "row 2:" in str(err.value) and repr(field) in str(err.value)
    assert (err.value.row, err.value.field, err.value.reason) == (2, field, reason)
    ds = data.preference_dataset(path, "byte", max_length=16, on_bad_row="skip")
    assert ds.report.skipped == {reason: 1} and ds.report.rows == 3 and ds.report.kept == 2
    assert [g.prompt for g in ds.examples] == ["a", "c"]


def test_bad_sft_and_prompt_rows():
    rows = [{"messages": [{"role": "user", "content": "hi"}]}, {"messages": "hello"}]
    ds = data.sft_dataset(rows, "byte", on_bad_row="skip")
    assert ds.report.skipped == {"bad_messages": 1, "wrong_type": 1} and len(ds) == 0
    with pytest.raises(data.BadRowError, match=r"<memory>: row 1: field 'prompt'"):
        data.prompt_dataset([{"prompt": " "}], "byte")


def test_group_larger_than_a_batch():
    ds = data.preference_dataset(FIXTURES / "pref_ranked.jsonl", "byte", max_length=32)
    with pytest.raises(ValueError, match=r"pref_ranked.jsonl: row 3: .*4 responses and 6 pairs"):
        data.batches(ds, max_responses=3, max_pairs=8)
    with pytest.raises(data.BadRowError, match="row 3: field 'ranked'"):
        data.preference_dataset(FIXTURES / "pref_ranked.jsonl", "byte", max_responses=3, max_pairs=8)
    ds = data.preference_dataset(FIXTURES / "pref_ranked.jsonl", "byte", max_responses=3, max_pairs=8,
                                 on_bad_row="skip")
    assert ds.report.skipped == {"group_too_large": 1} and len(ds) == 4


# ------------------------------------------------------------------------------ prompts


def test_prompt_dataset_left_padded_with_texts(tok):
    ds = data.prompt_dataset(FIXTURES / "prompts.jsonl", tok, max_prompt_length=8)
    batch = next(data.batches(ds, batch_size=4, shuffle=False, drop_last=False))
    np.testing.assert_array_equal(batch["input_ids"][2], [PAD] * 5 + [BOS] + b("Hi"))
    np.testing.assert_array_equal(batch["input_ids"][0], [BOS] + b(" a time"))  # cut from the left
    np.testing.assert_array_equal(batch["attention_mask"][3], [0] * 8)
    np.testing.assert_array_equal(batch["index"], [0, 1, 2, -1])
    assert data.prompt_texts(ds, batch) == ["Once upon a time", "The weather today", "Hi", ""]
    chat = data.prompt_dataset(FIXTURES / "sft_messages.jsonl", tok, max_prompt_length=64)
    assert chat.examples[0].prompt == "<|user|>\nhi<eos><|assistant|>\nyo<eos><|user|>\nok<eos><|assistant|>\n"


# ------------------------------------------------------------------------------ iteration


def _sft(n: int):
    return data.sft_dataset([{"text": f"row {i}"} for i in range(n)], "byte", max_length=12)


def _ids(batches):
    return [b["input_ids"].tolist() for b in batches]


def test_iteration_deterministic_reshuffled_and_resumable():
    ds = _sft(10)
    run = lambda **kw: _ids(data.batches(ds, batch_size=4, seed=7, num_epochs=3, **kw))
    full = run()
    assert len(full) == 6 and full == run()  # 2 full batches per epoch, same every time
    assert full[:2] != full[2:4]  # reshuffled each epoch
    assert _ids(data.batches(ds, batch_size=4, seed=8, num_epochs=1)) != full[:2]
    for start in (1, 2, 5):
        assert run(start_step=start) == full[start:]
    forever = data.batches(ds, batch_size=4, seed=7, num_epochs=None)
    assert _ids(next(forever) for _ in range(6)) == full
    assert data.num_batches(ds, batch_size=4) == 2 and data.num_batches(ds, batch_size=4, drop_last=False) == 3


def test_last_partial_batch_dropped_or_padded():
    ds = _sft(10)
    padded = list(data.batches(ds, batch_size=4, seed=1, drop_last=False))
    assert len(padded) == 3
    assert padded[2]["attention_mask"].sum(axis=1).tolist()[2:] == [0, 0]
    seen = sorted(tuple(r) for b in padded for r, m in zip(b["input_ids"].tolist(), b["attention_mask"]) if m.any())
    assert len(set(seen)) == 10  # every example exactly once
    with pytest.raises(ValueError, match="no complete batch"):
        data.batches(_sft(3), batch_size=4)


def test_a_full_last_batch_is_kept():
    assert data.num_batches(_sft(8), batch_size=4) == 2  # SFT: 8 = 2 full batches
    pairs = lambda n: data.preference_dataset(
        [{"prompt": f"p{i}", "chosen": " a", "rejected": " b"} for i in range(n)], "byte", max_length=8)
    kw = dict(max_responses=16, max_pairs=8, seed=0)
    # 16 pairs of 2 responses = 2 full batches of 8 pairs (the second was dropped before).
    assert data.num_batches(pairs(16), **kw) == 2 and len(list(data.batches(pairs(16), **kw))) == 2
    assert data.num_batches(pairs(17), **kw) == 2  # a third batch of 1 pair is partial: dropped
    assert data.num_batches(pairs(17), drop_last=False, **kw) == 3
    # Ranked groups of 2 and 3 responses: a last batch nothing more fits in is full.
    ds = data.preference_dataset(FIXTURES / "pref_ranked.jsonl", "byte", max_length=32)
    sizes = [(len(g.responses), len(g.chosen)) for g in ds.examples]  # (2,1) (3,3) (4,6) (2,1) (3,3)
    plan = data.batching._epoch_plan(ds, 0, batch_size=None, max_responses=5, max_pairs=6, seed=0, shuffle=False,
                                     drop_last=True)
    assert plan == [[0, 1], [2], [3, 4]] and sum(sizes[g][0] for g in plan[-1]) == 5


def test_multi_process_slices_concatenate_to_global_batch():
    ds = _sft(16)
    global_ = list(data.batches(ds, batch_size=8, seed=2, num_epochs=2, start_step=1))
    parts = [list(data.batches(ds, batch_size=8, seed=2, num_epochs=2, start_step=1, process_index=i,
                               process_count=4)) for i in range(4)]
    for step, batch in enumerate(global_):
        for key in batch:
            assert parts[0][step][key].shape[0] == 2
            np.testing.assert_array_equal(np.concatenate([p[step][key] for p in parts]), batch[key])

    prefs = data.preference_dataset(FIXTURES / "pref_ranked.jsonl", "byte", max_length=32)
    kw = dict(max_responses=8, max_pairs=8, seed=5, drop_last=False)
    global_ = list(data.batches(prefs, **kw))
    parts = [list(data.batches(prefs, process_index=i, process_count=2, **kw)) for i in range(2)]
    for step, batch in enumerate(global_):
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([p[step][key] for p in parts]), batch[key])
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        data.batches(ds, batch_size=8, process_index=0, process_count=3)


def test_split_by_prompt_is_deterministic_and_disjoint():
    ds = data.preference_dataset(FIXTURES / "pref_explicit.jsonl", "byte", max_length=16)
    rows = [{"prompt": f"q{i % 10}", "completion": f" a{i}"} for i in range(40)]  # 4 demos per prompt
    sft = data.sft_dataset(rows, "byte", max_length=16)
    train, held = data.split(sft, eval_fraction=0.2, seed=0)
    assert len({e.prompt for e in held.examples}) == 2 and len(held) == 8 and len(train) == 32
    assert not {e.prompt for e in train.examples} & {e.prompt for e in held.examples}
    again = data.split(sft, eval_fraction=0.2, seed=0)[1]
    assert [e.row for e in again.examples] == [e.row for e in held.examples]
    assert [e.row for e in data.split(sft, eval_fraction=0.2, seed=1)[1].examples] != [e.row for e in held.examples]
    train, held = data.split(ds, eval_fraction=0.5, seed=0)
    assert len(train) + len(held) == 3 and math.isclose(train.num_pairs() + held.num_pairs(), 4)
