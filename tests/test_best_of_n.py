"""Best-of-n: n = 1 is plain sampling, the kept sample is each prompt's best, the KL numbers."""

import math

import jax
import numpy as np
import pytest

from rlhf_jax import sharding
from rlhf_jax.best_of_n import best_of_n, plugin_kl
from rlhf_jax.feedback.collect import generate_texts
from rlhf_jax.models import load_model
from rlhf_jax.reward_functions import count_substring

PROMPTS = [f"q{i}:" for i in range(6)]
SAMPLING = dict(max_new_tokens=12, temperature=1.0, batch_size=8, max_prompt_length=8)


@pytest.fixture(scope="module")
def policy():
    """A random tiny byte-level model as a (model, tokenizer) pair."""
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    tiny = dict(model_type="llama", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                mlp_dim=64, max_position_embeddings=64)
    return load_model(dict(init="tiny", tiny=tiny), mesh=mesh)


def _score(prompts, responses):
    return np.asarray(count_substring(" ")(prompts, responses), np.float64) + [len(r) / 100 for r in responses]


def test_n1_is_plain_sampling(policy):
    out = best_of_n(policy, PROMPTS, _score, n=1, seed=3, **SAMPLING)
    plain = generate_texts(policy, PROMPTS, seed=3, **SAMPLING)
    assert out.texts == plain
    np.testing.assert_allclose(out.best_scores.mean(), np.mean(_score(PROMPTS, plain)))
    assert out.kl_analytic == 0.0 and out.kl_plugin == 0.0


def test_keeps_each_prompts_best_and_reports_the_kl(policy):
    n = 4
    out = best_of_n(policy, PROMPTS, _score, n=n, seed=0, **SAMPLING)
    every = generate_texts(policy, PROMPTS, num_samples=n, seed=0, **SAMPLING)
    assert out.scores.shape == (len(PROMPTS), n)
    for g, text in enumerate(out.texts):
        assert text in every[g * n:(g + 1) * n] and out.best_scores[g] == out.scores[g].max()
    assert out.best_scores.mean() >= out.scores.mean()
    assert out.kl_analytic == pytest.approx(math.log(4) - 0.75)
    assert set(out.metrics()) >= {"best_of_n/kl_analytic", "best_of_n/kl_plugin", "best_of_n/score"}


def test_plugin_kl():
    # n distinct scores: levels i/n, best-of-n masses (i/n)^n - ((i-1)/n)^n.
    q = np.array([(i / 4) ** 4 - ((i - 1) / 4) ** 4 for i in range(1, 5)])
    assert plugin_kl(np.array([[0.1, 0.4, 0.2, 0.3]])) == pytest.approx(float(np.sum(q * np.log(4 * q))))
    assert plugin_kl(np.array([[0.1, 0.4, 0.2, 0.3]])) < math.log(4) - 0.75
    assert plugin_kl(np.full((2, 4), 0.5)) == 0.0  # every sample ties: best-of-n is the policy
    # Two levels, 1/2 each: best-of-2 puts 3/4 on the top one.
    assert plugin_kl(np.array([[0.0, 1.0]])) == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))
