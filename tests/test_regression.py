"""Pinned one-step regressions: one SFT step (grad accumulation A=2), one reward-model step and one
`ppo_update` (adaptive KL, 2 epochs x 2 minibatches) on a fixed tiny model, batch and seed give
stored metrics, new beta and parameter changes to 1e-6. A legitimate numeric change must update
these literals in the same commit, and that commit must say why the numbers moved.
"""

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from rlhf_jax import sharding
from rlhf_jax.models import ModelConfig, ModelDef, Transformer
from rlhf_jax.optim import make_optimizer
from rlhf_jax.ppo.core import KLController
from rlhf_jax.ppo.step import PPOHyperparams, PPOState, Rollout, ppo_update
from rlhf_jax.reward_model import rm_loss
from rlhf_jax.sft import finalize_sft_metrics, sft_loss
from rlhf_jax.train import step as step_lib

CFG = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=64, max_position_embeddings=64)
WEIGHT = "layers.0.attn.q.kernel"  # the weight whose change pins the update itself
PRINT = bool(os.environ.get("PRINT_PINNED"))  # PRINT_PINNED=1 pytest -s: print the values to paste


def _optimizer(total_steps):
    c = ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=0, decay="linear", final_lr_fraction=0.1, b1=0.9,
                                       b2=0.95, eps=1e-8, weight_decay=0.01, max_grad_norm=1.0))
    return make_optimizer(c, total_steps)


def _model(heads):
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    model = sharding.create_sharded(lambda: Transformer(CFG, rngs=nnx.Rngs(0), heads=heads), mesh)
    return (mesh, *ModelDef.split(model))


def _left_padded(rng, shape, max_pad, vocab=CFG.vocab_size):
    """Random ids in [1, vocab) with a left-padded mask: each row has 0..max_pad pad slots (id 0)."""
    t = shape[-1]
    pads = rng.integers(0, max_pad + 1, size=shape[:-1])
    mask = (np.arange(t) >= pads[..., None]).astype(np.int32)
    return (rng.integers(1, vocab, size=shape) * mask).astype(np.int32), mask


def _changes(old, new, prefix="weight"):
    """Summed |change| and summed signed change of one weight (the signs follow the gradient)."""
    d = np.asarray(new, np.float64) - np.asarray(old, np.float64)
    return {f"{prefix}_abs_change": float(np.abs(d).sum()), f"{prefix}_change_sum": float(d.sum())}


def _check(actual, expected):
    actual = {k: float(v) for k, v in actual.items()}
    if PRINT:
        print("{" + ", ".join(f"{k!r}: {v!r}" for k, v in sorted(actual.items())) + "}")
    assert not set(expected) - set(actual), f"metrics gone: {sorted(set(expected) - set(actual))}"
    for k, v in expected.items():
        np.testing.assert_allclose(actual[k], v, rtol=1e-6, atol=1e-6, err_msg=k)


def _train_step(heads, loss_fn, batch, finalize=None):
    """One jitted make_train_step step from a fresh model: its metrics plus the change of WEIGHT."""
    mesh, model_def, params, frozen = _model(heads)
    tx, schedule = _optimizer(total_steps=10)
    state = step_lib.init_state(params, frozen, tx, mesh)
    old = np.asarray(state.params[WEIGHT])
    shardings = {k: NamedSharding(mesh, P(None, ("data", "fsdp"), *[None] * (np.ndim(v) - 2))) for k, v in batch.items()}
    step = step_lib.jit_step(step_lib.make_train_step(model_def, tx, loss_fn, schedule, finalize), state, shardings,
                             mesh, donate=False)
    new_state, metrics = step(state, batch)
    assert int(new_state.step) == 1
    return dict(metrics, **_changes(old, new_state.params[WEIGHT]))


EXPECTED_SFT = {
    "grad_norm": 2.6126110553741455, "learning_rate": 0.0009999999310821295, "loss": 3.9882314205169678,
    "perplexity": 53.959373474121094, "token_accuracy": 0.2888889014720917, "tokens_per_batch": 22.5,
    "weight_abs_change": 1.0198072485945886, "weight_change_sum": 0.005760311139965779,
}


def test_sft_step_pinned():
    rng = np.random.default_rng(0)
    ids, mask = _left_padded(rng, (2, 4, 12), max_pad=4, vocab=6)  # [A=2, B=4, T=12]; repeats are common
    prompt_end = rng.integers(5, 9, size=(2, 4))  # the response starts at position 5..8
    loss_mask = (mask * (np.arange(12) >= prompt_end[..., None])).astype(np.float32)
    batch = dict(input_ids=ids, attention_mask=mask, loss_mask=loss_mask)
    _check(_train_step(("lm",), sft_loss, batch, finalize_sft_metrics), EXPECTED_SFT)


EXPECTED_RM = {
    "accuracy": 1.0, "grad_norm": 8.253032684326172, "learning_rate": 0.0009999999310821295,
    "loss": 0.1891261339187622, "pairs_per_batch": 3.0, "reward_chosen": 0.620100200176239,
    "reward_margin": 1.7989283800125122, "reward_rejected": -1.178828239440918,
    "weight_abs_change": 1.0230330756612602, "weight_change_sum": -0.0020452060789466486,
}


def test_reward_model_step_pinned():
    rng = np.random.default_rng(0)
    ids, mask = _left_padded(rng, (1, 6, 10), max_pad=4)  # [A=1, N=6 responses, T=10]
    batch = dict(input_ids=ids, attention_mask=mask,
                 chosen_idx=np.array([[0, 2, 4, 0]], np.int32), rejected_idx=np.array([[1, 3, 5, 0]], np.int32),
                 pair_mask=np.array([[1, 1, 1, 0]], np.int32),  # the last pair is padding
                 margin=np.array([[0.0, 0.5, 0.0, 0.0]], np.float32))
    loss_fn = functools.partial(rm_loss, center_rewards_coef=0.01)
    _check(_train_step(("reward",), loss_fn, batch), EXPECTED_RM)


EXPECTED_PPO = {
    "approx_kl": 0.020886477082967758, "approx_kl_last_epoch": 0.02284427359700203, "beta": 0.10000000149011612,
    "clipfrac": 0.2360149621963501, "clipfrac_last_epoch": 0.3123076856136322, "entropy": 4.137846946716309,
    "explained_variance": -0.03959345817565918, "grad_norm": 1.6582313776016235, "kl": 0.19919732213020325,
    "kl_k1": 0.19919732213020325, "kl_k3": 0.01003536768257618, "new_beta": 0.10085321962833405,
    "non_score_reward": -0.019919732585549355, "policy_loss": -0.031357698142528534,
    "ratio_mean": 0.9352534413337708, "response_length": 6.375, "returns_mean": -0.21639855206012726,
    "score": -0.1948200762271881, "total_reward": -0.21473979949951172,
    "value_head_abs_change": 0.0524324956820692, "value_head_change_sum": -0.004220407816546867,
    "value_loss": 0.4162095785140991, "vf_clipfrac": 0.03929131105542183, "weight_abs_change": 1.978409860701504,
    "weight_change_sum": 9.496249913354404e-05,
}


def test_ppo_update_pinned():
    b, q, r = 8, 6, 8
    # kl_target near the rollout's KL (0.199), so the controller's error stays inside its +-0.2 clip.
    hp = PPOHyperparams(temperature=0.7, ppo_epochs=2, num_minibatches=2, 
                        kl=KLController(init_beta=0.1, target=0.18, horizon=100.0))
    mesh, policy_def, train, rest = _model(("lm", "value"))
    defs = {"policy": policy_def}
    params, frozen = {"policy": train, "critic": {}}, {"policy": rest, "critic": {}}
    tx, _ = _optimizer(total_steps=hp.ppo_epochs * hp.num_minibatches * 2)  # lr decays across the minibatches
    state = PPOState(step=step_lib.replicated_scalar(0, jnp.int32, mesh), params=params, frozen=frozen,
                     opt_state=step_lib.init_opt_state(tx, params, mesh),
                     beta=step_lib.replicated_scalar(0.1, jnp.float32, mesh),
                     key=jax.random.key_data(jax.random.key(0)))

    rng = np.random.default_rng(0)
    query_ids, query_mask = _left_padded(rng, (b, q), max_pad=3)
    lengths = rng.integers(2, r + 1, size=b)
    lengths[0] = r  # one response fills the whole length
    response_mask = (np.arange(r) < lengths[:, None]).astype(np.int32)  # 1s then 0s
    response_ids = (rng.integers(1, CFG.vocab_size, size=(b, r)) * response_mask).astype(np.int32)
    m = response_mask.astype(np.float32)
    logprobs = (-np.log(CFG.vocab_size) + 0.1 * rng.standard_normal((b, r))) * m  # near the init policy
    ref_logprobs = logprobs - (0.03 + 0.05 * rng.standard_normal((b, r))) * m
    values = 0.1 * rng.standard_normal((b, r)) * m
    scores = rng.standard_normal(b)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    rollout = Rollout(query_ids=jnp.asarray(query_ids), query_mask=jnp.asarray(query_mask),
                      response_ids=jnp.asarray(response_ids), response_mask=jnp.asarray(response_mask),
                      logprobs=f32(logprobs), ref_logprobs=f32(ref_logprobs), values=f32(values), scores=f32(scores))

    old = np.asarray(state.params["policy"][WEIGHT])
    old_value_head = np.asarray(state.params["policy"]["value_head.kernel"])
    update = jax.jit(lambda st, ro: ppo_update(defs, hp, tx, st, ro, None))
    new_state, metrics = update(state, rollout)
    assert int(new_state.step) == 1
    new = new_state.params["policy"]
    _check(dict(metrics, new_beta=new_state.beta, **_changes(old, new[WEIGHT]),
                **_changes(old_value_head, new["value_head.kernel"], "value_head")), EXPECTED_PPO)
