"""Collecting comparisons from a trained policy and labeling them with a reward model.

One tiny SFT policy and one tiny RM per module, trained for a few steps by the real loop on
test_train_loop's synthetic task ("say red 3:" -> " red red"), then: sampling K responses
per prompt into a store, determinism and re-runs, `RMLabeler` against RM scores computed
directly, and the whole cycle store -> labels -> export -> `preference_dataset`.
"""

import numpy as np
import pytest
from flax import nnx
from test_train_loop import WORDS, data_dir, tiny_config  # noqa: F401  (data_dir is a fixture)

from rlhf_jax.data import left_pad, load_tokenizer, preference_dataset
from rlhf_jax.feedback import ComparisonStore, label_store
from rlhf_jax.feedback.collect import collect_comparisons
from rlhf_jax import reward_model
from rlhf_jax.feedback.rm_labeler import RMLabeler
from rlhf_jax.models import load_pretrained
from rlhf_jax.train.loop import run

K = 3
# 5 prompts at 2 per batch (batch_size 6 = 2 groups of K): the last batch is padded.
PROMPTS = [f"say {WORDS[i % len(WORDS)]} {i % 7}:" for i in range(5)]
COLLECT = dict(num_responses=K, max_new_tokens=8, temperature=1.0, batch_size=6, max_prompt_length=16)
# No checkpoints, evaluation or tensorboard: the fixtures only need the final model dir.
FAST = {"train.checkpoint_every": 0, "train.eval_every": 0, "train.tensorboard": False, "data.eval_fraction": 0.0}


@pytest.fixture(scope="module")
def policy_dir(data_dir, tmp_path_factory):  # noqa: F811
    workdir = tmp_path_factory.mktemp("sft")
    run(tiny_config("sft", data_dir / "sft.jsonl", **FAST, **{"optimizer.lr": 1e-2}), workdir)
    return workdir / "model"


@pytest.fixture(scope="module")
def policy_pair(policy_dir, mesh):
    """(model, tokenizer) of the policy: loading takes seconds, so the later collections share it."""
    return load_pretrained(policy_dir, heads=("lm",), mesh=mesh), load_tokenizer(str(policy_dir))


@pytest.fixture(scope="module")
def rm_dir(data_dir, tmp_path_factory):  # noqa: F811
    workdir = tmp_path_factory.mktemp("rm")
    run(tiny_config("rm", data_dir / "pref.jsonl", **FAST), workdir)
    return workdir / "model"


@pytest.fixture(scope="module")
def rm_labeler(rm_dir, mesh):
    """A noise-free RMLabeler loaded from the RM directory (loading takes seconds: once)."""
    return RMLabeler(rm_dir, mesh=mesh, max_length=32, batch_size=4)


@pytest.fixture(scope="module")
def rm_pair(rm_labeler):
    """(model, tokenizer) of the same RM, for direct scoring and more labelers."""
    return rm_labeler.model_def.merge(rm_labeler.params), rm_labeler.tokenizer


@pytest.fixture(scope="module")
def collected(policy_dir, mesh, tmp_path_factory):
    """A store with round 1 collected from PROMPTS with seed 0, and the returned ids."""
    store = ComparisonStore(tmp_path_factory.mktemp("store"))
    ids = collect_comparisons(store, policy_dir, PROMPTS, seed=0, meta={"round": 1, "note": "test"}, mesh=mesh,
                              **COLLECT)
    return store, ids


def _contents(store):
    return [(it["id"], it["prompt"], it["responses"], it["meta"]) for it in store.items()]


def test_collect_adds_k_responses_per_prompt_with_meta(collected, policy_dir):
    store, ids = collected
    items = store.items()
    assert [it["id"] for it in items] == ids and len(set(ids)) == len(PROMPTS)
    assert all(i.startswith("r1-") for i in ids)
    for n, (item, prompt) in enumerate(zip(items, PROMPTS)):
        assert item["prompt"] == prompt
        assert len(item["responses"]) == K and all(isinstance(r, str) for r in item["responses"])
        assert not any("<eos>" in r or "<pad>" in r for r in item["responses"])  # special tokens skipped
        meta = item["meta"]
        assert meta["round"] == 1 and meta["note"] == "test" and meta["prompt_index"] == n
        assert meta["policy"] == str(policy_dir.resolve())
        assert (meta["seed"], meta["temperature"], meta["num_responses"]) == (0, 1.0, K)
        assert meta["max_new_tokens"] == 8 and meta["prompt_truncated"] is False
        assert len(meta["stopped"]) == K and all(isinstance(s, bool) for s in meta["stopped"])
        for stopped, n_tok in zip(meta["stopped"], meta["num_tokens"]):
            assert 1 <= n_tok <= 8 and (stopped or n_tok == 8)
    # Decoding kept the text: not every response came back empty.
    assert any(r.strip() for it in items for r in it["responses"])


def test_collect_is_deterministic_per_seed_and_resumes(collected, policy_dir, policy_pair, tmp_path):
    store, ids = collected
    # The same policy as a (model, tokenizer) pair, named like the directory, so that its
    # items must equal the directory's.
    meta = {"round": 1, "note": "test", "policy": str(policy_dir.resolve())}
    # Resuming after a crash that left batch 0 (the first 2 prompts, one add_items call)
    # behind: only batches 1 and 2 are sampled, with their own keys, so the result equals
    # the uninterrupted collection.
    again = ComparisonStore(tmp_path / "again")
    again.add_items(store.items()[:2])
    assert collect_comparisons(again, policy_pair, PROMPTS, seed=0, meta=meta, **COLLECT) == ids
    assert _contents(again) == _contents(store)

    other = ComparisonStore(tmp_path / "other")
    collect_comparisons(other, policy_pair, PROMPTS, seed=1, meta=meta, **COLLECT)
    assert [it["responses"] for it in other.items()] != [it["responses"] for it in store.items()]


def test_rerun_does_not_duplicate_and_other_settings_need_a_new_round(collected, policy_dir, mesh):
    store, ids = collected
    before = _contents(store)
    assert collect_comparisons(store, policy_dir, PROMPTS, seed=0, meta={"round": 1, "note": "test"}, mesh=mesh,
                               **COLLECT) == ids
    assert _contents(store) == before
    with pytest.raises(ValueError, match=r"seed=0.*seed=5.*round"):
        collect_comparisons(store, policy_dir, PROMPTS, seed=5, meta={"round": 1}, mesh=mesh, **COLLECT)
    assert _contents(store) == before


def test_collect_rejects_bad_arguments(collected, policy_dir):
    store, _ = collected
    with pytest.raises(ValueError, match="num_responses"):
        collect_comparisons(store, policy_dir, PROMPTS, num_responses=1)
    with pytest.raises(ValueError, match="stopped"):
        collect_comparisons(store, policy_dir, PROMPTS, meta={"stopped": []})
    with pytest.raises(FileNotFoundError, match="no such file"):
        collect_comparisons(store, policy_dir, "no/such/prompts.jsonl")


def _direct_scores(rm_pair, prompt, responses):
    """RM scores of [BOS] + prompt + response + [EOS], built by hand (byte tokenizer)."""
    model, tok = rm_pair
    seqs = [np.asarray([tok.bos_token_id] + list((prompt + r).encode()) + [tok.eos_token_id], np.int32)
            for r in responses]
    ids, mask = left_pad(seqs, 32, tok.pad_token_id)  # one length: one compilation
    return np.asarray(_reward(model, ids, mask))


@nnx.jit
def _reward(model, ids, mask):
    return reward_model.scores(model, ids, mask)


def test_rm_labeler_ranks_by_rm_score(collected, rm_labeler, rm_pair):
    store, _ = collected
    labeler = rm_labeler
    comparisons = [(it["prompt"], it["responses"]) for it in store.items()]
    comparisons.append(("say red 1:", [" red red", " mud mud", " blue", " ash"]))
    checked = 0
    for (prompt, responses), ranking in zip(comparisons, labeler.label_many(comparisons)):
        if any(len((prompt + r).encode()) + 2 > 32 for r in responses):
            continue  # the labeler truncates to max_length 32; _direct_scores does not
        direct = _direct_scores(rm_pair, prompt, responses)
        np.testing.assert_allclose(labeler.scores([(prompt, r) for r in responses]), direct, atol=1e-4)
        assert sorted(ranking) == list(range(len(responses)))
        assert np.all(np.diff(direct[ranking]) <= 1e-4)  # best first
        if np.min(np.diff(np.sort(direct))) > 1e-3:  # no (near-)ties, e.g. repeated responses
            assert ranking == np.argsort(-direct, kind="stable").tolist()
            assert labeler.label(prompt, responses) == ranking
            checked += 1
    assert checked >= 1


def test_rm_labeler_noise_one_never_returns_the_rm_ranking(collected, rm_labeler, rm_pair, mesh):
    store, _ = collected
    clean = rm_labeler
    noisy = RMLabeler(rm_pair, noise=1.0, mesh=mesh, max_length=32)
    assert noisy.name == "rm-pair-noise1-seed0" and noisy.name != clean.name
    comparisons = [(it["prompt"], it["responses"]) for it in store.items()]
    comparisons.append(("say red 1:", [" red red", " mud mud", " blue"]))
    changed = 0
    for (prompt, responses), a, b in zip(comparisons, clean.label_many(comparisons), noisy.label_many(comparisons)):
        scores = clean.scores([(prompt, r) for r in responses])
        if np.min(np.diff(np.sort(scores))) > 1e-3:  # gold ranking unambiguous
            assert a != b
            changed += 1
    assert changed >= 1


def test_full_cycle_store_rm_labels_export_preference_dataset(collected, rm_labeler, rm_dir, tmp_path):
    store, ids = collected
    labeler = rm_labeler
    assert labeler.name.startswith("rm-rm") and labeler.name.endswith("-noise0-seed0")  # from the dir's parent
    assert label_store(store, labeler) == len(ids)
    assert label_store(store, labeler) == 0  # all labeled
    labels = store.labels(labeler=labeler.name)
    assert sorted(lb["item_id"] for lb in labels) == sorted(ids)
    for lb in labels:  # the batched path stores what one-by-one labeling would
        item = store.get_item(lb["item_id"])
        assert lb["kind"] == "ranking" and lb["ranking"] == labeler.label(item["prompt"], item["responses"])

    out = tmp_path / "prefs.jsonl"
    counts = store.export_preferences(out)
    assert counts["labels"] == len(ids)
    # Each full ranking of K responses asserts K(K-1)/2 pairs; the export drops only those
    # with an empty or repeated response.
    assert counts["pairs"] + counts["dropped_pairs"] == len(ids) * K * (K - 1) // 2
    assert counts["pairs"] == counts["rows"] > 0
    ds = preference_dataset(out, str(rm_dir), max_length=32)
    assert ds.num_pairs() == counts["pairs"]


def test_an_extra_stop_token_ends_a_response_and_is_not_part_of_its_text(policy_pair, tmp_path):
    store = ComparisonStore(tmp_path / "stops")
    space = policy_pair[1].encode(" ", add_special_tokens=False)[0]
    collect_comparisons(store, policy_pair, PROMPTS, seed=0, meta={"round": 1}, extra_stop_token_ids=(space,),
                        **COLLECT)
    items = store.items()
    assert all(it["meta"]["extra_stop_token_ids"] == [space] for it in items)
    responses = [r for it in items for r in it["responses"]]
    assert not any(" " in r for r in responses)  # the first space ended each response, and was left out
    stopped = [(s, n) for it in items for s, n in zip(it["meta"]["stopped"], it["meta"]["num_tokens"])]
    assert any(s and n < COLLECT["max_new_tokens"] for s, n in stopped)
