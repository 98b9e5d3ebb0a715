"""The critic-free policy-gradient stage (RLOO, GRPO): tiny runs raise a reward function's score
with the KL bounded, and `ppo_update` feeds the policy loss the estimators' advantages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.config_lib import load_config
from rlhf_jax.ppo import advantages, core
from rlhf_jax.ppo.step import PPOHyperparams, PPOState, Rollout, ppo_update, token_advantages
from rlhf_jax.ppo.trainer import run_ppo
from rlhf_jax.reward_functions import count_substring
from rlhf_jax.train import step as step_lib
from test_ppo import ROOT, _series, prompts, tiny_ppo_config  # noqa: F401  (prompts is a fixture)
from test_regression import _model, _optimizer  # a tiny fixed model and the pinned test's optimiser


def _tiny(prompts, algorithm, **changes):  # noqa: F811
    cfg = tiny_ppo_config(prompts, **changes)
    base = load_config(ROOT / "configs" / f"{algorithm}.py", "k=4")
    for key in ("advantage", "samples_per_prompt", "kl_in_reward", "grpo_scale_by_std"):
        cfg.ppo[key] = base.ppo[key]
    return cfg


@pytest.mark.parametrize("algorithm,kl_in_reward", [("rloo", True), ("grpo", False)])
def test_critic_free_run_raises_score(prompts, tmp_path, algorithm, kl_in_reward):  # noqa: F811
    cfg = _tiny(prompts, algorithm, **{"ppo.num_updates": 20, "ppo.init_beta": 0.2})
    assert cfg.ppo.kl_in_reward == kl_in_reward
    summary = run_ppo(cfg, tmp_path, reward_functions=[count_substring("a")])
    score, kl3 = _series(tmp_path, "ppo/score"), _series(tmp_path, "ppo/kl_k3")
    assert score[:4].mean() < 0.3
    assert score[-4:].mean() > score[:4].mean() + 0.7, score
    assert np.all(np.isfinite(kl3)) and kl3.max() < 35
    assert "ppo/value_loss" not in summary and "ppo/advantage_abs_mean" in summary
    assert ("ppo/kl_loss" in summary) == (not kl_in_reward)


def _np_rloo(x, k):
    g = x.reshape(-1, k)
    return (g - (g.sum(1, keepdims=True) - g) / (k - 1)).reshape(-1)


def _rollout(rng, b=8, q=6, r=8, vocab=64):
    lengths = rng.integers(2, r + 1, size=b)
    mask = (np.arange(r) < lengths[:, None]).astype(np.int32)
    logp = (-np.log(vocab) + 0.1 * rng.standard_normal((b, r))) * mask
    ref = logp - (0.03 + 0.05 * rng.standard_normal((b, r))) * mask
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    qids = rng.integers(1, vocab, size=(b, q)).astype(np.int32)
    return Rollout(query_ids=jnp.asarray(qids), query_mask=jnp.ones((b, q), jnp.int32),
                   response_ids=jnp.asarray(rng.integers(1, vocab, size=(b, r)) * mask, jnp.int32),
                   response_mask=jnp.asarray(mask), logprobs=f32(logp), ref_logprobs=f32(ref),
                   values=jnp.zeros((b, r), jnp.float32), scores=f32(rng.standard_normal(b)))


@pytest.mark.parametrize("kl_in_reward", [True, False])
@pytest.mark.parametrize("advantage", ["rloo", "grpo"])
def test_token_advantages_are_the_estimators_of_the_sequence_returns(advantage, kl_in_reward):
    ro, beta, k = _rollout(np.random.default_rng(0)), 0.3, 4
    hp = PPOHyperparams(advantage=advantage, samples_per_prompt=k, kl_in_reward=kl_in_reward)
    mask = np.asarray(ro.response_mask, np.float32)
    pen = core.compute_rewards(ro.scores, ro.logprobs, ro.ref_logprobs, mask, beta if kl_in_reward else 0.0)
    adv_BxT, returns = token_advantages(hp, ro, pen, mask)
    kl_B = ((np.asarray(ro.logprobs, np.float64) - np.asarray(ro.ref_logprobs)) * mask).sum(-1)
    seq_B = np.asarray(ro.scores, np.float64) - (beta * kl_B if kl_in_reward else 0.0)
    if advantage == "rloo":
        expected_B = _np_rloo(seq_B, k)
    else:
        g = seq_B.reshape(-1, k)
        expected_B = ((g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(-1)
    assert returns is None
    np.testing.assert_allclose(np.asarray(adv_BxT), expected_B[:, None] * mask, rtol=1e-4, atol=1e-5)


def test_ppo_update_with_rloo_feeds_the_leave_one_out_advantages():
    hp = PPOHyperparams(ppo_epochs=1, num_minibatches=2, advantage="rloo", samples_per_prompt=4,
                        kl=core.KLController(init_beta=0.1))
    mesh, policy_def, train, rest = _model(("lm",))  # no value head: RLOO has no critic
    params, frozen = {"policy": train, "critic": {}}, {"policy": rest, "critic": {}}
    tx, _ = _optimizer(total_steps=2)
    state = PPOState(step=step_lib.replicated_scalar(0, jnp.int32, mesh), params=params, frozen=frozen,
                     opt_state=step_lib.init_opt_state(tx, params, mesh),
                     beta=step_lib.replicated_scalar(0.1, jnp.float32, mesh), key=jax.random.key_data(jax.random.key(0)))
    ro = _rollout(np.random.default_rng(1))
    new_state, metrics = jax.jit(lambda st, r: ppo_update({"policy": policy_def}, hp, tx, st, r))(state, ro)
    mask = np.asarray(ro.response_mask, np.float64)
    seq_B = np.asarray(ro.scores, np.float64) - 0.1 * ((np.asarray(ro.logprobs, np.float64) - ro.ref_logprobs)
                                                      * mask).sum(-1)
    adv_BxT = advantages.rloo_advantages(jnp.asarray(seq_B, jnp.float32), 4)[:, None] * mask
    np.testing.assert_allclose(float(metrics["advantage_abs_mean"]), np.abs(adv_BxT).sum() / mask.sum(), rtol=1e-5)
    np.testing.assert_allclose(np.abs(_np_rloo(seq_B, 4))[:, None] * mask, np.abs(adv_BxT), atol=1e-5)
    assert int(new_state.step) == 1 and "value_loss" not in metrics and np.isfinite(float(metrics["policy_loss"]))


def test_hyperparams_reject_inconsistent_settings():
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        PPOHyperparams(advantage="rloo")
    with pytest.raises(ValueError, match="'gae' needs"):
        PPOHyperparams(samples_per_prompt=4)
    with pytest.raises(ValueError, match="not one of"):
        PPOHyperparams(advantage="reinforce", samples_per_prompt=4)
