"""Tests for rlhf_jax.dpo against plain NumPy references written here.

The references loop over real pairs in float64 (skipping padding pairs rather than
masking them), so they share no code path with the JAX implementation.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import dpo

P = 9
# Weight 0 marks padding pairs (their inputs are nan); others are plain or ranked weights.
WEIGHTS = np.array([1, 1, 0, 1 / 3, 1 / 3, 1 / 3, 0, 1, 0.5], np.float32)
ATOL = 1e-5


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def make_pairs(rng, weights=WEIGHTS, spread=3.0):
    """Random summed log-probs (pc, pr, rc, rr) with nan in the padding pairs."""
    n = len(weights)
    rc = -rng.uniform(5, 40, size=n)
    rr = -rng.uniform(5, 40, size=n)
    pc = rc + rng.normal(size=n) * spread
    pr = rr + rng.normal(size=n) * spread
    out = []
    for x in (pc, pr, rc, rr):
        x = x.astype(np.float32)
        x[weights == 0] = np.nan
        out.append(x)
    return out


# ---------------------------------------------------------------- references


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def ref_dpo(pc, pr, rc, rr, w, beta, loss_type="sigmoid", eps=0.0):
    """Returns (loss_sum, weight_sum, {name: weighted mean}) by looping over real pairs."""
    sums, wsum = {}, 0.0
    for i in range(len(w)):
        if w[i] == 0:
            continue
        c, r = float(pc[i]) - float(rc[i]), float(pr[i]) - float(rr[i])
        h = c - r
        if loss_type == "sigmoid":
            loss = -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
        else:
            loss = (h - 1 / (2 * beta)) ** 2
        rwc, rwr = beta * c, beta * r
        values = {
            "loss": loss,
            "rewards/chosen": rwc,
            "rewards/rejected": rwr,
            "rewards/margins": rwc - rwr,
            "rewards/accuracy": 1.0 if rwc > rwr else (0.5 if rwc == rwr else 0.0),
            "rewards/ties": float(rwc == rwr),
            "logps/chosen": float(pc[i]),
            "logps/rejected": float(pr[i]),
            "kl_proxy": (c + r) / 2,
        }
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + float(w[i]) * v
        wsum += float(w[i])
    return sums["loss"], wsum, {k: s / wsum for k, s in sums.items()}


def means(stats):
    return {k: float(s) / float(c) for k, (s, c) in stats.items()}


def jit_loss(**kwargs):
    return jax.jit(functools.partial(dpo.dpo_loss, **kwargs))


# -------------------------------------------------------- sequence_logprobs


def test_sequence_logprobs_sums_over_mask_only(rng):
    lengths = [6, 2, 0, 4]
    mask = (np.arange(6)[None] < np.array(lengths)[:, None]).astype(np.float32)
    logp = (-rng.uniform(0, 5, size=(4, 6))).astype(np.float32)
    logp[mask == 0] = np.nan
    got = np.asarray(jax.jit(dpo.sequence_logprobs)(logp, mask))
    want = [np.asarray(logp[b, :n], np.float64).sum() for b, n in enumerate(lengths)]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got[2] == 0.0  # an empty row sums to 0, not nan
    # The gradient is the mask itself, with no nan leaking from padding.
    grad = jax.grad(lambda lp: dpo.sequence_logprobs(lp, mask).sum())(logp)
    np.testing.assert_array_equal(np.asarray(grad), mask)


# ------------------------------------------------------------------ dpo_loss


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("sigmoid", 0.3),
                                          ("ipo", 0.0)])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_matches_reference(rng, loss_type, eps, beta):
    pc, pr, rc, rr = make_pairs(rng)
    fn = jit_loss(beta=beta, loss_type=loss_type, label_smoothing=eps)
    loss_sum, weight_sum, stats = fn(pc, pr, rc, rr, WEIGHTS)
    want_loss, want_w, want_means = ref_dpo(pc, pr, rc, rr, WEIGHTS, beta, loss_type, eps)
    assert np.isfinite(float(loss_sum))
    np.testing.assert_allclose(float(loss_sum), want_loss, rtol=1e-5, atol=ATOL)
    np.testing.assert_allclose(float(weight_sum), want_w, rtol=1e-6)
    assert set(stats) == set(want_means)
    got = means(stats)
    for k in want_means:
        np.testing.assert_allclose(got[k], want_means[k], rtol=1e-5, atol=ATOL, err_msg=k)
    assert 0 < want_means["rewards/accuracy"] < 1  # both outcomes occur in the random case
    for s, c in stats.values():  # every count is the weight sum, so means are per weight
        assert float(c) == float(weight_sum)


def test_padding_pairs_change_nothing(rng):
    """Padding pairs with any content (nan, inf, numbers) give the same loss and gradients."""
    pc, pr, rc, rr = make_pairs(rng)
    fn = jit_loss(beta=0.2)
    base = fn(pc, pr, rc, rr, WEIGHTS)
    finite = [np.where(WEIGHTS == 0, fill, x).astype(np.float32)
              for x, fill in zip((pc, pr, rc, rr), (-3.0, np.inf, 7.0, -np.inf))]
    other = fn(*finite, WEIGHTS)
    np.testing.assert_allclose(float(base[0]), float(other[0]), rtol=1e-6)
    grad_fn = jax.grad(lambda a, b: fn(a, b, rc, rr, WEIGHTS)[0], argnums=(0, 1))
    g_chosen, g_rejected = (np.asarray(g) for g in grad_fn(pc, pr))
    assert np.all(np.isfinite(g_chosen)) and np.all(np.isfinite(g_rejected))
    assert np.all(g_chosen[WEIGHTS == 0] == 0) and np.all(g_rejected[WEIGHTS == 0] == 0)
    assert np.all(g_chosen[WEIGHTS > 0] < 0) and np.all(g_rejected[WEIGHTS > 0] > 0)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_policy_equal_reference_is_log2_and_a_tie(eps):
    x = np.array([-12.5, -30.25, -7.0], np.float32)
    y = np.array([-11.0, -3.5, -22.75], np.float32)
    loss_sum, weight_sum, stats = dpo.dpo_loss(x, y, x, y, np.ones(3, np.float32),
                                               beta=0.1, label_smoothing=eps)
    # Both terms of the smoothed loss are log 2 at h = 0, so eps does not matter.
    np.testing.assert_allclose(float(loss_sum) / 3, math.log(2), rtol=1e-6)
    got = means(stats)
    assert got["rewards/accuracy"] == 0.5 and got["rewards/ties"] == 1.0
    assert got["rewards/margins"] == 0.0 and got["kl_proxy"] == 0.0


def test_tie_with_policy_away_from_reference():
    # Chosen and rejected both gain exactly 1 nat over the reference: implicit rewards tie.
    pc, rc, pr, rr = [np.array([v, v2], np.float32) for v, v2 in
                      [(-3.0, -3.0), (-4.0, -5.0), (-6.0, -6.0), (-7.0, -5.0)]]
    # pair 0: c = 1, r = 1 (tie); pair 1: c = 2, r = -1 (win).
    _, _, stats = dpo.dpo_loss(pc, pr, rc, rr, np.ones(2, np.float32), beta=0.5)
    got = means(stats)
    assert got["rewards/ties"] == 0.5
    assert got["rewards/accuracy"] == 0.75  # (0.5 + 1) / 2
    np.testing.assert_allclose(got["kl_proxy"], (1 + 0.5) / 2, rtol=1e-6)  # pair means 1 and 0.5


@pytest.mark.parametrize("beta", [0.05, 0.5, 2.0])
def test_ipo_closed_form(beta):
    x = np.array([-12.5, -30.25], np.float32)
    y = np.array([-11.0, -3.5], np.float32)
    loss_sum, _, _ = dpo.dpo_loss(x, y, x, y, np.ones(2, np.float32), beta=beta, loss_type="ipo")
    np.testing.assert_allclose(float(loss_sum) / 2, (1 / (2 * beta)) ** 2, rtol=1e-6)
    # The minimum is at h = 1/(2 beta): chosen gains exactly that log-ratio over rejected.
    h = 1 / (2 * beta)
    at_min, _, _ = dpo.dpo_loss(x + h, y, x, y, np.ones(2, np.float32), beta=beta, loss_type="ipo")
    assert float(at_min) < 1e-8


def test_label_smoothing_formula():
    h, beta, eps = 2.0, 0.5, 0.25
    args = [np.array([v], np.float32) for v in (-1.0, -3.0, -2.0, -2.0)]  # h = 1 - (-1) = 2
    loss, _, _ = dpo.dpo_loss(*args, np.ones(1, np.float32), beta=beta, label_smoothing=eps)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    want = -(1 - eps) * math.log(sig(beta * h)) - eps * math.log(sig(-beta * h))
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    plain, _, _ = dpo.dpo_loss(*args, np.ones(1, np.float32), beta=beta)
    assert float(loss) > float(plain)  # smoothing penalises confident correct pairs


def _finite_difference(f, x, i, delta):
    up, down = x.copy(), x.copy()
    up[i] += delta
    down[i] -= delta
    return (float(f(up)) - float(f(down))) / (2 * delta)


@pytest.mark.parametrize("loss_type,eps,beta", [("sigmoid", 0.0, 0.1), ("sigmoid", 0.0, 1.0),
                                                ("sigmoid", 0.2, 1.0), ("ipo", 0.0, 0.5)])
def test_gradient_at_reference(loss_type, eps, beta):
    """At policy = reference, d loss / d πc = −β(1 − 2ε)/2 and d loss / d πr = +β(1 − 2ε)/2."""
    rc = np.array([-5.0, -2.5, -8.0], np.float32)
    rr = np.array([-4.0, -6.0, -3.5], np.float32)
    w = np.ones(3, np.float32)
    fn = jit_loss(beta=beta, loss_type=loss_type, label_smoothing=eps)
    g_c, g_r = jax.grad(lambda a, b: fn(a, b, rc, rr, w)[0], argnums=(0, 1))(rc, rr)
    # d loss / dh at h = 0: sigmoid −β(1 − 2ε)/2; IPO 2(0 − 1/(2β)) = −1/β.
    dl_dh = -beta * (1 - 2 * eps) / 2 if loss_type == "sigmoid" else -1 / beta
    np.testing.assert_allclose(np.asarray(g_c), dl_dh, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g_r), -dl_dh, rtol=1e-6)
    for i in range(3):
        fd_c = _finite_difference(lambda a: fn(a, rr, rc, rr, w)[0], rc.astype(np.float64), i, 1e-2)
        fd_r = _finite_difference(lambda b: fn(rc, b, rc, rr, w)[0], rr.astype(np.float64), i, 1e-2)
        np.testing.assert_allclose(fd_c, dl_dh, rtol=2e-3)
        np.testing.assert_allclose(fd_r, -dl_dh, rtol=2e-3)


def test_gradient_away_from_reference_matches_finite_differences(rng):
    pc, pr, rc, rr = make_pairs(rng, weights=np.ones(4, np.float32), spread=1.0)
    w = np.array([1.0, 0.5, 2.0, 1 / 3], np.float32)
    beta = 0.7
    fn = jax.jit(functools.partial(dpo.dpo_loss, beta=beta))
    g_c = np.asarray(jax.grad(lambda a: fn(a, pr, rc, rr, w)[0])(pc))
    h = (pc.astype(np.float64) - rc) - (pr.astype(np.float64) - rr)
    # d/dπc of −w log σ(βh) = −w β σ(−βh).
    np.testing.assert_allclose(g_c, -w * beta / (1 + np.exp(beta * h)), rtol=1e-5)
    for i in range(4):
        fd = _finite_difference(lambda a: fn(a, pr, rc, rr, w)[0], pc.astype(np.float64), i, 1e-2)
        np.testing.assert_allclose(fd, g_c[i], rtol=3e-3, atol=1e-4)


# -------------------------------------------------------------- pair weights


def test_pair_weights_per_prompt():
    np.testing.assert_allclose(dpo.pair_weights([2]), [1.0])
    np.testing.assert_allclose(dpo.pair_weights([3]), [1 / 3] * 3, rtol=1e-7)
    np.testing.assert_allclose(dpo.pair_weights([4]), [1 / 6] * 6, rtol=1e-7)
    sizes = [2, 3, 4, 2]
    w = dpo.pair_weights(sizes)
    assert w.dtype == np.float32 and w.shape == (1 + 3 + 6 + 1,)
    bounds = np.cumsum([0] + [math.comb(k, 2) for k in sizes])
    for a, b in zip(bounds[:-1], bounds[1:]):
        np.testing.assert_allclose(w[a:b].sum(), 1.0, rtol=1e-6)
    # With these weights, the weight sum counts prompts, so the loss mean is per prompt.
    x = np.zeros(len(w), np.float32)
    _, weight_sum, _ = dpo.dpo_loss(x, x, x, x, w, beta=0.1)
    np.testing.assert_allclose(float(weight_sum), len(sizes), rtol=1e-6)
    assert dpo.pair_weights([]).shape == (0,)


@pytest.mark.parametrize("sizes", [[1], [3, 0], [2.5], [True]])
def test_pair_weights_rejects_bad_sizes(sizes):
    with pytest.raises(ValueError, match="group_sizes"):
        dpo.pair_weights(sizes)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("kwargs,match", [
    (dict(beta=0.1, loss_type="hinge"), r"'hinge'.*sigmoid.*ipo"),
    (dict(beta=0.0), "beta"),
    (dict(beta=-0.1), "beta"),
    (dict(beta=float("nan")), "beta"),
    (dict(beta=0.1, label_smoothing=0.5), "label_smoothing"),
    (dict(beta=0.1, label_smoothing=-0.1), "label_smoothing"),
    (dict(beta=0.1, loss_type="ipo", label_smoothing=0.1), "label_smoothing"),
])
def test_invalid_arguments_raise(kwargs, match):
    x = jnp.zeros(2)
    with pytest.raises(ValueError, match=match):
        dpo.dpo_loss(x, x, x, x, jnp.ones(2), **kwargs)
