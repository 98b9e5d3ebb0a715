"""The dpo stage of the training loop: DPO batches (response masks, per-prompt weights, stored
reference log-probs), a tiny run that learns, resumes and starts at log 2 with all ties, the
precomputed reference against the on-the-fly one, and the loss's gradient on a real model at
policy = reference against β/2 × the gradient of the chosen-minus-rejected log-ratio."""

import functools
import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from rlhf_jax import data as data_lib
from rlhf_jax import dpo, sharding
from rlhf_jax.config_lib import load_config
from rlhf_jax.models import ModelConfig, ModelDef, Transformer
from rlhf_jax.train.logging import read_metrics
from rlhf_jax.train.loop import build, run

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
WORDS = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree"]
BAD_WORDS = ["mud", "ash", "rot", "dust"]


@pytest.fixture(scope="module")
def pref_path(tmp_path_factory):
    """The preferred response repeats the prompt's word, the rejected one a 'bad' word; repeated
    prompts give groups of one chosen and several rejected responses."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(96):
        w = WORDS[i % len(WORDS)]
        bad = BAD_WORDS[rng.integers(0, len(BAD_WORDS))]
        rows.append({"prompt": f"say {w} {i % 7}:", "chosen": f" {w} {w}", "rejected": f" {bad} {bad}"})
    path = tmp_path_factory.mktemp("dpo_data") / "pref.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_dpo_config(data_path, **changes):
    c = load_config(ROOT / "configs" / "dpo.py")
    c.model.tiny.update(dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64))
    c.data.path = str(data_path)
    c.data.max_length = 32
    c.data.eval_fraction = 0.125
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 2
    c.train.num_steps = 12
    c.train.log_every = 1
    c.train.eval_every = 4
    c.train.checkpoint_every = 4
    c.train.progress_bar = False
    c.dpo.max_responses = 8
    c.dpo.max_pairs = 4
    c.mesh.num_devices = 1
    c.update_from_flattened_dict(changes)
    return c


# ------------------------------------------------------------------------------ batches


def test_dpo_batch_keys_mask_the_responses_and_weight_per_prompt():
    ds = data_lib.preference_dataset(FIXTURES / "pref_ranked.jsonl", "byte", max_length=16)
    b = data_lib.batching.preference_batch(ds, [0, 1], 8, 6, response_mask=True, pair_weighting="per_prompt")
    # Row 0 is [BOS] "Two:" " a" [EOS], left-padded: the response is " a" and EOS, the last 3 tokens.
    np.testing.assert_array_equal(b["response_mask"][0], [0] * 13 + [1] * 3)
    assert b["response_mask"][5:].sum() == 0  # unused response slots
    np.testing.assert_allclose(b["pair_weight"], [1, 1 / 3, 1 / 3, 1 / 3, 0, 0], rtol=1e-6)
    per_pair = data_lib.batching.preference_batch(ds, [0, 1], 8, 6, pair_weighting="per_pair")
    np.testing.assert_array_equal(per_pair["pair_weight"], [1, 1, 1, 1, 0, 0])
    plain = data_lib.batching.preference_batch(ds, [0, 1], 8, 6)
    assert set(plain) == {"input_ids", "attention_mask", "chosen_idx", "rejected_idx", "margin", "pair_mask"}
    # Stored reference log-probs come back per response row, in batch order.
    scored = dpo.attach_reference_logps(ds, lambda batch: -np.arange(8, dtype=np.float32), 8, 6)
    again = data_lib.batching.preference_batch(scored, [1, 0], 8, 6, response_mask=True)
    np.testing.assert_array_equal(again["ref_logps"], [-2, -3, -4, 0, -1, 0, 0, 0])


def test_reference_logps_scored_on_packed_rows_land_on_their_responses():
    """A scorer that sums each response's token ids over its response tokens: the values stored
    per response are the same whether the batches it scores are packed or one response per row."""
    ds = data_lib.preference_dataset(FIXTURES / "pref_ranked.jsonl", "byte", max_length=32)

    rows = []

    def id_sums(batch):
        rows.append(batch["input_ids"].shape[0])
        m = batch["response_mask"] * batch["input_ids"]
        if "response_idx" not in batch:
            return m.sum(-1)
        return np.bincount(np.maximum(batch["response_idx"], 0).ravel(), m.ravel(), minlength=8)

    padded = dpo.attach_reference_logps(ds, id_sums, 8, 6)
    assert set(rows) == {8}
    rows.clear()
    packed = dpo.attach_reference_logps(ds, id_sums, 8, 6, packed_rows_multiple=4)
    assert set(rows) == {4}  # 8 response slots packed into 4 rows
    for a, b in zip(padded.examples, packed.examples):
        assert a.ref_logps.min() > 0
        np.testing.assert_array_equal(a.ref_logps, b.ref_logps)


# ------------------------------------------------------------------------------ the stage


@pytest.fixture(scope="module")
def trained(pref_path, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dpo_run")
    return workdir, run(tiny_dpo_config(pref_path), workdir)


def test_dpo_run_starts_at_log2_with_ties_and_raises_held_out_accuracy(trained):
    workdir, summary = trained
    for name in ("summary.json", "metrics.jsonl", "model/model.safetensors", "model/tokenizer.json"):
        assert (workdir / name).exists(), name
    evals = {r["step"]: r for r in read_metrics(workdir) if "eval/loss" in r}
    assert sorted(evals) == [0, 4, 8, 12]
    start = evals[0]  # policy = reference: every pair is a tie
    assert start["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert start["eval/rewards/accuracy"] == 0.5 and start["eval/rewards/ties"] == 1.0
    assert start["eval/rewards/margins"] == 0.0 and start["eval/kl_proxy"] == 0.0
    assert summary["eval/rewards/accuracy"] > 0.9 and summary["eval/rewards/ties"] == 0.0
    assert summary["eval/loss"] < start["eval/loss"] and summary["eval/rewards/margins"] > 0
    assert summary["stage"] == "dpo" and json.loads((workdir / "summary.json").read_text())["steps"] == 12


def test_dpo_resumes_to_identical_parameters(trained, pref_path, tmp_path):
    """A restart from the step-4 checkpoint (the reference restored with the state) ends where
    the uninterrupted run ended."""
    workdir, _ = trained
    shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
    for step in ("8", "12"):
        shutil.rmtree(tmp_path / "checkpoints" / step)
    run(tiny_dpo_config(pref_path), tmp_path)
    assert min(r["step"] for r in read_metrics(tmp_path)) == 5  # it resumed: no step-0 evaluation
    a, b = load_file(workdir / "model" / "model.safetensors"), load_file(tmp_path / "model" / "model.safetensors")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_four_devices_with_packed_rows_match_one_device_with_a_row_per_response(pref_path, tmp_path):
    """Packed response rows (the configs' default; two micro-batches a step, which share a row
    count) sharded over data × fsdp, the pairs indexing the global batch and the reference's
    copies sharded like the parameters: the same losses as one response per left-padded row
    on one device."""
    changes = {"train.num_steps": 4, "train.eval_every": 0, "train.grad_accum": 2}
    assert tiny_dpo_config(pref_path).data.packing
    run(tiny_dpo_config(pref_path, **changes, **{"data.packing": False}), tmp_path / "one")
    run(tiny_dpo_config(pref_path, **changes, **{"mesh.num_devices": 4, "mesh.data": 2, "mesh.fsdp": 2}),
        tmp_path / "four")
    one, four = ([r for r in read_metrics(tmp_path / name) if "train/loss" in r] for name in ("one", "four"))
    assert [r["step"] for r in four] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["train/loss"] for r in four], [r["train/loss"] for r in one], atol=1e-5)


def test_precomputed_reference_matches_on_the_fly(trained, pref_path, tmp_path):
    """A fresh policy against the trained run's model as `dpo.reference_path`: one train step and
    one evaluation give the same numbers whether the reference is run in the step or before."""
    reference = str(trained[0] / "model")
    outs = []
    for precompute in (False, True):
        cfg = tiny_dpo_config(pref_path, **{"dpo.reference_path": reference, "dpo.precompute_reference": precompute})
        r, _ = build(cfg, tmp_path / str(precompute))
        assert any(k.startswith(dpo.REFERENCE_PREFIX) for k in r.state.frozen) != precompute
        batch = next(r.stacked_batches(0))
        assert ("ref_logps" in batch) == precompute
        before = r.evaluate()
        r.state, metrics = r.train_step(r.state, dict(zip(batch, r.rt.to_global(batch.values(), stacked=True))))
        outs.append((before, jax.device_get(metrics), r.evaluate()))
    (b0, m0, e0), (b1, m1, e1) = outs
    assert b0["eval/rewards/ties"] == 0.0  # the reference is not the policy here
    for x, y in ((b0, b1), (m0, m1), (e0, e1)):
        for k in ("loss", "rewards/margins", "kl_proxy"):
            key = k if k in x else f"eval/{k}"
            np.testing.assert_allclose(float(x[key]), float(y[key]), atol=1e-5, err_msg=key)


def test_config_errors_name_the_dpo_field(pref_path, trained, tmp_path):
    for field, value in (("loss_type", "hinge"), ("beta", 0.0), ("label_smoothing", 0.5),
                         ("pair_weighting", "per_token")):
        with pytest.raises(ValueError, match=f"dpo.{field}"):
            build(tiny_dpo_config(pref_path, **{f"dpo.{field}": value}), tmp_path / field)
    wider = {"dpo.reference_path": str(trained[0] / "model"), "model.tiny.mlp_dim": 48}
    with pytest.raises(ValueError, match="dpo.reference_path"):
        build(tiny_dpo_config(pref_path, **wider), tmp_path / "wider")


# ------------------------------------------------------------------ the gradient at the reference


def _tiny_setup(pref_path):
    cfg = ModelConfig(model_type="llama", vocab_size=259, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, mlp_dim=64, max_position_embeddings=64)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    model = sharding.create_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0), heads=("lm",)), mesh)
    model_def, params, rest = ModelDef.split(model)
    ds = data_lib.preference_dataset(pref_path, "byte", max_length=32)
    batch = next(data_lib.batches(ds, max_responses=8, max_pairs=4, shuffle=False, response_mask=True,
                                  pair_weighting="per_prompt"))
    frozen = {**rest, **{dpo.REFERENCE_PREFIX + k: v for k, v in params.items()}}
    return model_def, params, frozen, {k: jnp.asarray(v) for k, v in batch.items()}


def test_gradient_at_reference_is_half_beta_times_log_ratio_gradient(pref_path):
    model_def, params, frozen, batch = _tiny_setup(pref_path)
    beta = 0.3
    w_P = batch["pair_weight"] * batch["pair_mask"]
    assert 1 < float(w_P.sum()) < float(batch["pair_mask"].sum())  # per-prompt weights in play

    @functools.partial(jax.jit, static_argnames="loss_type")
    def loss(p, loss_type="sigmoid"):
        return dpo.stage_loss(model_def.merge(p, frozen), batch, frozen, beta=beta, loss_type=loss_type,
                              label_smoothing=0.0)[0]

    def log_ratio_gap(p):  # Σ w (log π(chosen) − log π(rejected))
        logp_N = dpo.response_logprobs(model_def.merge(p, frozen), batch)
        return jnp.sum(w_P * (logp_N[batch["chosen_idx"]] - logp_N[batch["rejected_idx"]]))

    # The policy's and the reference's log-probs come from two differently fused programs (one
    # is differentiated), so they agree to float32 rounding, not bit for bit.
    assert float(loss(params)) == pytest.approx(float(w_P.sum()) * math.log(2), rel=1e-5)
    g_loss, g_gap = jax.jit(jax.grad(loss))(params), jax.jit(jax.grad(log_ratio_gap))(params)
    scale = max(float(jnp.abs(g).max()) for g in g_gap.values())
    for name in params:
        np.testing.assert_allclose(np.asarray(g_loss[name]), -beta / 2 * np.asarray(g_gap[name]),
                                   rtol=1e-4, atol=1e-6 * scale, err_msg=name)
    # The same derivative by central finite differences along a random unit direction
    # (the reference stays put: it is read from `frozen`).
    keys = jax.random.split(jax.random.key(0), len(params))
    d = {k: jax.random.normal(key, v.shape, v.dtype) for key, (k, v) in zip(keys, params.items())}
    norm = jnp.sqrt(sum(jnp.sum(v * v) for v in d.values()))
    d = {k: v / norm for k, v in d.items()}
    eps = 1e-2
    fd = (float(loss({k: params[k] + eps * d[k] for k in params}))
          - float(loss({k: params[k] - eps * d[k] for k in params}))) / (2 * eps)
    analytic = float(sum(jnp.sum(g_loss[k] * d[k]) for k in params))
    assert fd == pytest.approx(analytic, rel=2e-2)
    # IPO at the reference: every pair's loss is (0 − 1/(2β))².
    ipo = loss(params, loss_type="ipo")
    assert float(ipo) == pytest.approx(float(w_P.sum()) / (2 * beta) ** 2, rel=1e-5)  # two fused programs, see above
