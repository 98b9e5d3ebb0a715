"""Tests for rlhf_jax.ppo.core against plain NumPy references written here.

The references work on per-row slices `x[b, :length_b]` (Python loops, float64)
rather than on masks, so they share no code path with the JAX implementation.
"""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import ppo
from rlhf_jax.ppo import core

B, T = 5, 7
LENGTHS = np.array([7, 3, 1, 5, 7])  # full, short, length 1, short, full
ATOL = 1e-5


def make_mask(lengths, t=T):
    return (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


def with_garbage(x, mask, value=np.nan):
    """Fills padding positions with `value`: results must not depend on them."""
    x = np.array(x, dtype=np.float32)
    x[mask == 0] = value
    return x


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def mask():
    return make_mask(LENGTHS)


# ---------------------------------------------------------------- references


def ref_real(x, lengths=LENGTHS):
    """All real tokens of a [B, T] array, concatenated row by row (float64)."""
    return np.concatenate([np.asarray(x, np.float64)[b, :n] for b, n in enumerate(lengths)])


def ref_whiten(x, lengths=LENGTHS, shift_mean=True):
    real = ref_real(x, lengths)
    mean, var = real.mean(), real.var(ddof=1)
    out = np.zeros(np.shape(x))
    for b, n in enumerate(lengths):
        out[b, :n] = (np.asarray(x, np.float64)[b, :n] - mean) / np.sqrt(var + 1e-8)
        if not shift_mean:
            out[b, :n] += mean
    return out


def ref_kl_k1(logp, ref_logp):
    return np.asarray(logp, np.float64) - np.asarray(ref_logp, np.float64)


def ref_kl_k3(logp, ref_logp):
    ratio = np.exp(np.asarray(ref_logp, np.float64) - np.asarray(logp, np.float64))
    return (ratio - 1.0) - np.log(ratio)


def ref_rewards(scores, logp, ref_logp, lengths, beta, estimator):
    kl_fn = {"k1": ref_kl_k1, "k3": ref_kl_k3}[estimator]
    rewards = np.zeros(np.shape(logp))
    kl = np.zeros(np.shape(logp))
    for b, n in enumerate(lengths):
        for t in range(n):
            kl[b, t] = kl_fn(logp[b, t], ref_logp[b, t])
            rewards[b, t] = -beta * kl[b, t]
        if n > 0:
            rewards[b, n - 1] += scores[b]
    return rewards, kl


def ref_gae(rewards, values, lengths, gamma, lam):
    adv = np.zeros(np.shape(rewards))
    for b, n in enumerate(lengths):
        last = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1] if t + 1 < n else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    returns = np.zeros_like(adv)
    for b, n in enumerate(lengths):
        returns[b, :n] = adv[b, :n] + values[b, :n]
    return adv, returns


def ref_policy_loss(logp_new, logp_old, adv, lengths, cliprange):
    losses, clipped, sq = [], [], []
    for b, n in enumerate(lengths):
        for t in range(n):
            diff = float(logp_new[b, t]) - float(logp_old[b, t])
            ratio = np.exp(diff)
            l1 = -adv[b, t] * ratio
            l2 = -adv[b, t] * min(max(ratio, 1 - cliprange), 1 + cliprange)
            losses.append(max(l1, l2))
            clipped.append(float(l2 > l1))
            sq.append(diff * diff)
    return np.mean(losses), np.mean(clipped), 0.5 * np.mean(sq)


def ref_value_loss(v, v_old, ret, lengths, c):
    losses, clipped = [], []
    for b, n in enumerate(lengths):
        for t in range(n):
            vc = min(max(v[b, t], v_old[b, t] - c), v_old[b, t] + c)
            e1 = (v[b, t] - ret[b, t]) ** 2
            e2 = (vc - ret[b, t]) ** 2
            losses.append(max(e1, e2))
            clipped.append(float(e2 > e1))
    return 0.5 * np.mean(losses), np.mean(clipped)


def ref_entropy(logits):
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        logp = np.log(p)
    return -np.sum(np.where(p > 0, p * logp, 0.0), axis=-1)


def ref_explained_variance(values, returns, lengths):
    y = ref_real(returns, lengths)
    pred = ref_real(values, lengths)
    return 1.0 - np.var(y - pred) / np.var(y)


# -------------------------------------------------------------- statistics


def test_masked_mean_global_and_per_row(rng, mask):
    x = with_garbage(rng.normal(size=(B, T)), mask)
    got = jax.jit(core.masked_mean)(x, mask)
    np.testing.assert_allclose(got, ref_real(x).mean(), atol=1e-6)
    per_row = jax.jit(functools.partial(core.masked_mean, axis=1))(x, mask)
    want = [np.asarray(x[b, :n], np.float64).mean() for b, n in enumerate(LENGTHS)]
    np.testing.assert_allclose(per_row, want, atol=1e-6)
    # A row with no tokens averages to 0, not nan.
    empty = core.masked_mean(x, make_mask([7, 0, 1, 5, 7]), axis=1)
    assert float(empty[1]) == 0.0 and np.all(np.isfinite(empty))


@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var(rng, mask, unbiased):
    x = with_garbage(rng.normal(size=(B, T)) * 3 + 1, mask)
    got = jax.jit(functools.partial(core.masked_var, unbiased=unbiased))(x, mask)
    np.testing.assert_allclose(got, ref_real(x).var(ddof=1 if unbiased else 0), atol=1e-5)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten(rng, mask, shift_mean):
    x = with_garbage(rng.normal(size=(B, T)) * 2 + 3, mask)
    got = np.asarray(jax.jit(functools.partial(core.masked_whiten, shift_mean=shift_mean))(x, mask))
    np.testing.assert_allclose(got, ref_whiten(x, shift_mean=shift_mean), atol=ATOL)
    assert np.all(got[mask == 0] == 0)
    real = ref_real(got)
    np.testing.assert_allclose(real.std(ddof=1), 1.0, atol=1e-4)
    # shift_mean=False scales about the mean but keeps it (OpenAI reward whitening).
    want_mean = 0.0 if shift_mean else ref_real(x).mean()
    np.testing.assert_allclose(real.mean(), want_mean, atol=1e-5)


def test_masked_whiten_sharded_batch_is_global():
    """With the batch sharded over 4 devices, jit whitens over the global batch."""
    script = textwrap.dedent(
        """
        import jax, numpy as np
        jax.config.update("jax_num_cpu_devices", 4)
        from jax.sharding import NamedSharding, PartitionSpec as P
        from rlhf_jax.ppo import core
        mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        rng = np.random.default_rng(1)
        # Each device's shard has a different mean, so per-device whitening would differ.
        x = (rng.normal(size=(8, 6)) + np.repeat(np.arange(4), 2)[:, None] * 5).astype(np.float32)
        mask = (np.arange(6)[None] < rng.integers(1, 7, size=8)[:, None]).astype(np.float32)
        sh = NamedSharding(mesh, P("data"))
        xs, ms = jax.device_put(x, sh), jax.device_put(mask, sh)
        assert len(xs.addressable_shards) == 4
        got = jax.jit(core.masked_whiten)(xs, ms)
        want = core.masked_whiten(x, mask)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
        print("OK")
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("XLA_FLAGS", None)  # the script sets its own device count
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


# ---------------------------------------------------------------- KL / rewards


def test_kl_estimators_match_reference(rng):
    logp = rng.normal(size=(B, T)).astype(np.float32) - 2
    ref_logp = rng.normal(size=(B, T)).astype(np.float32) - 2
    np.testing.assert_allclose(jax.jit(core.kl_k1)(logp, ref_logp), ref_kl_k1(logp, ref_logp), atol=1e-6)
    np.testing.assert_allclose(jax.jit(core.kl_k3)(logp, ref_logp), ref_kl_k3(logp, ref_logp), atol=ATOL, rtol=1e-5)
    assert set(ppo.KL_ESTIMATORS) == {"k1", "k3"}
    assert ppo.KL_ESTIMATORS["k1"] is core.kl_k1 and ppo.KL_ESTIMATORS["k3"] is core.kl_k3


def test_kl_k3_is_nonnegative_everywhere(rng):
    logp = rng.uniform(-20, 0, size=(64, 64)).astype(np.float32)
    ref_logp = rng.uniform(-20, 0, size=(64, 64)).astype(np.float32)
    # Include near-equal pairs, where cancellation could make a naive formula negative.
    ref_logp[:, :8] = logp[:, :8] + rng.normal(size=(64, 8)).astype(np.float32) * 1e-6
    k3 = np.asarray(jax.jit(core.kl_k3)(logp, ref_logp))
    assert np.all(k3 >= 0)
    assert np.all(np.asarray(core.kl_k3(logp, logp)) == 0)
    # k1 can be negative on the same samples: the reason k3 is offered.
    assert np.any(np.asarray(core.kl_k1(logp, ref_logp)) < 0)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_compute_rewards(rng, mask, estimator):
    scores = rng.normal(size=(B,)).astype(np.float32)
    logp = with_garbage(rng.normal(size=(B, T)) - 2, mask)
    ref_logp = with_garbage(rng.normal(size=(B, T)) - 2, mask, value=-np.inf)
    beta = 0.1
    fn = jax.jit(functools.partial(core.compute_rewards, kl_estimator=estimator))
    out = fn(scores, logp, ref_logp, mask, jnp.float32(beta))  # beta traced
    want_rewards, want_kl = ref_rewards(scores, logp, ref_logp, LENGTHS, beta, estimator)
    np.testing.assert_allclose(out.rewards, want_rewards, atol=ATOL)
    np.testing.assert_allclose(out.kl, want_kl, atol=ATOL)
    _, want_k1 = ref_rewards(scores, logp, ref_logp, LENGTHS, beta, "k1")
    _, want_k3 = ref_rewards(scores, logp, ref_logp, LENGTHS, beta, "k3")
    np.testing.assert_allclose(out.kl_k1, want_k1, atol=ATOL)
    np.testing.assert_allclose(out.kl_k3, want_k3, atol=ATOL)
    # Each row's rewards add up to score - beta * sequence KL.
    np.testing.assert_allclose(
        np.asarray(out.rewards).sum(1), scores - beta * want_kl.sum(1), atol=ATOL
    )


def test_compute_rewards_score_at_stop_token(mask):
    zeros = np.zeros((B, T), np.float32)
    scores = np.arange(1, B + 1, dtype=np.float32)
    out = core.compute_rewards(scores, zeros, zeros, mask, 0.5)
    want = np.zeros((B, T))
    want[np.arange(B), LENGTHS - 1] = scores
    np.testing.assert_array_equal(np.asarray(out.rewards), want)
    with pytest.raises(ValueError, match="kl_estimator"):
        core.compute_rewards(scores, zeros, zeros, mask, 0.5, kl_estimator="k2")


def test_last_token_onehot_handles_empty_rows():
    m = make_mask([3, 0, 1], t=4)
    np.testing.assert_array_equal(
        np.asarray(core.last_token_onehot(m)),
        [[0, 0, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]],
    )


# ---------------------------------------------------------------------- GAE


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.9, 0.0)])
def test_gae_matches_python_loop(rng, mask, gamma, lam):
    rewards = rng.normal(size=(B, T)).astype(np.float32)
    values = rng.normal(size=(B, T)).astype(np.float32)
    want_adv, want_ret = ref_gae(rewards, values, LENGTHS, gamma, lam)
    # Garbage past the stop (huge values, nan) must be treated as terminal / zero.
    rewards_g = with_garbage(rewards, mask, value=1e6)
    values_g = with_garbage(values, mask, value=np.nan)
    adv, ret = jax.jit(core.gae)(rewards_g, values_g, mask, gamma, lam)
    np.testing.assert_allclose(adv, want_adv, atol=ATOL)
    np.testing.assert_allclose(ret, want_ret, atol=ATOL)
    assert np.all(np.asarray(adv)[mask == 0] == 0) and np.all(np.asarray(ret)[mask == 0] == 0)


def test_gae_monte_carlo_limit(mask):
    """gamma = lam = 1 with zero values: advantages are reward-to-go."""
    rewards = np.tile(np.arange(1, T + 1, dtype=np.float32), (B, 1)) * mask
    adv, ret = core.gae(rewards, np.zeros((B, T), np.float32), mask, 1.0, 1.0)
    want = np.flip(np.cumsum(np.flip(rewards, 1), 1), 1) * mask
    np.testing.assert_allclose(adv, want, atol=1e-6)
    np.testing.assert_allclose(ret, want, atol=1e-6)
    # The length-1 row's only advantage is its own reward.
    assert float(adv[2, 0]) == 1.0


# -------------------------------------------------------------------- losses


def test_policy_loss_matches_reference(rng, mask):
    logp_old = rng.normal(size=(B, T)).astype(np.float32) - 2
    logp_new = (logp_old + rng.normal(size=(B, T)) * 0.3).astype(np.float32)
    adv = rng.normal(size=(B, T)).astype(np.float32)
    loss, stats = jax.jit(core.policy_loss)(
        with_garbage(logp_new, mask, 50.0), with_garbage(logp_old, mask, np.nan), adv, mask, 0.2
    )
    want_loss, want_clip, want_kl = ref_policy_loss(logp_new, logp_old, adv, LENGTHS, 0.2)
    np.testing.assert_allclose(loss, want_loss, atol=ATOL)
    np.testing.assert_allclose(stats["clipfrac"], want_clip, atol=1e-6)
    np.testing.assert_allclose(stats["approx_kl"], want_kl, atol=1e-6)
    assert 0 < want_clip < 1  # the random case exercises both branches


def test_policy_clipping_hand_made():
    # ratio:    1.5      1.5      0.5      1.0     (pad: huge)
    # adv:     +1       -1       -2       +3
    # unclip:  -1.5     +1.5     +1.0     -3
    # clipped: -1.2     +1.2     +1.6     -3
    # max:     -1.2     +1.5     +1.6     -3   -> clipped on tokens 0 and 2 only
    logp_old = np.zeros((1, 5), np.float32)
    logp_new = np.log(np.array([[1.5, 1.5, 0.5, 1.0, 1e6]], np.float32))
    adv = np.array([[1.0, -1.0, -2.0, 3.0, 100.0]], np.float32)
    mask = np.array([[1, 1, 1, 1, 0]], np.float32)
    loss, stats = jax.jit(core.policy_loss)(logp_new, logp_old, adv, mask, 0.2)
    assert float(stats["clipfrac"]) == 0.5
    np.testing.assert_allclose(loss, (-1.2 + 1.5 + 1.6 - 3.0) / 4, atol=1e-6)
    np.testing.assert_allclose(
        stats["approx_kl"], 0.5 * np.mean(np.log([1.5, 1.5, 0.5, 1.0]) ** 2), atol=1e-6
    )
    # The gradient through a clipped token is zero; through an unclipped one it is not.
    grad = jax.grad(lambda lp: core.policy_loss(lp, logp_old, adv, mask, 0.2)[0])(logp_new)
    grad = np.asarray(grad)
    assert grad[0, 0] == 0 and grad[0, 2] == 0 and grad[0, 4] == 0
    assert grad[0, 1] != 0 and grad[0, 3] != 0


def test_value_loss_matches_reference(rng, mask):
    v_old = rng.normal(size=(B, T)).astype(np.float32)
    v_new = (v_old + rng.normal(size=(B, T)) * 0.4).astype(np.float32)
    ret = rng.normal(size=(B, T)).astype(np.float32)
    loss, stats = jax.jit(core.value_loss)(
        with_garbage(v_new, mask, 1e3), v_old, with_garbage(ret, mask, np.nan), mask, 0.2
    )
    want_loss, want_clip = ref_value_loss(v_new, v_old, ret, LENGTHS, 0.2)
    np.testing.assert_allclose(loss, want_loss, atol=ATOL)
    np.testing.assert_allclose(stats["vf_clipfrac"], want_clip, atol=1e-6)
    assert 0 < want_clip < 1


def test_value_clipping_hand_made():
    # v_old = 0, c = 0.2, so clip(v) = clip(v, -0.2, 0.2).
    # v=1,  R=1:    unclipped 0,    clipped 0.64 -> clipped wins (counted)
    # v=1,  R=0:    unclipped 1,    clipped 0.04 -> unclipped
    # v=0.1, R=5:   both 24.01 (v inside the range) -> not counted
    # v=-1, R=-0.5: unclipped 0.25, clipped 0.09 -> unclipped
    v = np.array([[1.0, 1.0, 0.1, -1.0, 7.0]], np.float32)
    ret = np.array([[1.0, 0.0, 5.0, -0.5, -7.0]], np.float32)
    mask = np.array([[1, 1, 1, 1, 0]], np.float32)
    loss, stats = jax.jit(core.value_loss)(v, np.zeros_like(v), ret, mask, 0.2)
    assert float(stats["vf_clipfrac"]) == 0.25
    np.testing.assert_allclose(loss, 0.5 * (0.64 + 1.0 + 4.9**2 + 0.25) / 4, rtol=1e-6)


def test_entropy_from_logits(rng):
    logits = (rng.normal(size=(B, T, 11)) * 3).astype(np.float32)
    got = jax.jit(core.entropy_from_logits)(logits)
    assert got.shape == (B, T) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref_entropy(logits), atol=ATOL)
    # Uniform -> log V; huge logits do not overflow; -inf logits add 0, not nan.
    V = 11
    special = np.zeros((1, 3, V), np.float32)
    special[0, 1] = logits[0, 0] + 1e4
    special[0, 2] = -np.inf
    special[0, 2, :2] = [0.0, 0.0]
    got = np.asarray(core.entropy_from_logits(special))[0]
    np.testing.assert_allclose(got, [np.log(V), ref_entropy(logits[0, 0] + 1e4), np.log(2)], atol=ATOL)
    # bf16 logits are computed in float32.
    got_bf16 = core.entropy_from_logits(jnp.asarray(logits, jnp.bfloat16))
    assert got_bf16.dtype == jnp.float32
    np.testing.assert_allclose(
        got_bf16, ref_entropy(np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float32)), atol=ATOL
    )


def test_explained_variance(rng, mask):
    ret = rng.normal(size=(B, T)).astype(np.float32)
    values = (ret + rng.normal(size=(B, T)) * 0.5).astype(np.float32)
    got = jax.jit(core.explained_variance)(with_garbage(values, mask), with_garbage(ret, mask), mask)
    np.testing.assert_allclose(got, ref_explained_variance(values, ret, LENGTHS), atol=ATOL)
    np.testing.assert_allclose(core.explained_variance(ret, ret, mask), 1.0, atol=1e-6)
    assert np.isnan(float(core.explained_variance(ret, np.ones((B, T), np.float32), mask)))


# ------------------------------------------------------------- KL control


def test_adaptive_kl_direction_and_clipping():
    update = jax.jit(core.adaptive_kl_update, static_argnames=("target", "horizon"))
    beta, n = 0.15, 512
    up = float(update(beta, 7.0, n, target=6.0, horizon=10000))
    down = float(update(beta, 5.0, n, target=6.0, horizon=10000))
    assert up > beta > down
    np.testing.assert_allclose(up, beta * (1 + (7 / 6 - 1) * n / 10000), rtol=1e-6)
    np.testing.assert_allclose(down, beta * (1 + (5 / 6 - 1) * n / 10000), rtol=1e-6)
    np.testing.assert_allclose(float(update(beta, 6.0, n)), beta, rtol=1e-7)
    # Proportional error is clipped to +-0.2: very large / zero KL give the same capped step.
    far_up = float(update(beta, 1000.0, n))
    far_down = float(update(beta, 0.0, n))
    np.testing.assert_allclose(far_up, beta * (1 + 0.2 * n / 10000), rtol=1e-6)
    np.testing.assert_allclose(far_down, beta * (1 - 0.2 * n / 10000), rtol=1e-6)
    np.testing.assert_allclose(float(update(beta, 50.0, n)), far_up, rtol=1e-7)


def test_kl_controller_fixed_and_adaptive():
    fixed = core.KLController(init_beta=0.05)
    assert not fixed.adaptive
    step = jax.jit(lambda c, b, kl, n: c.update(b, kl, n), static_argnums=0)
    np.testing.assert_allclose(float(step(fixed, 0.05, 100.0, 64)), 0.05, rtol=1e-7)
    adaptive = core.KLController(init_beta=0.15, target=6.0, horizon=10000)
    assert adaptive.adaptive
    beta = adaptive.init_beta
    for _ in range(3):  # KL persistently above target keeps raising beta
        new = float(step(adaptive, beta, 9.0, 64))
        np.testing.assert_allclose(new, float(core.adaptive_kl_update(beta, 9.0, 64)), rtol=1e-7)
        assert new > beta
        beta = new
    for field, kwargs in [("init_beta", dict(init_beta=-1.0)), ("target", dict(target=0.0)),
                          ("horizon", dict(horizon=0))]:
        with pytest.raises(ValueError, match=field):
            core.KLController(**kwargs)


# ------------------------------------------------------------- final scores


@pytest.mark.parametrize("penalty", [None, -1.0])
def test_final_scores_matches_reference(rng, penalty):
    rm = rng.normal(size=B).astype(np.float32)
    fn = rng.normal(size=B).astype(np.float32)
    stopped = np.array([True, False, True, False, True])
    got = np.asarray(jax.jit(core.final_scores, static_argnames=("rm_weight", "missing_eos_penalty"))(
        rm, fn, stopped, rm_weight=0.5, missing_eos_penalty=penalty))
    want = [0.5 * float(r) + float(f) if (s or penalty is None) else penalty for r, f, s in zip(rm, fn, stopped)]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6)
