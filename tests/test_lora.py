"""LoRA adapters (rlhf_jax/models/lora.py): a zero B starts exactly at the base model; only the
adapters (and the reward / value heads) train, the base stays frozen; DPO's and PPO's
reference is the same base arrays with the adapters off, never a second copy; the folded
export is a plain checkpoint with the adapted model's logits; bad config values are one-line
errors naming the field."""

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from rlhf_jax import dpo, sharding
from rlhf_jax.config_lib import load_config
from rlhf_jax.models import ModelDef, load_model, lora, save_pretrained
from rlhf_jax.ppo import setup as ppo_setup
from rlhf_jax.ppo.step import response_logprobs_and_hidden
from rlhf_jax.reward_functions import count_substring
from rlhf_jax.train.loop import build

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
            max_position_embeddings=64)
RANK, ALPHA = 4, 8.0
ADAPTED = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")


def model_spec(rank=RANK, **lora_fields):
    c = load_config(ROOT / "configs" / "common.py").model
    c.tiny.update(TINY)
    c.lora.rank = rank
    c.lora.alpha = ALPHA
    c.lora.update(lora_fields)
    return c


def _ids(batch=3, length=9, seed=0):
    return np.random.default_rng(seed).integers(3, 250, (batch, length)).astype(np.int32)


def _nbytes(*dicts) -> int:
    return sum(int(v.nbytes) for d in dicts for v in d.values())


def _randomise_b(params: dict, scale: float = 0.5) -> dict:
    """Adapters as after training: B no longer zero, so adapted and base models differ."""
    names = sorted(n for n in params if n.endswith(".lora.b"))
    keys = jax.random.split(jax.random.key(1), len(names))
    out = dict(params)
    for key, n in zip(keys, names):
        out[n] = jax.device_put(scale * jax.random.normal(key, params[n].shape, params[n].dtype), params[n].sharding)
    return out


@pytest.fixture(scope="module")
def base_and_adapted(mesh):
    base, _ = load_model(model_spec(rank=0), mesh=mesh)
    adapted, _ = load_model(model_spec(), mesh=mesh)
    return base, adapted


# ------------------------------------------------------------------------------ the model


def test_zero_b_starts_exactly_at_the_base_model(base_and_adapted):
    base, adapted = base_and_adapted
    names = ModelDef.split(adapted, None)[0].names
    assert sorted(n for n in names if "lora" in n) == sorted(
        f"layers.{i}.{m}.lora.{ab}" for i in range(2) for m in ADAPTED for ab in "ab")
    ids = _ids()
    forward = jax.jit(lambda model, i: model(i))
    np.testing.assert_array_equal(np.asarray(forward(adapted, ids)), np.asarray(forward(base, ids)))
    # ... and only because B is zero: with B random the adapters do change the logits.
    model_def, params, rest = ModelDef.split(adapted)
    moved = model_def.merge(_randomise_b(params), rest)
    assert np.abs(np.asarray(forward(moved, ids)) - np.asarray(forward(base, ids))).max() > 0.1
    # base_model switches them off without touching the model it is given.
    np.testing.assert_array_equal(np.asarray(forward(lora.base_model(moved), ids)), np.asarray(forward(base, ids)))
    assert all(m.lora.enabled for _, m in lora._linears(moved) if m.lora is not None)


def test_adapters_are_sharded_by_the_kernels_axes_with_the_rank_replicated():
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    model, _ = load_model(model_spec(), mesh=mesh)
    q, down = model.layers[0].attn.q, model.layers[0].mlp.down
    assert q.lora.a.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)  # kernel: (embed, heads)
    assert q.lora.b.sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
    assert down.lora.a.sharding.spec == jax.sharding.PartitionSpec("tensor", None)  # kernel: (mlp, embed)
    assert down.lora.b.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert q.kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")  # the base as before


@pytest.mark.parametrize("heads,head", [(("lm",), None), (("reward",), "reward_head"), (("lm", "value"), "value_head")])
def test_only_adapters_and_fresh_heads_train(mesh, heads, head):
    model, _ = load_model(model_spec(), heads=heads, mesh=mesh)
    model_def, params, frozen = lora.split_trainable(model, ".*")
    head_names = {f"{head}.kernel", f"{head}.bias"} if head else set()
    assert set(params) == {n for n in model_def.names if re.search(lora.ADAPTER_NAMES, n)} | head_names
    d, m, kv = 32, 64, 2 * 8
    per_layer = RANK * ((d + 32) + 2 * (d + kv) + (32 + d) + 2 * (d + m) + (m + d))
    assert sum(v.size for v in params.values()) == 2 * per_layer + (d + 1 if head else 0)
    base, _ = load_model(model_spec(rank=0), heads=heads, mesh=mesh)
    base_names = set(ModelDef.split(base, None)[0].names) - head_names
    assert base_names <= set(frozen) and not any("lora" in n for n in frozen)
    # train.trainable narrows what trains (here: layer 0's adapters); the base never trains.
    _, params0, _ = lora.split_trainable(model, r"layers\.0\.")
    assert set(params0) == {n for n in params if n.startswith("layers.0.")}
    with pytest.raises(ValueError, match=r"^train\.trainable='embed' matches no LoRA adapter") as e:
        lora.split_trainable(model, "embed")
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------ the stages


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora_data")
    words = ["red", "green", "blue", "cat"]
    (d / "sft.jsonl").write_text("".join(json.dumps({"prompt": f"say {w}:", "completion": f" {w} {w}"}) + "\n"
                                         for w in words * 8))
    (d / "pref.jsonl").write_text("".join(
        json.dumps({"prompt": f"say {w} {i}:", "chosen": f" {w} {w}", "rejected": " mud mud"}) + "\n"
        for i, w in enumerate(words * 8)))
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}:"}) + "\n" for i in range(16)))
    return d


def stage_config(stage, data_path, **changes):
    c = load_config(ROOT / "configs" / f"{stage}.py")
    c.model.tiny.update(TINY)
    c.model.lora.update(dict(rank=RANK, alpha=ALPHA))
    c.data.path = str(data_path)
    c.data.max_length = 24
    c.data.eval_fraction = 0.0
    c.train.batch_size = 8
    c.train.num_steps = 1
    c.train.progress_bar = False
    c.train.checkpoint_every = 0
    c.mesh.num_devices = 1
    c.optimizer.lr = 1e-2
    c.optimizer.warmup_steps = 0
    c.update_from_flattened_dict(changes)
    return c


def test_one_sft_step_changes_only_the_adapters(data_dir, tmp_path):
    r, _ = build(stage_config("sft", data_dir / "sft.jsonl"), tmp_path)
    assert set(r.state.params) == {n for n in r.model_def.names if re.search(lora.ADAPTER_NAMES, n)}
    before = jax.device_get((r.state.params, r.state.frozen))
    batch = next(r.stacked_batches(0))
    r.state, metrics = r.train_step(r.state, dict(zip(batch, r.rt.to_global(batch.values(), stacked=True))))
    params, frozen = jax.device_get((r.state.params, r.state.frozen))
    assert np.isfinite(float(metrics["loss"]))
    for name, value in frozen.items():
        np.testing.assert_array_equal(value, before[1][name], err_msg=name)
    moved = [n for n in params if not np.array_equal(params[n], before[0][n])]
    assert {n for n in moved if n.endswith(".lora.b")} == {n for n in params if n.endswith(".lora.b")}


def test_dpo_reference_is_the_base_with_adapters_off_and_no_copy(data_dir, tmp_path, mesh):
    cfg = stage_config("dpo", data_dir / "pref.jsonl", **{"dpo.max_responses": 8, "dpo.max_pairs": 4})
    r, _ = build(cfg, tmp_path / "lora")
    assert not any(k.startswith(dpo.REFERENCE_PREFIX) for k in r.state.frozen)
    model = r.model_def.merge(r.state.params, r.state.frozen)
    assert _nbytes(r.state.params, r.state.frozen) == _nbytes(ModelDef.split(model, None)[2])  # one copy
    # Without LoRA the same stage holds a copy of every trained array for its reference.
    plain, _ = build(stage_config("dpo", data_dir / "pref.jsonl", **{"model.lora.rank": 0, "dpo.max_responses": 8,
                                                                         "dpo.max_pairs": 4}), tmp_path / "plain")
    copies = {k: v for k, v in plain.state.frozen.items() if k.startswith(dpo.REFERENCE_PREFIX)}
    assert _nbytes(copies) == _nbytes(plain.state.params) > 0

    batch = {k: jnp.asarray(v) for k, v in next(r.batches(r.train_data, shuffle=False)).items()}
    policy = r.model_def.merge(_randomise_b(r.state.params), r.state.frozen)  # as after training
    base, _ = load_model(model_spec(rank=0), mesh=mesh, seed=cfg.seed)
    logps = jax.jit(dpo.response_logprobs)
    want = np.asarray(logps(base, batch))
    ref = jax.jit(lambda p, b: dpo.response_logprobs(dpo.reference_model(p, r.state.frozen), b))(policy, batch)
    np.testing.assert_allclose(np.asarray(ref), want, rtol=0, atol=1e-5)
    assert np.abs(np.asarray(logps(policy, batch)) - want).max() > 0.1  # the policy itself has moved
    # The precomputed reference (dpo.precompute_reference) reads the base the same way.
    _, _, values = ModelDef.split(policy, None)
    np.testing.assert_allclose(np.asarray(jax.jit(dpo._logps_program, static_argnums=0)(r.model_def, values, batch)),
                               want, rtol=0, atol=1e-5)


def test_ppo_reference_is_the_base_with_adapters_off_and_no_copy(data_dir, tmp_path, mesh):
    cfg = stage_config("ppo", data_dir / "prompts.jsonl", **{"model.init": "tiny",
        "data.max_prompt_length": 8, "data.max_length": 16, "sampling.max_new_tokens": 6, "ppo.batch_size": 8,
        "ppo.num_minibatches": 2, "ppo.num_updates": 1, "ppo.penalize_missing_eos": False})
    s = ppo_setup.build(cfg, tmp_path, reward_functions=[count_substring("a")])
    assert s.models.ref_def is None and s.models.ref_params == {}
    assert "value_head.kernel" in s.state.params["policy"]  # PPO's shared critic head trains with the adapters
    policy = s.models.defs["policy"].merge(s.state.params["policy"], s.state.frozen["policy"])
    assert _nbytes(s.state.params["policy"], s.state.frozen["policy"]) == _nbytes(ModelDef.split(policy, None)[2])

    state = s.state.replace(params={**s.state.params, "policy": _randomise_b(s.state.params["policy"])})
    q_ids, r_ids = _ids(8, 8, seed=2), _ids(8, 6, seed=3)
    q_mask, r_mask = np.ones_like(q_ids), np.ones_like(r_ids)
    logp, ref_logp, _, _ = s.score(state, *s.rt.to_global([q_ids, q_mask, r_ids, r_mask]))
    base, _ = load_model(model_spec(rank=0), mesh=mesh, seed=cfg.seed)
    want, _, _ = jax.jit(response_logprobs_and_hidden, static_argnums=(3, 4))(
        base, np.concatenate([q_ids, r_ids], 1), np.ones((8, 14), np.int32), 8, float(cfg.sampling.temperature))
    np.testing.assert_allclose(np.asarray(ref_logp), np.asarray(want), rtol=0, atol=1e-5)
    assert np.abs(np.asarray(logp) - np.asarray(want)).max() > 0.1


# ------------------------------------------------------------------------------ export


def test_merged_export_is_a_plain_checkpoint_with_the_adapted_logits(base_and_adapted, tmp_path, mesh):
    _, adapted = base_and_adapted
    model_def, params, rest = ModelDef.split(adapted)
    model = model_def.merge(_randomise_b(params), rest)
    ids = _ids(3, 9)
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # one left-padded row
    want = np.asarray(jax.jit(lambda m, i, k: m(i, k))(model, ids, mask))
    out = save_pretrained(model, tmp_path / "merged")  # what every stage's final export calls
    assert not any("lora" in k for k in load_file(out / "model.safetensors"))
    assert lora.has_adapters(model)  # the trained model is left as it was
    reloaded, _ = load_model(out, tokenizer="byte", mesh=mesh)
    assert not lora.has_adapters(reloaded)
    got = np.asarray(jax.jit(lambda m, i, k: m(i, k))(reloaded, ids, mask))
    real = mask > 0
    assert np.abs(got - want)[real].max() < 1e-4
    base = np.asarray(jax.jit(lambda m, i, k: m(i, k))(base_and_adapted[0], ids, mask))
    assert np.abs(base - want)[real].max() > 0.1  # the folded adapters are in the export

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    for b in (0, 2):  # rows without padding
        with torch.no_grad():
            logits = hf(torch.tensor(ids[b:b + 1], dtype=torch.long)).logits[0].numpy()
        assert np.abs(logits - want[b]).max() < 1e-4


# ------------------------------------------------------------------------------ config


def test_the_config_default_targets_are_the_modules():
    assert load_config(ROOT / "configs" / "common.py").model.lora.targets == lora.DEFAULT_TARGETS


@pytest.mark.parametrize("field,value,needle", [
    ("rank", -1, "model.lora.rank must be an integer >= 0"),
    ("rank", 2.5, "model.lora.rank must be an integer >= 0"),
    ("alpha", 0.0, "model.lora.alpha must be a number > 0"),
    ("targets", "layers.(", "model.lora.targets='layers.(' is not a valid regex"),
    ("targets", r"layers\.\d+\.attn\.w", r"model.lora.targets='layers\\.\\d+\\.attn\\.w' matches no Linear layer"),
])
def test_bad_lora_values_are_one_line_errors_naming_the_field(mesh, field, value, needle):
    spec = model_spec().to_dict()
    spec["lora"][field] = value
    with pytest.raises(ValueError) as e:
        load_model(spec, mesh=mesh)
    assert str(e.value).startswith(needle) and "\n" not in str(e.value), str(e.value)
