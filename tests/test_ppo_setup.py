"""Setting up the policy-gradient stage (PPO, RLOO, GRPO): the critic starts on the reward's
scale, truncated sampling is refused, gradient clipping follows the references and the docs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import optim, reward_model, sharding
from rlhf_jax.config_lib import load_config
from rlhf_jax.models import gather_last, load_model, save_pretrained
from rlhf_jax.ppo.setup import hyperparams, load_models
from rlhf_jax.train.runtime import Runtime
from test_ppo import ROOT, prompts, tiny_ppo_config  # noqa: F401  (prompts is a fixture)

TINY = dict(model_type="llama", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
            max_position_embeddings=64)


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    """A tiny RM whose normalisation is far from the identity (gain 2.5, bias -0.7)."""
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    rm, tok = load_model(dict(init="tiny", tiny=TINY), heads=("reward",), mesh=mesh, seed=1)
    rm.reward_gain.set_value(jnp.asarray(2.5))
    rm.reward_bias.set_value(jnp.asarray(-0.7))
    return save_pretrained(rm, tmp_path_factory.mktemp("rm") / "model", tokenizer=tok)


@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_critic_starts_on_the_scale_of_the_rewards_scores(prompts, rm_dir, tmp_path, critic):  # noqa: F811
    rm_weight = 0.5
    cfg = tiny_ppo_config(prompts, **{"reward.rm_path": str(rm_dir), "reward.rm_weight": rm_weight,
                                      "ppo.critic": critic})
    cfg.model.tiny.update(TINY)
    models = load_models(cfg, Runtime(cfg, tmp_path), hyperparams(cfg))
    rng = np.random.default_rng(0)
    pads = rng.integers(0, 4, size=6)
    mask = (np.arange(12) >= pads[:, None]).astype(np.int32)
    ids = (rng.integers(3, 200, size=mask.shape) * mask).astype(np.int32)
    which = "critic" if critic == "separate" else "policy"

    @jax.jit  # one program rather than op-by-op dispatch
    def score_and_value(rm_params, params, frozen):
        rm = models.rm_def.merge(rm_params)
        model = models.defs[which].merge(params, frozen)
        values = gather_last(model.values(model.hidden(ids, mask)[0]), mask)
        return rm_weight * reward_model.scores(rm, ids, mask), reward_model.raw_scores(rm, ids, mask), values

    scores, raw, values = (np.asarray(x) for x in score_and_value(models.rm_params, models.params[which],
                                                                   models.frozen[which]))
    assert np.abs(scores - raw).min() > 0.1  # the reward's scores are not the raw head's
    if critic == "separate":
        # The RM's trunk reads the sequence: its value at the last token is the score in the reward.
        np.testing.assert_allclose(values, scores, rtol=1e-5, atol=1e-5)
    else:
        # OpenAI's value head on the policy trunk starts at 0: the normalised score's mean.
        np.testing.assert_array_equal(values, 0.0)


@pytest.mark.parametrize("algorithm", ["ppo", "rloo", "grpo"])
@pytest.mark.parametrize("field, value", [("top_k", 50), ("top_p", 0.9)])
def test_truncated_sampling_is_refused(algorithm, field, value):
    cfg = load_config(ROOT / "configs" / f"{algorithm}.py")
    hyperparams(cfg)  # the defaults sample untruncated
    cfg.sampling[field] = value
    with pytest.raises(ValueError, match=rf"^sampling\.{field}={value}: .* log-probs and KL .*set sampling\.{field}="):
        hyperparams(cfg)


def _adam_updates(opt, grads, clip):
    """Two AdamW updates (no decay, no weight decay) computed by hand, grads clipped to `clip`."""
    m = v = 0.0
    out = []
    for t, g in enumerate(grads, 1):
        if clip:
            g = g * min(1.0, clip / np.linalg.norm(g))
        m, v = opt.b1 * m + (1 - opt.b1) * g, opt.b2 * v + (1 - opt.b2) * g * g
        m_hat, v_hat = m / (1 - opt.b1 ** t), v / (1 - opt.b2 ** t)
        out.append(-opt.lr * m_hat / (np.sqrt(v_hat) + opt.eps))
    return out


@pytest.mark.parametrize("algorithm, clips", [("ppo", False), ("rloo", False), ("grpo", True)])
def test_gradient_clipping_follows_the_references_and_the_docs(algorithm, clips):
    cfg = load_config(ROOT / "configs" / f"{algorithm}.py")
    norm = cfg.optimizer.max_grad_norm
    assert (norm > 0) == clips
    row = next(line for line in (ROOT / "docs" / "PPO.md").read_text().splitlines()
               if line.startswith("| no gradient clipping"))
    names = {"ppo": "`optimizer.max_grad_norm={:g}` in `configs/ppo.py`", "rloo": "(and `rloo.py`, which loads it)",
             "grpo": "`configs/grpo.py` sets `optimizer.max_grad_norm={:g}`"}
    assert names[algorithm].format(norm) in row

    # The optimiser built from the config: a huge first gradient then a unit one. Clipped, both
    # steps are unit steps of Adam; unclipped, the first one's moments shrink the second.
    opt = cfg.optimizer.copy_and_resolve_references()
    opt.update(dict(decay="constant", warmup_steps=0, weight_decay=0.0))
    tx, _ = optim.make_optimizer(opt, total_steps=10)
    e = np.array([0.6, -0.8], np.float32)
    params = {"w": jnp.zeros(2)}
    state, got = tx.init(params), []
    for g in (1000.0 * e, e):
        updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
        got.append(np.asarray(updates["w"]))
    expected = _adam_updates(opt, [1000.0 * e, e], norm)
    other = _adam_updates(opt, [1000.0 * e, e], 0.0 if clips else 1.0)
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-4)
    assert np.abs(got[1] - other[1]).max() > 0.1 * np.abs(other[1]).max()
