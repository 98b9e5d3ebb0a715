"""Named PRNG streams: every kind of random draw of a run has its own stream of the run's key.

    stream_key(base, name, step) = fold_in(fold_in(base, STREAM_IDS[name]), step)

Two draws that share a key, or where one's key is the other's parent, give correlated bits:
with partitionable threefry `split(k, n)[i]` *is* `fold_in(k, i)`, so a scheme that folds a
bare step into the base for one use and (stream, step) for another hands the same keys to
both (PPO's shuffles at iteration 1 were the rollouts' sampling keys). Stream ids are 32-bit
hashes of the names rather than 0, 1, 2: `nnx.Rngs(seed)` initialises a model with
`fold_in(key(seed), 0), fold_in(key(seed), 1), ...`, so a small id would share a parent with
a weight's initialisation drawn from the same seed. Within a stream, a step's key is only a
parent (generation folds in the token position, the PPO update splits one key per epoch).
"""

from __future__ import annotations

import zlib

import jax

STREAMS = (
    "sample",  # generate_texts / collect_comparisons / best-of-n: batch j of a call (sampling.rollout_key)
    "ppo_rollout",  # the policy-gradient stage's rollout at iteration `step`
    "ppo_shuffle",  # the same iteration's minibatch shuffles, one key per epoch
)
STREAM_IDS = {name: zlib.crc32(name.encode()) for name in STREAMS}


def stream_key(base: jax.Array | int, stream: str, step: int | jax.Array) -> jax.Array:
    """The key of `stream` at `step`; `base` is a key (typed or raw uint32 data, returned in
    kind) or an int seed. Jit-able in `base` and `step`."""
    if stream not in STREAM_IDS:
        raise ValueError(f"unknown PRNG stream {stream!r}; add it to rlhf_jax.rng.STREAMS")
    if isinstance(base, int):
        base = jax.random.key(base)
    return jax.random.fold_in(jax.random.fold_in(base, STREAM_IDS[stream]), step)
