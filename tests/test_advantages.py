"""Tests for rlhf_jax.ppo.advantages against plain Python references written here.

The references loop over prompts and samples in float64 (statistics from the `statistics`
module), so they share no code path with the JAX implementation.
"""

import functools
import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.ppo import advantages as adv
from rlhf_jax.ppo import core

B = 12
ATOL = 1e-5


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ---------------------------------------------------------------- references


def ref_rloo(scores, k):
    out = []
    for g in range(len(scores) // k):
        group = [float(s) for s in scores[g * k:(g + 1) * k]]
        for i, s in enumerate(group):
            others = group[:i] + group[i + 1:]
            out.append(s - sum(others) / len(others))
    return np.array(out)


def ref_grpo(scores, k, scale_by_std=True, eps=1e-4):
    out = []
    for g in range(len(scores) // k):
        group = [float(s) for s in scores[g * k:(g + 1) * k]]
        mean, std = statistics.fmean(group), statistics.stdev(group)  # sample std
        out.extend((s - mean) / (std + eps) if scale_by_std else s - mean for s in group)
    return np.array(out)


def ref_k3_loss(logp, ref_logp, lengths):
    values = []
    for b, n in enumerate(lengths):
        for t in range(n):
            d = float(ref_logp[b, t]) - float(logp[b, t])
            values.append(math.exp(d) - d - 1)
    return sum(values) / len(values) if values else 0.0


def make_mask(lengths, t):
    return (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


# ---------------------------------------------------------------- estimators


@pytest.mark.parametrize("k", [3, 4])
def test_rloo_matches_loop(rng, k):
    scores = (rng.normal(size=B) * 2 + 5).astype(np.float32)
    got = jax.jit(adv.rloo_advantages, static_argnums=1)(scores, k)
    assert got.shape == (B,)
    np.testing.assert_allclose(got, ref_rloo(scores, k), atol=ATOL)
    # RLOO equals k/(k-1) times the mean-centred score, and sums to 0 in each group.
    centred = ref_grpo(scores, k, scale_by_std=False)
    np.testing.assert_allclose(got, centred * k / (k - 1), atol=ATOL)
    np.testing.assert_allclose(np.asarray(got).reshape(-1, k).sum(1), 0.0, atol=ATOL)


@pytest.mark.parametrize("k", [3, 4])
@pytest.mark.parametrize("scale_by_std", [True, False])
def test_grpo_matches_loop(rng, k, scale_by_std):
    scores = (rng.normal(size=B) * 2 + 5).astype(np.float32)
    fn = jax.jit(functools.partial(adv.grpo_advantages, k=k, scale_by_std=scale_by_std))
    got = np.asarray(fn(scores))
    np.testing.assert_allclose(got, ref_grpo(scores, k, scale_by_std), atol=ATOL)
    if scale_by_std:  # each group has sample std ~1 (up to eps)
        np.testing.assert_allclose(got.reshape(-1, k).std(1, ddof=1), 1.0, atol=1e-3)


def test_grpo_eps_and_binary_rewards():
    # k = 2 with 0/1 rewards: centred ±0.5, sample std 1/sqrt(2), so ±1/sqrt(2) (eps = 0).
    got = adv.grpo_advantages(np.array([1.0, 0.0, 0.0, 1.0], np.float32), 2, eps=0.0)
    np.testing.assert_allclose(got, np.array([1, -1, -1, 1]) / math.sqrt(2), rtol=1e-6)
    # eps bounds the scale of a nearly constant group.
    tiny = adv.grpo_advantages(np.array([0.0, 1e-6], np.float32), 2, eps=1e-4)
    assert np.all(np.abs(np.asarray(tiny)) < 1e-2)


@pytest.mark.parametrize("name", ["rloo", "grpo"])
@pytest.mark.parametrize("k", [3, 4])
def test_all_equal_groups_are_exactly_zero(rng, name, k):
    scores = (rng.normal(size=B) * 2 + 5).astype(np.float32)
    # Values whose float mean is not exactly themselves (e.g. 3 * 0.1 / 3 != 0.1).
    scores[:k] = 0.1
    scores[k:2 * k] = 1e6 + 1 / 3
    fn = jax.jit(adv.ADVANTAGE_ESTIMATORS[name], static_argnums=1)
    got = np.asarray(fn(scores, k))
    assert np.all(np.isfinite(got))
    assert np.all(got[:2 * k] == 0.0)
    assert np.all(got[2 * k:] != 0.0)  # the random groups are not zeroed
    ref = ref_rloo if name == "rloo" else ref_grpo
    np.testing.assert_allclose(got[2 * k:], ref(scores, k)[2 * k:], atol=ATOL)


def test_registry():
    assert set(adv.ADVANTAGE_ESTIMATORS) == {"rloo", "grpo"}
    assert adv.ADVANTAGE_ESTIMATORS["rloo"] is adv.rloo_advantages
    assert adv.ADVANTAGE_ESTIMATORS["grpo"] is adv.grpo_advantages


@pytest.mark.parametrize("fn", [adv.rloo_advantages, adv.grpo_advantages])
@pytest.mark.parametrize("k,match", [(5, "k=5 does not divide"), (1, "k"), (0, "k"), (2.0, "k"),
                                     (True, "k")])
def test_bad_k_raises(fn, k, match):
    with pytest.raises(ValueError, match=match):
        fn(np.zeros(B, np.float32), k)


def test_non_vector_scores_raise():
    with pytest.raises(ValueError, match="scores_B"):
        adv.rloo_advantages(np.zeros((4, 3), np.float32), 2)


# ---------------------------------------------------------- tokens and KL


def test_sequence_advantages_to_tokens():
    lengths = [5, 2, 0, 1]
    mask = make_mask(lengths, 5)
    a = np.array([1.5, -2.0, 3.0, 0.25], np.float32)
    got = np.asarray(jax.jit(adv.sequence_advantages_to_tokens)(a, mask))
    want = np.zeros((4, 5))
    for b, n in enumerate(lengths):
        want[b, :n] = a[b]
    np.testing.assert_array_equal(got, want)


def test_k3_kl_loss_matches_reference_with_nan_padding(rng):
    lengths = [7, 3, 1, 5, 0]
    mask = make_mask(lengths, 7)
    logp = (rng.normal(size=(5, 7)) - 2).astype(np.float32)
    ref_logp = (logp + rng.normal(size=(5, 7)) * 0.5).astype(np.float32)
    logp[mask == 0] = np.nan
    ref_logp[mask == 0] = -np.inf
    got = jax.jit(adv.k3_kl_loss)(logp, ref_logp, mask)
    np.testing.assert_allclose(float(got), ref_k3_loss(logp, ref_logp, lengths), rtol=1e-5)
    # The same as core's k3 averaged by core.masked_mean over clean inputs.
    clean = [np.where(mask > 0, x, 0.0) for x in (logp, ref_logp)]
    via_core = core.masked_mean(core.kl_k3(*clean), mask)
    np.testing.assert_allclose(float(got), float(via_core), rtol=1e-6)
    # Gradients stay finite (0 on padding) despite the nan / -inf there.
    grad = np.asarray(jax.grad(adv.k3_kl_loss)(logp, ref_logp, mask))
    assert np.all(np.isfinite(grad)) and np.all(grad[mask == 0] == 0) and np.any(grad != 0)
    # Policy = reference: zero; no real token: zero, not nan.
    assert float(adv.k3_kl_loss(logp, logp, mask)) == 0.0
    assert float(adv.k3_kl_loss(logp, ref_logp, np.zeros_like(mask))) == 0.0


def test_best_of_n_kl():
    assert adv.best_of_n_kl(1) == 0.0
    for n, want in [(2, 0.1931471806), (4, 0.6362943611), (16, 1.8350887222)]:
        np.testing.assert_allclose(adv.best_of_n_kl(n), want, rtol=1e-9)
    # Increasing in n and approaching log n - 1.
    values = [adv.best_of_n_kl(n) for n in range(1, 65)]
    assert all(a < b for a, b in zip(values, values[1:]))
    np.testing.assert_allclose(adv.best_of_n_kl(10**6), math.log(10**6) - 1, atol=1e-5)
    for bad in [0, -1, 2.5]:
        with pytest.raises(ValueError, match="n"):
            adv.best_of_n_kl(bad)


def test_best_of_n_kl_against_discrete_simulation():
    """Best-of-n over m equally likely, distinct-reward outcomes tends to the formula as m grows."""
    n, m = 4, 20000
    cdf = np.arange(m + 1) / m
    p_best = cdf[1:] ** n - cdf[:-1] ** n
    kl = float(np.sum(p_best * np.log(p_best * m)))
    assert kl <= adv.best_of_n_kl(n)  # upper bound for discrete outcomes
    np.testing.assert_allclose(kl, adv.best_of_n_kl(n), atol=1e-3)


def test_jit_with_traced_scores(rng):
    """Estimators compose inside one jitted function; k stays a static Python int."""
    scores = rng.normal(size=B).astype(np.float32)
    mask = make_mask(rng.integers(1, 6, size=B), 6)

    @functools.partial(jax.jit, static_argnames=("name", "k"))
    def token_advantages(scores_B, mask_BxT, name, k):
        adv_B = adv.ADVANTAGE_ESTIMATORS[name](scores_B, k)
        return adv.sequence_advantages_to_tokens(adv_B, mask_BxT)

    for name, ref in [("rloo", ref_rloo), ("grpo", ref_grpo)]:
        got = np.asarray(token_advantages(jnp.asarray(scores), mask, name=name, k=4))
        np.testing.assert_allclose(got, ref(scores, 4)[:, None] * mask, atol=ATOL)
