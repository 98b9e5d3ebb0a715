"""The one model loader (`rlhf_jax.models.load`) and the runtime's batch shardings, which
follow the rules table (an overridden `batch` rule moves the jitted in-shardings and the fed
arrays together)."""

import ml_collections
import numpy as np
import pytest

from rlhf_jax import sharding
from rlhf_jax.models import ModelDef, load_frozen, load_model, load_tokenizer_of, save_pretrained
from rlhf_jax.models.load import resolve
from rlhf_jax.train.runtime import Runtime

TINY = dict(model_type="llama", hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
            max_position_embeddings=64, tie_embeddings=True, rope_theta=10000.0)


def tiny_spec(**changes):
    return ml_collections.ConfigDict(dict(init="tiny", path="", dtype="float32", param_dtype="float32",
                                          tiny=TINY, **changes))


def test_tiny_spec_gives_model_and_byte_tokenizer(mesh):
    model, tok = load_model(tiny_spec(), heads=("lm", "value"), mesh=mesh, seed=3)
    assert model.heads == ("lm", "value") and model.cfg.vocab_size == len(tok)
    again, _ = load_model(tiny_spec(), heads=("lm", "value"), mesh=mesh, seed=3)
    np.testing.assert_array_equal(np.asarray(model.embed[...]), np.asarray(again.embed[...]))


def test_directory_round_trip_and_frozen_split(mesh, tmp_path):
    model, tok = load_model(tiny_spec(), heads=("reward",), mesh=mesh)
    save_pretrained(model, tmp_path / "rm", tokenizer=tok)
    for spec in (str(tmp_path / "rm"), dict(init="pretrained", path=str(tmp_path / "rm"), dtype=None,
                                            param_dtype=None)):
        loaded, loaded_tok = load_model(spec, heads=("reward",), mesh=mesh)
        np.testing.assert_array_equal(np.asarray(loaded.reward_head.kernel[...]),
                                      np.asarray(model.reward_head.kernel[...]))
        assert len(loaded_tok) == len(tok)
    model_def, params, _ = load_frozen(str(tmp_path / "rm"), heads=("reward",), mesh=mesh)
    assert isinstance(model_def, ModelDef) and set(params) == set(model_def.names)
    assert len(load_tokenizer_of(str(tmp_path / "rm"))) == len(tok)
    assert resolve(str(tmp_path / "rm")).path == str((tmp_path / "rm").resolve())


def test_pair_is_checked_for_heads(mesh):
    pair = load_model(tiny_spec(), heads=("lm",), mesh=mesh)
    assert load_model(pair, heads=("lm",))[0] is pair[0]
    with pytest.raises(ValueError, match="needs \\['reward'\\]"):
        load_model(pair, heads=("reward",))


@pytest.mark.parametrize("spec, error, match", [
    (dict(init="nope", path=""), ValueError, "model.init='nope'"),
    (dict(init="pretrained", path=""), ValueError, "model.path"),
    ("/no/such/dir", FileNotFoundError, "config.json"),
    (3, TypeError, "int"),
])
def test_bad_specs_name_the_problem(spec, error, match):
    with pytest.raises(error, match=match):
        resolve(spec)


@pytest.mark.parametrize("rule", [("data",), ("data", "fsdp"), ("fsdp",)])
def test_batch_shardings_follow_the_rules_table(tmp_path, rule):
    cfg = ml_collections.ConfigDict(dict(
        mesh=dict(data=4, fsdp=2, tensor=1, num_devices=8),
        sharding_rules=[["batch", list(rule)]] + [[k, v] for k, v in sharding.DEFAULT_RULES if k != "batch"]))
    rt = Runtime(cfg, tmp_path)
    batch = {"input_ids": np.zeros((2, 8, 5), np.int32)}
    placed = rt.to_global(batch.values(), stacked=True)[0]
    want = rt.batch_shardings(batch)["input_ids"]
    assert placed.sharding.is_equivalent_to(want, 3)
    axes = want.spec[1]
    assert ((axes,) if isinstance(axes, str) else tuple(axes)) == rule
