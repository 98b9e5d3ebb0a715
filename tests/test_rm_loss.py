"""The reward model's pairwise loss: per-prompt weighting of K-wise rankings (InstructGPT)
against a hand-computed loss, exact ties reported as ties, and the stage's batch settings."""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import data as data_lib
from rlhf_jax import reward_model, sharding
from rlhf_jax.models import ModelConfig, Transformer

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def rm_and_batches():
    cfg = ModelConfig(model_type="llama", vocab_size=262, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                      head_dim=8, mlp_dim=64, max_position_embeddings=32)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    model = sharding.create_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0), heads=("reward",)), mesh)
    # Rankings of K = 2, 3 and 4 responses: 1, 3 and 6 pairs.
    ds = data_lib.preference_dataset(FIXTURES / "pref_ranked.jsonl", "byte", max_length=16)
    batches = {w: data_lib.batching.preference_batch(ds, [0, 1, 2], 12, 12, pair_weighting=w)
               for w in data_lib.batching.PAIR_WEIGHTINGS}
    return model, batches


def _loss(model, batch):
    loss_sum, weight, stats = reward_model.rm_loss(model, {k: jnp.asarray(v) for k, v in batch.items()})
    return float(loss_sum) / float(weight), float(weight), {k: float(s) / float(n) for k, (s, n) in stats.items()}


def test_per_prompt_weighting_against_a_hand_computed_loss(rm_and_batches):
    model, batches = rm_and_batches
    batch = batches["per_prompt"]
    r = np.asarray(reward_model.raw_scores(model, batch["input_ids"], batch["attention_mask"]), np.float64)
    nll = lambda c, j: -math.log(1.0 / (1.0 + math.exp(-(r[c] - r[j]))))  # −log σ(r₊ − r₋)
    # Rows: "Two:" 0-1, "Three:" 2-4, "Four:" 5-8, each ranked best first.
    two = [nll(0, 1)]
    three = [nll(2, 3), nll(2, 4), nll(3, 4)]
    four = [nll(c, j) for c in range(5, 9) for j in range(c + 1, 9)]
    per_prompt = (sum(two) / 1 + sum(three) / 3 + sum(four) / 6) / 3  # each prompt one element
    per_pair = sum(two + three + four) / 10
    assert abs(per_prompt - per_pair) > 1e-3  # the test tells them apart

    loss, weight, stats = _loss(model, batch)
    assert weight == pytest.approx(3.0) and loss == pytest.approx(per_prompt, rel=1e-5)
    wins = [r[0] > r[1]] + [r[c] > r[j] for c, j in ((2, 3), (2, 4), (3, 4))] + \
        [r[c] > r[j] for c in range(5, 9) for j in range(c + 1, 9)]
    want_acc = (wins[0] + sum(wins[1:4]) / 3 + sum(wins[4:]) / 6) / 3
    assert stats["accuracy"] == pytest.approx(want_acc, rel=1e-6) and stats["pairs_per_batch"] == 10

    loss, weight, _ = _loss(model, batches["per_pair"])
    assert weight == 10 and loss == pytest.approx(per_pair, rel=1e-5)
    unweighted = {k: v for k, v in batches["per_pair"].items() if k != "pair_weight"}
    assert _loss(model, unweighted)[0] == pytest.approx(per_pair, rel=1e-5)


def test_an_exact_tie_is_half_right_and_reported(rm_and_batches):
    model, batches = rm_and_batches
    batch = dict(batches["per_pair"])
    batch["rejected_idx"] = batch["chosen_idx"].copy()  # every pair compares a response with itself
    _, _, stats = _loss(model, batch)
    assert stats["ties"] == 1.0 and stats["accuracy"] == 0.5 and stats["loss"] == pytest.approx(math.log(2))
    _, _, stats = _loss(model, batches["per_pair"])
    assert stats["ties"] == 0.0


def test_rm_batch_settings_default_to_per_prompt_and_name_a_bad_field():
    from rlhf_jax.config_lib import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "rm.py")
    assert reward_model.batch_kwargs(cfg) == dict(max_responses=16, max_pairs=8, pair_weighting="per_prompt",
                                                  pad_to_multiple_of=0, pack=True, row_multiple=2)
    bad = ml_collections.ConfigDict(dict(rm=dict(max_responses=4, max_pairs=4, pair_weighting="per_token")))
    with pytest.raises(ValueError, match=r"rm.pair_weighting='per_token' is not one of \['per_pair', 'per_prompt'\]"):
        reward_model.batch_kwargs(bad)
