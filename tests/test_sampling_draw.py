"""The per-token pieces of the sampler against plain NumPy references.

`sample_token` draws by a two-level inverse CDF (`_draw`), finds the top-p threshold
(without top-k) by bisection and greedy tokens by max + first index. Checked here: the draw's frequencies
against the target distribution (chi-square, with a power check that the same counts reject
a slightly different distribution), the filters against a sort-based reference, greedy
tokens and log-probs against argmax + log_softmax.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from rlhf_jax import sampling
from rlhf_jax.sampling import SamplingConfig, filter_logits, sample_token

# Rows per call and calls: 160,000 draws in all.
ROWS, CALLS = 8000, 20
ALPHA = 1e-6  # false-alarm rate of each chi-square test


def _counts(fn, x_BV, seed):
    """Counts [V] of the tokens fn(x_BV, key) -> int [ROWS] draws over CALLS keys. (x_BV is an
    argument, not a constant closed over: XLA would constant-fold the sampler's top-k over
    it at compile time, which took 4 minutes.)"""
    fn = jax.jit(fn)
    keys = jax.random.split(jax.random.key(seed), CALLS)
    return sum(np.bincount(np.asarray(fn(x_BV, k)), minlength=x_BV.shape[-1]) for k in keys)


def _chi2_ok(counts, probs):
    """Pearson's chi-square on the tokens with probability > 0 (all expected counts >= 5 in
    the tests below): True when the counts are consistent with `probs` at level ALPHA."""
    support = probs > 0
    expected = probs[support] * counts.sum()
    assert expected.min() >= 5
    chi2 = ((counts[support] - expected) ** 2 / expected).sum()
    return chi2 < stats.chi2.isf(ALPHA, support.sum() - 1)


def _softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_draw_frequencies_match_the_weights_across_blocks():
    # 600 entries: two full blocks of 256 and a padded one; 24 with weight, spread over all
    # three blocks (one block's mass much smaller than the others), the rest weight 0.
    v = 600
    rng = np.random.default_rng(0)
    support = np.sort(rng.choice(v, 24, replace=False))
    w = np.zeros(v, np.float32)
    w[support] = rng.uniform(0.2, 2.0, 24)
    w[support[support >= 512]] *= 0.05
    probs = w / w.sum(dtype=np.float64)
    w_BV = jnp.broadcast_to(jnp.asarray(w), (ROWS, v))
    counts = _counts(lambda w, k: sampling._draw(w, sampling._uniforms(k, ROWS)), w_BV, seed=0)
    assert counts[probs == 0].sum() == 0
    assert _chi2_ok(counts, probs)
    # Power: moving 5% of the mass of the most likely entry to the least likely one is rejected.
    shifted = probs.copy()
    hi, lo = np.argmax(probs), np.argmin(np.where(probs > 0, probs, 1))
    shifted[hi] -= 0.05 * probs[hi]
    shifted[lo] += 0.05 * probs[hi]
    assert not _chi2_ok(counts, shifted)


# Top-k and top-p alone are covered by the threshold test below; each config here costs
# ~10 s of 160,000 draws.
@pytest.mark.parametrize("config", [SamplingConfig(temperature=0.8),
                                    SamplingConfig(temperature=1.3, top_k=12, top_p=0.8)])
def test_sample_token_frequencies_match_the_filtered_softmax(config):
    v = 300
    rng = np.random.default_rng(1)
    logits = rng.standard_normal(v).astype(np.float32) * 1.5
    logits[rng.choice(v, 10, replace=False)] += 4.0  # a head of likely tokens and a long tail
    kept = _reference_filter(logits[None].astype(np.float64), config)[0]

    def filtered_softmax(temperature):
        p = np.where(kept, _softmax(logits / temperature), 0.0)
        return p / p.sum()

    probs = filtered_softmax(config.temperature)
    logits_BV = jnp.broadcast_to(jnp.asarray(logits), (ROWS, v))
    counts = _counts(lambda x, k: sample_token(x, k, config)[0], logits_BV, seed=1)
    assert counts[~kept].sum() == 0
    # Tokens expected fewer than 5 times are pooled into one bin.
    small = kept & (probs * ROWS * CALLS < 5)
    pooled = lambda x: np.append(x[kept & ~small], x[small].sum()) if small.any() else x[kept]
    assert _chi2_ok(pooled(counts), pooled(probs))
    # Power: the same counts reject the distribution at temperature 1 on the same tokens.
    assert not _chi2_ok(pooled(counts), pooled(filtered_softmax(1.0)))


def _reference_filter(x_BV, config):
    """The kept tokens [B, V] by sorting: top-k keeps the tokens >= the k-th largest logit
    (ties included); top-p the smallest prefix of the sorted top k (softmax over those k)
    that reaches top_p, and the ties of its last token."""
    scaled = x_BV / config.temperature
    keep = np.ones_like(scaled, bool)
    for b, row in enumerate(scaled):
        cand = np.sort(row)[::-1][:config.top_k or None]
        threshold = cand[-1]
        if config.top_p < 1.0:
            probs = _softmax(cand)
            before = np.cumsum(probs) - probs
            threshold = cand[max(int((before < config.top_p).sum()), 1) - 1]
        keep[b] = row >= threshold
    return keep


def _prefix_mass_near(row, top_k, top_p, tol=1e-5):
    """Whether a prefix of the sorted (top-k) distribution has mass within tol of top_p."""
    probs = np.sort(_softmax(row))[::-1][:top_k or None]
    return np.abs(np.cumsum(probs / probs.sum()) - top_p).min() < tol


@pytest.mark.parametrize("top_k,top_p", [(1, 1.0), (5, 1.0), (64, 1.0), (0, 0.9), (0, 0.3), (40, 0.8), (0, 1e-6), (5000, 0.5)])
def test_filter_thresholds_equal_the_sort_based_definition(top_k, top_p):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((32, 5000)).astype(np.float32) * 2
    x[0, :5] = x[0].max() + 1.0  # a tie at the maximum
    x[1] = np.round(x[1])  # ties everywhere
    x[2] = -1e30 + x[2]  # large magnitudes: the int32 bisection range is not small
    x[3, 7] = 2e38
    config = SamplingConfig(temperature=0.7, top_k=top_k, top_p=top_p)
    got = np.isfinite(np.asarray(jax.jit(lambda x: filter_logits(x, config))(x)))
    want = _reference_filter(x.astype(np.float64), config)
    if top_p < 1.0:
        # float32 and float64 masses may disagree where a prefix's mass is within rounding of
        # top_p: those rows are left out (and must be rare).
        near = np.array([_prefix_mass_near(r / config.temperature, top_k, top_p) for r in x.astype(np.float64)])
        assert near.sum() <= 2
        got, want = got[~near], want[~near]
    np.testing.assert_array_equal(got, want)


def test_greedy_tokens_and_logprobs_are_argmax_and_log_softmax():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((16, 3000)).astype(np.float32) * 3
    x[0, [5, 9, 2000]] = x[0].max() + 1.0  # ties: the first index wins
    x[1] = np.round(x[1])
    x[2, :] = -np.inf
    x[2, 17] = 0.0
    x[3, 11] = np.nan  # argmax counts a NaN as the maximum
    x[4, :] = -np.inf  # no maximum above -inf: argmax says 0
    x_BV = jnp.asarray(x)
    tokens, logprobs = jax.jit(lambda x: sample_token(x, jax.random.key(0), SamplingConfig(temperature=0.0)))(x_BV)
    want = np.asarray(jnp.argmax(x_BV, axis=-1))
    np.testing.assert_array_equal(np.asarray(tokens), want)
    assert want[0] == 5 and want[2] == 17 and want[3] == 11 and want[4] == 0
    log_softmax = np.asarray(jax.nn.log_softmax(x_BV, axis=-1))
    ok = ~np.isin(np.arange(16), [3, 4])  # the NaN and the all -inf rows have no log-prob
    np.testing.assert_allclose(np.asarray(logprobs)[ok], log_softmax[ok, want[ok]], rtol=1e-6, atol=1e-6)


def test_sampled_logprobs_are_the_untruncated_tempered_log_softmax():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((64, 3000)).astype(np.float32) * 3
    config = SamplingConfig(temperature=0.7, top_k=20, top_p=0.9)
    tokens, logprobs = jax.jit(lambda x, k: sample_token(x, k, config))(jnp.asarray(x), jax.random.key(5))
    tokens = np.asarray(tokens)
    want = np.log(_softmax(x / 0.7))[np.arange(64), tokens]
    np.testing.assert_allclose(np.asarray(logprobs), want, rtol=1e-5, atol=1e-5)
    assert _reference_filter(x.astype(np.float64), config)[np.arange(64), tokens].all()
