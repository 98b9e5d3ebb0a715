"""Tests for rlhf_jax.feedback.store and rlhf_jax.feedback.labelers.

Covers the round trip to the reward-model export, concurrent writers (threads and
processes), crashes in the middle of a write (leftover temp files, a writer killed with
SIGKILL) and the validation errors a user can cause.
"""

import itertools
import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from rlhf_jax.feedback import (
    BradleyTerryLabeler,
    ComparisonStore,
    GoldLabeler,
    RandomLabeler,
    label_store,
    read_preferences,
)
from rlhf_jax.feedback import store as store_lib

REPO_ROOT = Path(__file__).resolve().parents[1]


def make_items(ks, prefix="item"):
    return [{"id": f"{prefix}{n}", "prompt": f"prompt {n}",
             "responses": [f"response {n}.{i}" for i in range(k)],
             "meta": {"round": 0, "policy": "sft/step_100", "temperature": 0.7}}
            for n, k in enumerate(ks)]


# ---- round trip and export ----


def test_round_trip_and_export(tmp_path):
    store = ComparisonStore(tmp_path / "store")
    items = make_items([4, 3, 2, 3, 3])
    ids = store.add_items(items)
    assert ids == [it["id"] for it in items]
    store.add_label("item0", "alice", "ranking", [2, 0, 3, 1])  # full, K=4
    store.add_label("item1", "alice", "choice", [1])            # winner of 3
    store.add_label("item2", "alice", "ranking", [1, 0])        # K=2
    store.add_label("item3", "alice", "tie")
    store.add_label("item4", "alice", "skip")

    # A fresh instance sees the same data: nothing lives only in memory.
    reopened = ComparisonStore(tmp_path / "store")
    assert reopened.items() == store.items() == items
    assert [lb["kind"] for lb in reopened.labels()] == ["ranking", "choice", "ranking",
                                                        "tie", "skip"]
    assert reopened.labels()[1]["ranking"] == [1, 0, 2]
    for lb in reopened.labels():
        assert lb["time"].endswith("Z") and "T" in lb["time"]
        assert set(lb) == {"id", "item_id", "labeler", "time", "kind", "ranking"}
    reopened.labels()[0]["ranking"].append(9)  # copies: the cache stays intact
    assert reopened.labels()[0]["ranking"] == [2, 0, 3, 1]
    assert reopened.unlabeled("alice") == []
    assert len(reopened.unlabeled("bob")) == 5

    pairs_path = tmp_path / "out" / "pairs.jsonl"
    counts = reopened.export_preferences(pairs_path)
    rows = read_preferences(pairs_path)
    # 4·3/2 from the full ranking, 3−1 from the choice, 1 from the K=2 ranking.
    assert counts == {"labels": 3, "no_preference": 2, "rows": 6 + 2 + 1,
                      "pairs": 6 + 2 + 1, "dropped_pairs": 0}
    assert len(rows) == 9
    by_prompt = {}
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected"}
        by_prompt.setdefault(row["prompt"], []).append((row["chosen"], row["rejected"]))
    r0 = [f"response 0.{i}" for i in (2, 0, 3, 1)]
    assert by_prompt["prompt 0"] == list(itertools.combinations(r0, 2))
    assert by_prompt["prompt 1"] == [("response 1.1", "response 1.0"),
                                     ("response 1.1", "response 1.2")]
    assert by_prompt["prompt 2"] == [("response 2.1", "response 2.0")]

    ranked_path = tmp_path / "ranked.jsonl"
    counts = reopened.export_preferences(ranked_path, format="ranked", include_ids=True)
    rows = read_preferences(ranked_path)
    # One row for the full ranking, K−1 two-element rows for the choice, one for K=2.
    assert counts == {"labels": 3, "no_preference": 2, "rows": 1 + 2 + 1, "pairs": 9,
                      "dropped_pairs": 0}
    assert all(set(row) == {"prompt", "ranked", "item_id", "labeler"} for row in rows)
    assert rows[0] == {"prompt": "prompt 0", "ranked": r0, "item_id": "item0",
                       "labeler": "alice"}
    assert [row["ranked"] for row in rows[1:]] == [
        ["response 1.1", "response 1.0"], ["response 1.1", "response 1.2"],
        ["response 2.1", "response 2.0"]]
    with pytest.raises(ValueError, match="format"):
        reopened.export_preferences(ranked_path, format="mixed")


@pytest.mark.parametrize("k", [2, 3, 5])
def test_full_ranking_gives_all_pairs(tmp_path, k):
    store = ComparisonStore(tmp_path)
    store.add_items(make_items([k]))
    store.add_label("item0", "a", "ranking", list(reversed(range(k))))
    counts = store.export_preferences(tmp_path / "p.jsonl")
    rows = read_preferences(tmp_path / "p.jsonl")
    assert counts["pairs"] == len(rows) == k * (k - 1) // 2
    # Reversed ranking: the higher original index always wins.
    for row in rows:
        assert row["chosen"] > row["rejected"]


def test_choice_forms_are_normalised(tmp_path):
    store = ComparisonStore(tmp_path)
    store.add_items(make_items([3]))
    assert store.add_label("item0", "a", "choice", [2])["ranking"] == [2, 0, 1]
    # A full permutation is accepted but only its winner is kept as information.
    assert store.add_label("item0", "b", "choice", (2, 1, 0))["ranking"] == [2, 0, 1]
    assert store_lib.preference_pairs(store.labels()[0]) == [(2, 0), (2, 1)]


def test_several_labelers_and_relabeling(tmp_path):
    store = ComparisonStore(tmp_path)
    store.add_items(make_items([2, 2]))
    store.add_label("item0", "alice", "choice", [0])
    store.add_label("item0", "bob", "choice", [1])
    store.add_label("item1", "alice", "choice", [0])
    store.add_label("item1", "alice", "choice", [1])  # alice corrects herself
    assert store.unlabeled() == []
    assert [it["id"] for it in store.unlabeled("bob")] == ["item1"]
    assert len(store.labels(item_id="item1")) == 2
    assert len(store.latest_labels()) == 3
    store.export_preferences(tmp_path / "p.jsonl", include_ids=True)
    rows = read_preferences(tmp_path / "p.jsonl")
    assert [(r["item_id"], r["labeler"], r["chosen"]) for r in rows] == [
        ("item0", "alice", "response 0.0"),
        ("item0", "bob", "response 0.1"),
        ("item1", "alice", "response 1.1"),
    ]


def test_unusable_pairs_are_dropped(tmp_path):
    # Policies do produce duplicate and empty responses; the reward-model reader rejects
    # such pairs, so the export leaves them out and counts them.
    store = ComparisonStore(tmp_path)
    store.add_items([{"id": "d", "prompt": "p", "responses": ["same", "other", "same", " "]},
                     {"id": "e", "prompt": "q", "responses": ["", "x"]}])
    store.add_label("d", "a", "ranking", [0, 1, 2, 3])
    store.add_label("e", "a", "choice", [1])
    counts = store.export_preferences(tmp_path / "p.jsonl")
    rows = read_preferences(tmp_path / "p.jsonl")
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("same", "other")]
    # Of the ranking's 6 pairs only same > other survives; the choice's 1 pair is empty.
    assert counts == {"labels": 2, "no_preference": 0, "rows": 1, "pairs": 1,
                      "dropped_pairs": 5 + 1}
    counts = store.export_preferences(tmp_path / "r.jsonl", format="ranked")
    # The ranking keeps the best-ranked copy of "same" and drops the blank response.
    assert [r["ranked"] for r in read_preferences(tmp_path / "r.jsonl")] == [["same", "other"]]
    assert counts["pairs"] == 1 and counts["dropped_pairs"] == 6


def test_export_loads_in_reward_model_reader(tmp_path):
    data = pytest.importorskip("rlhf_jax.data", reason="the reward-model data layer")
    from rlhf_jax.data.tokenizer import load_tokenizer

    store = ComparisonStore(tmp_path / "store")
    store.add_items(make_items([2, 3, 4]) + [
        {"id": "dups", "prompt": "d", "responses": ["a", "b", "b", ""]}])
    for labeler in ("alice", "bob"):
        store.add_label("item0", labeler, "choice", [1])
        store.add_label("item1", labeler, "choice", [2])
        store.add_label("item2", labeler, "ranking", [3, 1, 0, 2])
        store.add_label("dups", labeler, "choice", [0])
    store.add_label("item1", "carol", "tie")
    tokenizer = load_tokenizer("byte")
    for fmt, detected in (("pairs", "explicit"), ("ranked", "ranked")):
        counts = store.export_preferences(tmp_path / f"{fmt}.jsonl", format=fmt)
        # The reader's default is to raise on any bad row, so loading at all is the check.
        ds = data.preference_dataset(str(tmp_path / f"{fmt}.jsonl"), tokenizer)
        assert ds.format == detected
        assert sum(len(g.chosen) for g in ds.examples) == counts["pairs"] == 2 * (1 + 2 + 6 + 1)
        # Both labelers' pairs of one prompt land in one comparison group.
        assert len(ds.examples) == 4


def test_items_get_ids_and_keep_add_order(tmp_path):
    store = ComparisonStore(tmp_path)
    first = store.add_items([{"prompt": "p", "responses": ["a", "b"]}])
    second = store.add_items(make_items([2, 2]))
    assert len(first[0]) == 32 and second == ["item0", "item1"]
    assert [it["id"] for it in store.items()] == first + second
    assert store.items()[0]["meta"] == {}
    # Returned items are copies: changing them must not change the store.
    store.items()[0]["responses"].append("c")
    assert store.get_item(first[0])["responses"] == ["a", "b"]
    assert store.add_items([]) == []


# ---- validation ----


@pytest.mark.parametrize("item, field", [
    ({"prompt": "p", "responses": ["a"]}, r"items\[0\]\.responses"),
    ({"prompt": "p", "responses": "ab"}, r"items\[0\]\.responses"),
    ({"prompt": "p", "responses": ["a", 3]}, r"items\[0\]\.responses\[1\]"),
    ({"responses": ["a", "b"]}, r"items\[0\]\.prompt"),
    ({"id": "", "prompt": "p", "responses": ["a", "b"]}, r"items\[0\]\.id"),
    ({"id": 7, "prompt": "p", "responses": ["a", "b"]}, r"items\[0\]\.id"),
    ({"prompt": "p", "responses": ["a", "b"], "meta": []}, r"items\[0\]\.meta"),
    ({"prompt": "p", "responses": ["a", "b"], "meta": {"x": object()}},
     r"items\[0\]\.meta"),
    ({"prompt": "p", "responses": ["a", "b"], "round": 1}, r"unknown field.*round"),
    ("not a dict", r"items\[0\]"),
])
def test_bad_items(tmp_path, item, field):
    store = ComparisonStore(tmp_path)
    with pytest.raises(ValueError, match=field):
        store.add_items([item])
    assert store.items() == []


def test_duplicate_item_ids(tmp_path):
    store = ComparisonStore(tmp_path)
    store.add_items(make_items([2]))
    with pytest.raises(ValueError, match=r"items\[2\]\.id.*repeated"):
        store.add_items(make_items([2, 2], prefix="new") + make_items([2], prefix="new"))
    with pytest.raises(ValueError, match=r"items\[1\]\.id.*already"):
        store.add_items(make_items([2], prefix="other") + make_items([2]))
    # The rejected batches left nothing behind: batches are all or nothing.
    assert [it["id"] for it in store.items()] == ["item0"]


@pytest.mark.parametrize("kwargs, field", [
    (dict(item_id="nope", labeler="a", kind="choice", ranking=[0]), "item_id: unknown"),
    (dict(item_id=3, labeler="a", kind="choice", ranking=[0]), "item_id"),
    (dict(item_id="item0", labeler="", kind="choice", ranking=[0]), "labeler"),
    (dict(item_id="item0", labeler=None, kind="choice", ranking=[0]), "labeler"),
    (dict(item_id="item0", labeler="a", kind="best", ranking=[0]), "kind"),
    (dict(item_id="item0", labeler="a", kind="ranking", ranking=[0, 1]), "ranking:.*all 3"),
    (dict(item_id="item0", labeler="a", kind="ranking", ranking=[0, 1, 1]), "ranking:.*repeat"),
    (dict(item_id="item0", labeler="a", kind="ranking", ranking=[0, 1, 3]), "ranking:.*must be in"),
    (dict(item_id="item0", labeler="a", kind="ranking", ranking=[0, -1, 2]), "ranking"),
    (dict(item_id="item0", labeler="a", kind="ranking", ranking=None), "ranking"),
    (dict(item_id="item0", labeler="a", kind="ranking", ranking="012"), "ranking"),
    (dict(item_id="item0", labeler="a", kind="choice", ranking=[True]), "ranking:.*integer"),
    (dict(item_id="item0", labeler="a", kind="choice", ranking=[0.0]), "ranking:.*integer"),
    (dict(item_id="item0", labeler="a", kind="choice", ranking=[0, 1]), "ranking:.*winner"),
    (dict(item_id="item0", labeler="a", kind="choice", ranking=[]), "ranking"),
    (dict(item_id="item0", labeler="a", kind="tie", ranking=[0, 1, 2]), "ranking:.*tie"),
    (dict(item_id="item0", labeler="a", kind="skip", ranking=[0]), "ranking:.*skip"),
])
def test_bad_labels(tmp_path, kwargs, field):
    store = ComparisonStore(tmp_path)
    store.add_items(make_items([3]))
    with pytest.raises(ValueError, match=field):
        store.add_label(**kwargs)
    assert store.labels() == []


def test_not_a_store(tmp_path):
    (tmp_path / "store.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="store.json"):
        ComparisonStore(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        ComparisonStore(tmp_path / "file")


def test_read_preferences_names_bad_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p"}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:2"):
        read_preferences(path)


# ---- concurrency ----

LABELS_PER_WRITER = 50
THREADS_IN_TEST = 8
PROCESSES = 2
THREADS_PER_PROCESS = 5


def _write_labels(path, writer, shared_store=None):
    store = shared_store or ComparisonStore(path)
    for n in range(LABELS_PER_WRITER):
        item_id = f"item{n % 4}"
        # The writer/n pair is encoded in the labeler name so the test can find every one.
        store.add_label(item_id, f"{writer}/{n}", "choice", [n % 2])


def _process_writer(path, proc):
    threads = [threading.Thread(target=_write_labels, args=(path, f"p{proc}t{t}"))
               for t in range(THREADS_PER_PROCESS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_concurrent_writers(tmp_path):
    store = ComparisonStore(tmp_path)
    store.add_items(make_items([2, 2, 2, 2]))
    # spawn, not fork: forking a process that already runs threads can deadlock.
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_process_writer, args=(str(tmp_path), p))
             for p in range(PROCESSES)]
    for p in procs:
        p.start()
    # Half the threads share one instance (its cache and lock), half open their own.
    threads = [threading.Thread(target=_write_labels,
                                args=(tmp_path, f"t{t}", store if t % 2 else None))
               for t in range(THREADS_IN_TEST)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    writers = THREADS_IN_TEST + PROCESSES * THREADS_PER_PROCESS
    expected = writers * LABELS_PER_WRITER
    assert expected == 900

    files = os.listdir(tmp_path / "labels")
    assert len(files) == expected and not [f for f in files if f.startswith(".tmp-")]
    for f in files:  # every file is complete JSON
        json.loads((tmp_path / "labels" / f).read_text())
    labels = ComparisonStore(tmp_path).labels()
    assert len({lb["labeler"] for lb in labels}) == expected
    assert len({lb["id"] for lb in labels}) == expected


def test_racing_add_items_with_same_id(tmp_path):
    results = []

    def add(n):
        try:
            ComparisonStore(tmp_path).add_items(
                [{"id": "shared", "prompt": f"from {n}", "responses": ["a", "b"]}])
            results.append("ok")
        except ValueError:
            results.append("duplicate")

    threads = [threading.Thread(target=add, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["duplicate"] * 5 + ["ok"]
    assert len(ComparisonStore(tmp_path).items()) == 1


# ---- crashes ----


def test_leftover_temp_files_are_ignored(tmp_path):
    store = ComparisonStore(tmp_path)
    store.add_items(make_items([2]))
    store.add_label("item0", "a", "choice", [1])
    # What a writer killed between open() and os.replace() leaves: a partial temp file.
    (tmp_path / "labels" / ".tmp-abc.json.123").write_text('{"id": "abc", "item_')
    (tmp_path / "items" / ".tmp-0001-x.jsonl.456").write_text(
        json.dumps(make_items([2], prefix="lost")[0]) + '\n{"id": "lost1", "pro')
    (tmp_path / "items" / ".tmp-0002-y.jsonl.789").write_text("")

    fresh = ComparisonStore(tmp_path)
    assert [it["id"] for it in fresh.items()] == ["item0"]
    assert [lb["ranking"] for lb in fresh.labels()] == [[1, 0]]
    assert fresh.unlabeled("b")[0]["id"] == "item0"
    fresh.export_preferences(tmp_path / "p.jsonl")
    assert len(read_preferences(tmp_path / "p.jsonl")) == 1

    # Young temp files may belong to a live writer, so only old ones are removed.
    assert fresh.remove_stale_tmp(max_age_s=3600) == 0
    old = os.stat(tmp_path / "labels" / ".tmp-abc.json.123").st_mtime - 7200
    for d in ("labels", "items"):
        for f in os.listdir(tmp_path / d):
            if f.startswith(".tmp-"):
                os.utime(tmp_path / d / f, (old, old))
    assert fresh.remove_stale_tmp(max_age_s=3600) == 3
    assert len(fresh.labels()) == 1


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    store = ComparisonStore(tmp_path)
    store.add_items(make_items([2]))
    store.add_label("item0", "a", "choice", [0])

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(store_lib.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        store.add_label("item0", "b", "choice", [1])
    with pytest.raises(OSError, match="disk full"):
        store.add_items(make_items([2], prefix="new"))
    monkeypatch.undo()
    fresh = ComparisonStore(tmp_path)
    assert len(fresh.labels()) == 1 and len(fresh.items()) == 1
    assert not [f for d in ("items", "labels") for f in os.listdir(tmp_path / d)
                if f.startswith(".tmp-")]


_KILLED_WRITER = textwrap.dedent("""
    import os, stat, sys, time
    from rlhf_jax.feedback import ComparisonStore
    from rlhf_jax.feedback import store as store_lib

    path, pause_after = sys.argv[1], int(sys.argv[2])
    if pause_after >= 0:
        # Stop inside a write, after the temp file has its data and before the rename,
        # so that the parent's SIGKILL deterministically lands there.
        fsync, calls = os.fsync, [0]
        def fsync_then_pause(fd):
            fsync(fd)
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                return  # the directory is fsynced after the rename; too late
            calls[0] += 1
            if calls[0] > pause_after:
                print("paused -", flush=True)
                time.sleep(60)
        store_lib.os.fsync = fsync_then_pause
    store = ComparisonStore(path)
    n = 0
    while True:
        ids = store.add_items([{"prompt": f"p{n}", "responses": ["a" * 5000, "b" * 5000]}])
        print("item", ids[0], flush=True)       # printed only after add_items returned
        for k in range(3):
            label = store.add_label(ids[0], f"w{k}", "choice", [k % 2])
            print("label", label["id"], flush=True)
        n += 1
""")


def _run_and_kill(path, committed, kill_delay_s=0.0, pause_after=-1, min_labels=30):
    """Runs the writer, SIGKILLs it mid-write; adds every id it reported to `committed`."""
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(path), str(pause_after)],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=pythonpath))
    labels = 0
    try:
        for line in proc.stdout:
            kind, ident = line.split()
            committed.setdefault(kind, set()).add(ident)
            labels += kind == "label"
            if kind == "paused" or (pause_after < 0 and labels >= min_labels):
                break
        # The writer spends its time in add_items/add_label (mostly fsync); varying the
        # delay lands the kill in different phases of a write.
        time.sleep(kill_delay_s)
        os.kill(proc.pid, signal.SIGKILL)
        for line in proc.stdout:  # anything printed before the kill was committed too
            kind, ident = line.split()
            committed.setdefault(kind, set()).add(ident)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_while_writing(tmp_path):
    committed = {"item": set(), "label": set()}
    for delay in (0.0, 0.0003, 0.0008):
        _run_and_kill(tmp_path, committed, kill_delay_s=delay)
    # Stopped between writing a temp file and renaming it: the temp file must stay
    # invisible.
    _run_and_kill(tmp_path, committed, pause_after=25)
    leftovers = [f for d in ("items", "labels") for f in os.listdir(tmp_path / d)
                 if f.startswith(".tmp-")]
    assert leftovers

    store = ComparisonStore(tmp_path)
    items = store.items()
    labels = store.labels()
    assert committed["item"] <= {it["id"] for it in items}
    assert committed["label"] <= {lb["id"] for lb in labels}
    # At most the write in flight in each of the 4 runs was committed without a report.
    assert len(items) + len(labels) - len(committed["item"]) - len(committed["label"]) <= 4
    assert all(len(it["responses"][0]) == 5000 for it in items)
    store.export_preferences(tmp_path / "p.jsonl")
    assert len(read_preferences(tmp_path / "p.jsonl")) == len(labels)
    # The store keeps working after the crashes.
    store.add_label(items[0]["id"], "after-crash", "tie")


# ---- simulated labelers ----


def length_score(prompt, response):
    return len(response)


def random_items(n, k, seed=0):
    import random
    rng = random.Random(seed)
    return [(f"prompt {i}", ["x" * rng.randrange(1, 50) + str(j) for j in range(k)])
            for i in range(n)]


def test_gold_labeler_without_noise_sorts_by_score():
    labeler = GoldLabeler(length_score, noise=0.0)
    assert labeler.label("p", ["aa", "a", "aaaa", "aaa"]) == [2, 3, 0, 1]
    # Equal scores: order at random, so both orders occur across prompts.
    firsts = {labeler.label(f"p{i}", ["a", "b"])[0] for i in range(40)}
    assert firsts == {0, 1}


def test_gold_labeler_noise_rate():
    noise = 0.3
    labeler = GoldLabeler(length_score, noise=noise, seed=1)
    gold = GoldLabeler(length_score, noise=0.0, seed=1, name=labeler.name)
    for k in (2, 4):
        data = random_items(2000, k)
        wrong = sum(labeler.label(p, rs) != gold.label(p, rs) for p, rs in data)
        # sd of the rate is ≈0.01; 0.04 is four of them.
        assert abs(wrong / len(data) - noise) < 0.04, (k, wrong)
    always_wrong = GoldLabeler(length_score, noise=1.0)
    for p, rs in random_items(50, 3):
        assert always_wrong.label(p, rs) != always_wrong.gold_ranking(p, rs)
    flipped = GoldLabeler(length_score, noise=1.0)
    assert flipped.label("p", ["a", "aaa"]) == [0, 1]


def test_labelers_are_deterministic_per_comparison():
    a = GoldLabeler(length_score, noise=0.5, seed=3)
    b = GoldLabeler(length_score, noise=0.5, seed=3)
    data = random_items(30, 3)
    backwards = [b.label(p, rs) for p, rs in reversed(data)]
    assert [a.label(p, rs) for p, rs in data] == backwards[::-1]
    c = GoldLabeler(length_score, noise=0.5, seed=4)
    assert [a.label(p, rs) for p, rs in data] != [c.label(p, rs) for p, rs in data]


def test_bradley_terry_labeler_win_rate():
    beta, gap = 0.5, 2.0
    labeler = BradleyTerryLabeler(length_score, beta=beta, seed=0)
    n = 3000
    wins = sum(labeler.label(f"p{i}", ["ab", "abcd"])[0] == 1 for i in range(n))
    expected = 1 / (1 + math.exp(-beta * gap))
    assert abs(wins / n - expected) < 0.03
    ranking = labeler.label("p", ["a", "bb", "ccc", "dddd"])
    assert sorted(ranking) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="beta"):
        BradleyTerryLabeler(length_score, beta=-1)


def test_random_labeler_and_bad_noise():
    ranking = RandomLabeler(seed=0).label("p", ["a", "b", "c"])
    assert sorted(ranking) == [0, 1, 2]
    with pytest.raises(ValueError, match="noise"):
        GoldLabeler(length_score, noise=1.5)
    with pytest.raises(ValueError, match="responses"):
        GoldLabeler(length_score).label("p", ["only one"])


def test_label_store(tmp_path):
    store = ComparisonStore(tmp_path)
    store.add_items([{"id": f"i{n}", "prompt": p, "responses": rs}
                     for n, (p, rs) in enumerate(random_items(10, 3))])
    labeler = GoldLabeler(length_score, noise=0.0, name="gold")
    assert label_store(store, labeler, limit=4) == 4
    assert len(store.unlabeled("gold")) == 6
    assert label_store(store, labeler) == 6
    assert label_store(store, labeler) == 0
    for lb in store.labels():
        item = store.get_item(lb["item_id"])
        scores = [len(item["responses"][i]) for i in lb["ranking"]]
        assert lb["kind"] == "ranking" and scores == sorted(scores, reverse=True)
    chooser = GoldLabeler(length_score, noise=0.0, name="chooser")
    assert label_store(store, chooser, kind="choice") == 10
    counts = store.export_preferences(tmp_path / "p.jsonl")
    assert counts["pairs"] == 10 * 3 + 10 * 2
    with pytest.raises(ValueError, match="kind"):
        label_store(store, labeler, kind="tie")
