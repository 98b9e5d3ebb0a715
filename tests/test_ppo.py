"""PPO end to end on a tiny model: a reward function raises the score with the KL bounded, a
large fixed β keeps the policy at the reference; PPO-ptx and the separate critic run."""

import json
from pathlib import Path

import numpy as np
import pytest

from rlhf_jax.config_lib import load_config
from rlhf_jax.ppo.trainer import run_ppo
from rlhf_jax.reward_functions import count_substring
from rlhf_jax.train.logging import read_metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ppo_data")
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}:"}) + "\n" for i in range(64)))
    (d / "sft.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}:", "completion": " aaa"}) + "\n"
                                         for i in range(32)))
    return d


def tiny_ppo_config(prompts, **changes):
    c = load_config(ROOT / "configs" / "ppo.py")
    c.model.init = "tiny"
    c.model.tiny.update(dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64))
    c.data.path = str(prompts / "prompts.jsonl")
    c.data.max_prompt_length = 8
    c.data.max_length = 16
    c.sampling.max_new_tokens = 12
    c.sampling.temperature = 1.0
    c.ppo.batch_size = 32
    c.ppo.num_minibatches = 4
    c.ppo.kl_target = 0.0  # fixed beta
    c.ppo.penalize_missing_eos = False  # a random tiny model rarely says EOS
    c.ppo.sample_every = 0
    c.optimizer.lr = 1e-2
    c.optimizer.decay = "constant"
    c.train.progress_bar = False
    c.train.checkpoint_every = 0
    c.mesh.num_devices = 1
    c.update_from_flattened_dict(changes)
    return c


def _series(workdir, key):
    return np.array([m[key] for m in read_metrics(workdir)])


def test_reward_function_raises_score_while_kl_stays_bounded(prompts, tmp_path):
    # The KL-regularised optimum is pi ~ pi_ref * exp(r / beta): with beta = 0.2 and a
    # near-uniform reference over 262 byte tokens, p('a') -> e^5 / (e^5 + 261) ~ 0.36 per
    # token, i.e. a score near 4.3 in 12 tokens at a KL near 16 nats: a rise, and a bound far
    # below the 12 * log(262) ~ 67 nats of a policy collapsed onto 'aaaa...'.
    cfg = tiny_ppo_config(prompts, **{"ppo.num_updates": 30, "ppo.init_beta": 0.2})
    summary = run_ppo(cfg, tmp_path, reward_functions=[count_substring("a")])
    score, kl, kl3 = (_series(tmp_path, k) for k in ("ppo/score", "ppo/kl", "ppo/kl_k3"))
    assert score[:4].mean() < 0.3  # a random byte-level policy rarely writes 'a'
    assert score[-4:].mean() > score[:4].mean() + 1.0, score  # a clear rise
    assert kl3.max() < 40 and np.all(np.isfinite(kl))  # transients at lr 1e-2 overshoot the optimum
    for key in ("ppo/entropy", "ppo/approx_kl", "ppo/clipfrac", "ppo/value_loss", "ppo/explained_variance",
                "ppo/response_length", "ppo/frac_hit_length_limit", "ppo/beta", "ppo/kl_k1", "ppo/kl_k3"):
        assert key in summary, key
    assert (tmp_path / "model" / "model.safetensors").exists()


def test_large_fixed_beta_keeps_policy_at_reference(prompts, tmp_path):
    # At lr 1e-2 PPO's own noise moves a tiny policy by a few nats whatever beta is (whitened
    # advantages normalise the penalty's scale); at 1e-3 the penalty holds it in place.
    cfg = tiny_ppo_config(prompts, **{"ppo.num_updates": 16, "ppo.init_beta": 20.0, "optimizer.lr": 1e-3})
    run_ppo(cfg, tmp_path, reward_functions=[count_substring("a")])
    kl3, score = _series(tmp_path, "ppo/kl_k3"), _series(tmp_path, "ppo/score")
    assert kl3.max() < 1.0
    assert score[-4:].mean() < 0.3  # the reward is not chased


def test_adaptive_controller_and_ptx_run(prompts, tmp_path):
    cfg = tiny_ppo_config(prompts, **{"ppo.num_updates": 4, "ppo.kl_target": 0.5, "ppo.kl_horizon": 100.0,
                                      "ppo.init_beta": 0.2, "ppo.ptx_coef": 0.5,
                                      "ppo.ptx_data": str(prompts / "sft.jsonl"), "ppo.ptx_batch_size": 4,
                                      "ppo.sample_every": 2})
    run_ppo(cfg, tmp_path, reward_functions=[count_substring("a")])
    beta = _series(tmp_path, "ppo/beta")
    kl = _series(tmp_path, "ppo/kl")
    # β moves with the controller: up when KL > target, down when below.
    for b0, b1, k in zip(beta[:-1], beta[1:], kl[:-1]):
        assert b1 != b0 and (b1 > b0) == (k > 0.5)
    assert np.all(np.isfinite(_series(tmp_path, "ppo/ptx_loss")))
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 4 and {"prompt", "response", "score"} <= set(json.loads(lines[0]))
