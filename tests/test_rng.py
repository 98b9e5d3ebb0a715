"""PRNG streams: no two random draws of a run share a key, across PPO's (and RLOO's / GRPO's)
rollouts and minibatch shuffles, the sampler calls of collection / best-of-n / evaluation, and
a model initialised from the same seed."""

import jax
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import rng
from rlhf_jax.ppo.step import ppo_rollout_key, ppo_shuffle_keys
from rlhf_jax.sampling import rollout_key, token_key

SEED, ITERATIONS, EPOCHS, TOKENS = 0, 4, 4, 8


def _data(key) -> tuple[int, ...]:
    key = jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return tuple(np.asarray(key).reshape(-1).tolist())


def test_split_is_fold_in_so_streams_must_not_share_parents():
    # Why folding a bare step for one use and (stream, step) for another collided: with
    # partitionable threefry the i-th split of a key is its fold_in with i.
    k = jax.random.key(3)
    assert jax.config.jax_threefry_partitionable
    assert _data(jax.random.split(k, 4)[2]) == _data(jax.random.fold_in(k, 2))


def test_no_two_draws_share_a_key():
    base = jax.random.key(SEED)
    raw = jax.random.key_data(base)  # the PPO state holds raw key data
    keys: dict[tuple, str] = {}

    def add(key, what):
        d = _data(key)
        assert d not in keys, f"{what} reuses the key of {keys[d]}"
        keys[d] = what

    init = nnx.Rngs(SEED)  # a model initialised from the same seed (load_model(..., seed=cfg.seed))
    for i in range(256):
        add(init.params(), f"init draw {i}")
    for name in rng.STREAMS:
        add(jax.random.fold_in(base, rng.STREAM_IDS[name]), f"stream {name}")
    for it in range(ITERATIONS):
        rollout = ppo_rollout_key(base, it)
        assert _data(rollout) == _data(ppo_rollout_key(raw, it))  # typed or raw: the same key
        add(rollout, f"PPO rollout {it}")
        for t in range(TOKENS):
            add(token_key(rollout, t), f"PPO rollout {it} token {t}")
        add(rng.stream_key(raw, "ppo_shuffle", it), f"PPO shuffle parent {it}")
        for e, k in enumerate(ppo_shuffle_keys(raw, it, EPOCHS)):
            add(k, f"PPO shuffle {it} epoch {e}")
        batch = rollout_key(SEED, it)  # generate_texts / collect_comparisons / best_of_n batch j
        add(batch, f"sampler call {it}")
        for t in range(TOKENS):
            add(token_key(batch, t), f"sampler call {it} token {t}")
    assert len(keys) == 256 + len(rng.STREAMS) + ITERATIONS * (2 * TOKENS + 3 + EPOCHS)


def test_stream_ids_are_distinct_and_names_checked():
    assert len(set(rng.STREAM_IDS.values())) == len(rng.STREAMS)
    with pytest.raises(ValueError, match="unknown PRNG stream 'dropout'"):
        rng.stream_key(0, "dropout", 1)
