"""Batched generation compiled as one XLA program: prefill, then a `while_loop` of decode steps.

Shape suffixes: B batch, P prompt length, N new tokens, S key/value slots, V vocabulary.
`generate` is pure in the parameters, prompts and a PRNG key; every setting that changes the
program is a field of the hashable `SamplingConfig`, so nothing is closed over. The decode
loop exits as soon as every row has stopped; stopped rows are fed masked pad tokens, and
their outputs after the stop are pad, log-prob 0, mask 0.

`Samples.logprobs` are log softmax(logits / T) *before* top-k/top-p truncation: the quantity
PPO recomputes from a full forward pass, so the first PPO ratio is exactly 1 (T = 0 scores
with T = 1). Every call needs a fresh key (`rollout_key(base, step)`, or a stream of its own
from `rlhf_jax.rng`); decode step t uses `token_key(key, t)`, with partitionable threefry, so
sharding does not change the tokens.

Per token the sampler reads the [B, V] logits a few times and draws two uniforms per row (a
two-level inverse CDF, `sample_token`), instead of Gumbel noise over [B, V] (threefry for
every vocabulary entry: ~12 ms a step for B=16, V=50k on one CPU core). The distribution is
unchanged; the tokens drawn for a given key differ from the Gumbel-max sampler used before.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rlhf_jax import sharding as sharding_lib
from rlhf_jax.models.transformer import KVCache, last_index
from rlhf_jax.models.modeldef import ModelDef
from rlhf_jax.rng import stream_key

Params = Mapping[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static settings of one generation program (hashable: a jit static argument).

    Attributes:
      max_new_tokens: N, the most tokens generated per row (>= 1).
      temperature: T; 0 means greedy (argmax), > 0 samples from softmax(logits / T).
      top_k: keep only the k most likely tokens (0 = off). Ties with the k-th logit are kept.
      top_p: nucleus sampling: keep the smallest set of most likely tokens whose probability
        (after temperature and top-k) reaches top_p (1.0 = off). The most likely token is
        always kept.
      stop_token_ids: ids that end a row (EOS, a truncate token, ...); the stop token itself
        is part of the response (mask 1). Empty: every row runs to max_new_tokens.
      pad_token_id: written after a row's stop token.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    def __post_init__(self):
        # Lists from a YAML/JSON config are turned into tuples so the config stays hashable.
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in self.stop_token_ids))
        if int(self.max_new_tokens) < 1:
            raise ValueError(f"SamplingConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"SamplingConfig.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if int(self.top_k) < 0:
            raise ValueError(f"SamplingConfig.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if any(i < 0 for i in self.stop_token_ids):
            raise ValueError(f"SamplingConfig.stop_token_ids must be non-negative, got {self.stop_token_ids}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def for_tokenizer(cls, tokenizer, *, max_new_tokens: int, temperature: float, top_k: int = 0,
                      top_p: float = 1.0, extra_stop_token_ids=()) -> "SamplingConfig":
        """Stops at the tokenizer's EOS (and `extra_stop_token_ids`), pads with its pad id."""
        stop = {int(i) for i in (tokenizer.eos_token_id, *extra_stop_token_ids) if i is not None}
        return cls(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_k=int(top_k),
                   top_p=float(top_p), stop_token_ids=tuple(sorted(stop)), pad_token_id=int(tokenizer.pad_token_id))


@flax.struct.dataclass
class Samples:
    """What `generate` returns (a pytree; every per-row field is sharded like the batch).

    Attributes:
      tokens: int32 [B, N] generated ids; `pad_token_id` after a row's stop token.
      logprobs: float32 [B, N] log softmax(logits / T) of each sampled token, without top-k /
        top-p truncation (see the module docstring); 0 where `mask` is 0.
      mask: int32 [B, N] 1 on generated tokens up to and including the stop token.
      lengths: int32 [B] number of generated tokens (= mask.sum(-1)).
      stopped: bool [B] whether the row produced a stop token (False: it hit max_new_tokens).
      num_steps: int32 [] tokens sampled per row before the loop exited (N, or fewer when
        every row stopped early); a diagnostic of the early exit.
    """

    tokens: jax.Array
    logprobs: jax.Array
    mask: jax.Array
    lengths: jax.Array
    stopped: jax.Array
    num_steps: jax.Array


def response_text(tokenizer, tokens, length: int, stopped: bool) -> str:
    """The text of one sampled response: its `length` tokens without the stop token that
    ended it (EOS or an extra stop token such as a newline), special tokens dropped. What a
    labeler reads, what an RM is trained and scored on; `rm_input_ids` does the same to ids."""
    n = int(length) - int(bool(stopped))
    return tokenizer.decode(list(np.asarray(tokens)[:max(n, 0)]), skip_special_tokens=True)


def rm_input_ids(ids_BT: jax.Array, q: int, stop_ids: tuple[int, ...], eos_id: int) -> jax.Array:
    """Prompt+response ids [B, T] (response from column `q`) with a response's extra stop
    token replaced by EOS: an RM trained on text + [EOS] (`data.encode_prompt_response`) then
    scores a response stopped by, say, a newline exactly as it scores its text."""
    if not stop_ids:
        return ids_BT
    is_stop = jnp.any(ids_BT[..., None] == jnp.asarray(stop_ids, ids_BT.dtype), axis=-1)
    in_response = jnp.arange(ids_BT.shape[1]) >= q
    return jnp.where(is_stop & in_response[None, :], jnp.asarray(eos_id, ids_BT.dtype), ids_BT)


def rollout_key(base_key: jax.Array | int, step: int | jax.Array) -> jax.Array:
    """The key of sampler call `step` (batch j of `generate_texts`, `collect_comparisons`,
    best-of-n): the "sample" stream of `base_key` (`rlhf_jax.rng`).

    Pass a different `step` on every call of `generate`; the same (base_key, step) reproduces
    the same samples. Training stages sample from streams of their own.
    """
    return stream_key(base_key, "sample", step)


def token_key(key: jax.Array, t: int | jax.Array) -> jax.Array:
    """The key that draws token t of a `generate` call with `key`."""
    return jax.random.fold_in(key, t)


# Vocabulary block of the two-level inverse-CDF draw (`_draw`): ~sqrt(V) for V ~ 50k, so both
# levels are short.
_BLOCK = 256


def _argmax_of_exp(x_BV: jax.Array, w_BV: jax.Array) -> jax.Array:
    """`jnp.argmax(x_BV, -1)` (first index of the maximum, a NaN counting as the maximum; 0 for
    a row of -inf) read off w = exp(x - max(x)), which the log-prob needs anyway: w is exactly
    1 at the maxima (exp(0) = 1). One plain min-reduction that fuses with w's: XLA:CPU runs
    the (value, index) reduce that argmax lowers to ~4x slower over a 50k vocabulary, and
    comparing x with its own maximum instead kept a greedy decode step slower than a sampling
    one (batch 16, Llama d256, vocabulary 50k, one thread: 9.8 vs 9.6 ms; reading w: 8.4 vs 9.7)."""
    v = x_BV.shape[-1]
    hit_BV = (w_BV == 1.0) | jnp.isnan(x_BV)
    first_B = jnp.min(jnp.where(hit_BV, jnp.arange(v, dtype=jnp.int32), v), axis=-1)
    return jnp.where(first_B < v, first_B, 0)


def _ordered(x: jax.Array) -> jax.Array:
    """float32 -> int32 with the same order (the top-p bisection searches over these)."""
    i = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)


def _bisect(lo_B: jax.Array, hi_B: jax.Array, ok: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """The smallest int32 t in [lo, hi] with ok(t) (per row), for ok monotone (False then True)
    and ok(hi) True: 32 halvings of the int32 range, each one pass over the vocabulary."""
    def step(_, bounds):
        lo_B, hi_B = bounds
        mid_B = (lo_B >> 1) + (hi_B >> 1) + (lo_B & hi_B & 1)  # floor((lo + hi) / 2) without overflow
        good_B = ok(mid_B)
        return jnp.where(good_B, lo_B, mid_B + 1), jnp.where(good_B, mid_B, hi_B)
    return jax.lax.fori_loop(0, 32, step, (lo_B, hi_B))[1]


def filter_logits(logits_BV: jax.Array, config: SamplingConfig) -> jax.Array:
    """Temperature-scaled logits with everything outside top-k / the nucleus set to -inf.

    Order as in Hugging Face's warpers: temperature, then top-k, then top-p on the
    distribution renormalised over the top k. Requires temperature > 0.
    """
    scaled_BV = logits_BV.astype(jnp.float32) / config.temperature
    v = scaled_BV.shape[-1]
    k = int(config.top_k) if 0 < config.top_k < v else 0  # top_k >= V keeps every token
    if not k and config.top_p >= 1.0:
        return scaled_BV
    if k:
        # The k largest, high to low. The barrier keeps XLA:CPU's TopK kernel (~1 ms for
        # [16, 50k]): when only a slice of the values is used, XLA rewrites top_k into a full
        # sort of the vocabulary (~150 ms).
        sorted_BC = jax.lax.optimization_barrier(jax.lax.top_k(scaled_BV, k)[0])
        if config.top_p < 1.0:
            probs_BC = jax.nn.softmax(sorted_BC, axis=-1)
            # Keep candidate c while the mass strictly before it is < top_p: the smallest prefix
            # reaching top_p, never empty.
            before_BC = jnp.cumsum(probs_BC, axis=-1) - probs_BC
            keep_B = jnp.maximum(jnp.sum(before_BC < config.top_p, axis=-1), 1)
            threshold_B = jnp.take_along_axis(sorted_BC, keep_B[:, None] - 1, axis=-1)[:, 0]
        else:
            threshold_B = sorted_BC[:, -1]
        return jnp.where(scaled_BV >= threshold_B[:, None], scaled_BV, -jnp.inf)
    # Top-p alone would need the whole vocabulary sorted; instead the threshold is found by
    # bisection over the float32 values (as order-preserving int32s), 32 passes over the
    # vocabulary (~8 ms for [16, 50k] against ~140 ms for the sort): the smallest t such that
    # the tokens strictly above t hold less than top_p of the mass. Keeping x >= t keeps every
    # token whose more likely tokens hold less than top_p: the smallest prefix of the sorted
    # tokens that reaches top_p, with the ties of its last token.
    key_BV = _ordered(scaled_BV)
    w_BV = jnp.exp(scaled_BV - scaled_BV.max(-1, keepdims=True))
    budget_B = config.top_p * w_BV.sum(-1)
    below_p = lambda t_B: jnp.sum(jnp.where(key_BV > t_B[:, None], w_BV, 0.0), -1) < budget_B
    threshold_B = _bisect(key_BV.min(-1), key_BV.max(-1), below_p)
    return jnp.where(key_BV >= threshold_B[:, None], scaled_BV, -jnp.inf)


def _first_above(cum_BN: jax.Array, target_B: jax.Array, mass_BN: jax.Array) -> jax.Array:
    """The first n with cum[n] > target; when rounding leaves none, the last n with mass."""
    n = cum_BN.shape[-1]
    first_B = jnp.sum(cum_BN <= target_B[:, None], axis=-1)
    last_B = jnp.max(jnp.where(mass_BN > 0, jnp.arange(n, dtype=jnp.int32), 0), axis=-1)
    return jnp.minimum(first_B, last_B).astype(jnp.int32)


def _uniforms(key: jax.Array, b: int) -> jax.Array:
    """The two uniforms [B, 2] in [0, 1) that `_draw` uses for one token of each row."""
    return jax.random.uniform(key, (b, 2), jnp.float32)


def _draw(w_BV: jax.Array, u_B2: jax.Array) -> jax.Array:
    """One index per row with probability w / sum(w) (w >= 0, a positive entry in every row),
    by inverse CDF in two levels: a block of `_BLOCK` entries by the blocks' masses, then an
    entry of that block by its weights, each with its own uniform (`u_B2`). Two uniforms a
    row, instead of the [B, V] Gumbel noise of `jax.random.categorical`, and only
    block sums over the whole vocabulary. Each level resolves its uniform's 2^-23 steps
    relative to its own total, so a token's probability is off by at most ~2^-23 of its
    block's mass (float32 Gumbel-max is no finer)."""
    b, v = w_BV.shape
    c = min(_BLOCK, v)
    nb = -(-v // c)
    w_BNC = jnp.pad(w_BV, ((0, 0), (0, nb * c - v))).reshape(b, nb, c)
    mass_BN = w_BNC.sum(-1)
    cum_BN = jnp.cumsum(mass_BN, axis=-1)
    block_B = _first_above(cum_BN, u_B2[:, 0] * cum_BN[:, -1], mass_BN)
    w_BC = jnp.take_along_axis(w_BNC, block_B[:, None, None], axis=1)[:, 0]
    cum_BC = jnp.cumsum(w_BC, axis=-1)
    within_B = _first_above(cum_BC, u_B2[:, 1] * cum_BC[:, -1], w_BC)
    return block_B * c + within_B


def sample_token(logits_BV: jax.Array, key: jax.Array, config: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """One token per row from next-token logits [B, V] (float32).

    Returns (tokens int32 [B], logprobs float32 [B]); the log-prob is under the untruncated
    softmax(logits / T) (softmax(logits) when greedy). Sampling draws two uniforms per row
    (`_draw`), not a [B, V] Gumbel noise: the distribution is softmax(filtered logits) as
    before, but the tokens drawn for a given key differ from the Gumbel-max sampler's
    (`jax.random.categorical`) used up to this version.
    """
    return _sample(logits_BV, None if config.greedy else _uniforms(key, logits_BV.shape[0]), config)


def _sample(logits_BV: jax.Array, u_B2: jax.Array | None, config: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """`sample_token` with the row's two uniforms (`_uniforms`) already drawn (None when greedy)."""
    logits_BV = logits_BV.astype(jnp.float32)
    scaled_BV = logits_BV if config.greedy else logits_BV / config.temperature
    max_B1 = jnp.max(scaled_BV, axis=-1, keepdims=True)
    w_BV = jnp.exp(scaled_BV - max_B1)
    if config.greedy:
        tokens_B = _argmax_of_exp(logits_BV, w_BV)
    elif not config.top_k and config.top_p >= 1.0:
        tokens_B = _draw(w_BV, u_B2)
    else:
        kept_BV = filter_logits(logits_BV, config)
        tokens_B = _draw(jnp.exp(kept_BV - jnp.max(kept_BV, axis=-1, keepdims=True)), u_B2)
    # log_softmax(scaled) at the token, as jax.nn.log_softmax computes it, without the [B, V] result.
    at_B = jnp.take_along_axis(scaled_BV, tokens_B[:, None], axis=-1)[:, 0]
    return tokens_B, (at_B - max_B1[:, 0]) - jnp.log(jnp.sum(w_BV, axis=-1))


def _merge_params(params: Params | Sequence[Params]) -> dict:
    if isinstance(params, Mapping):
        return dict(params)
    merged: dict = {}
    for part in params:
        merged.update(part)
    return merged


def _cache_sharding(mesh: Mesh, rules: Mapping | None, num_kv_heads: int) -> NamedSharding:
    """[B, K, S, E] cache arrays (`KVCache` layout): batch over the batch axes, kv heads over
    the tensor axis when they divide (so attention stays local to the shard that computed q/k/v)."""
    rules = sharding_lib.rules_from_config(rules)
    kv_axes = rules.get("kv_heads")
    flat = (kv_axes,) if isinstance(kv_axes, str) else tuple(kv_axes or ())
    if flat and num_kv_heads % int(np.prod([mesh.shape[a] for a in flat])):
        kv_axes = None
    return NamedSharding(mesh, P(rules["batch"], kv_axes, None, None))


def generate(model_def: ModelDef, params: Params | Sequence[Params], prompt_ids_BP: jax.Array,
             prompt_mask_BP: jax.Array, key: jax.Array, *, config: SamplingConfig,
             mesh: Mesh | None = None, rules: Mapping | None = None) -> Samples:
    """Samples up to `config.max_new_tokens` tokens per prompt. Pure; jit it (or use `make_generate`).

    `params`: a `{dotted name: array}` dict, or several whose union names every variable.
    `prompt_ids_BP`: left-padded prompts (right padding works too), each with >= 1 real token.
    `key`: fresh for every call (`rollout_key`). `mesh`, `rules`: when given, the KV cache is
    constrained to be sharded like the batch (kv heads over the tensor axis).
    Returns `Samples` with [B, N] tokens/logprobs/mask and [B] lengths/stopped.
    """
    model = model_def.merge(_merge_params(params))
    cfg = model.cfg
    ids_BP = jnp.asarray(prompt_ids_BP, jnp.int32)
    mask_BP = jnp.asarray(prompt_mask_BP).astype(jnp.int32)
    b, p = ids_BP.shape
    n = int(config.max_new_tokens)
    pad = jnp.int32(config.pad_token_id)
    stop_ids = jnp.asarray(config.stop_token_ids, jnp.int32)

    def is_stop(tokens_B):
        if not config.stop_token_ids:
            return jnp.zeros(tokens_B.shape, bool)
        return jnp.any(tokens_B[:, None] == stop_ids[None, :], axis=-1)

    def constrain(cache: KVCache) -> KVCache:
        if mesh is None:
            return cache
        kv = _cache_sharding(mesh, rules, cfg.num_kv_heads)
        rows = NamedSharding(mesh, P(sharding_lib.rules_from_config(rules)["batch"]))
        c = jax.lax.with_sharding_constraint
        return cache.replace(k=tuple(c(x, kv) for x in cache.k), v=tuple(c(x, kv) for x in cache.v),
                             mask_BS=c(cache.mask_BS, rows), lengths_B=c(cache.lengths_B, rows))

    # ---- prefill: the whole prompt in one pass; only the last real position needs logits,
    # so the [B, P, V] logits of every prompt position are never built.
    cache = constrain(KVCache.create(cfg, b, p + n - 1))
    h_BPD, cache = model.hidden(ids_BP, mask_BP, cache=cache)
    h_B1D = jnp.take_along_axis(h_BPD, last_index(mask_BP)[:, None, None], axis=1)
    # Every step's uniforms, drawn before the loop in one vectorised call: the values that
    # token_key(key, t) gives at step t (as `sample_token` draws them), without a small
    # threefry loop of its own inside every decode step (~0.1 ms a step on CPU).
    u_NB2 = None if config.greedy else jax.vmap(lambda t: _uniforms(token_key(key, t), b))(jnp.arange(n))
    step_uniforms = lambda t: None if u_NB2 is None else jax.lax.dynamic_index_in_dim(u_NB2, t, keepdims=False)
    tok_B, logp_B = _sample(model.logits(h_B1D)[:, 0], step_uniforms(0), config)

    stopped_B = is_stop(tok_B)
    tokens_BN = jnp.full((b, n), pad, jnp.int32).at[:, 0].set(tok_B)
    logprobs_BN = jnp.zeros((b, n), jnp.float32).at[:, 0].set(logp_B)
    gen_mask_BN = jnp.zeros((b, n), jnp.int32).at[:, 0].set(1)

    # ---- decode: step t feeds token t-1 and samples token t.
    def cond(state):
        t, _, _, _, _, stopped_B = state
        return (t < n) & ~jnp.all(stopped_B)

    def body(state):
        t, cache, tokens_BN, logprobs_BN, gen_mask_BN, stopped_B = state
        prev_B1 = jax.lax.dynamic_slice_in_dim(tokens_BN, t - 1, 1, axis=1)
        # A row that stopped before token t-1 feeds a masked pad: its cache slots stay empty
        # and its positions do not advance. (The stop token itself is fed unmasked; harmless.)
        prev_mask_B1 = jax.lax.dynamic_slice_in_dim(gen_mask_BN, t - 1, 1, axis=1)
        h_B1D, cache = model.hidden(prev_B1, prev_mask_B1, cache=cache)
        tok_B, logp_B = _sample(model.logits(h_B1D)[:, 0], step_uniforms(t), config)
        live_B = ~stopped_B
        tok_B = jnp.where(live_B, tok_B, pad)
        logp_B = jnp.where(live_B, logp_B, 0.0)
        tokens_BN = jax.lax.dynamic_update_slice_in_dim(tokens_BN, tok_B[:, None], t, axis=1)
        logprobs_BN = jax.lax.dynamic_update_slice_in_dim(logprobs_BN, logp_B[:, None], t, axis=1)
        gen_mask_BN = jax.lax.dynamic_update_slice_in_dim(gen_mask_BN, live_B.astype(jnp.int32)[:, None], t,
                                                          axis=1)
        stopped_B = stopped_B | (live_B & is_stop(tok_B))
        return t + 1, constrain(cache), tokens_BN, logprobs_BN, gen_mask_BN, stopped_B

    state = (jnp.int32(1), cache, tokens_BN, logprobs_BN, gen_mask_BN, stopped_B)
    steps, _, tokens_BN, logprobs_BN, gen_mask_BN, stopped_B = jax.lax.while_loop(cond, body, state)
    return Samples(tokens=tokens_BN, logprobs=logprobs_BN, mask=gen_mask_BN, lengths=gen_mask_BN.sum(-1),
                   stopped=stopped_B, num_steps=steps)


def make_generate(model_def: ModelDef, mesh: Mesh, config: SamplingConfig, *,
                  rules: Mapping | None = None) -> Callable[..., Samples]:
    """A jitted `generate` with explicit in/out shardings on `mesh`.

    Returns `fn(params, prompt_ids_BP, prompt_mask_BP, key) -> Samples`, where `params` is a
    `{dotted name: array}` dict or a sequence of dicts whose union names every variable.
    Parameters are expected sharded as `sharding.create_sharded` makes them (others are moved
    there first: a no-op when already in place); prompts are sharded over the batch axes, so
    B must be a multiple of their size. `fn.jitted` is the underlying `jax.jit` function
    (taking one merged params dict), e.g. for `.lower(...)`.
    """
    names = model_def.names
    p_shardings = sharding_lib.param_shardings(model_def, mesh, rules)
    batch_2d = sharding_lib.batch_sharding(mesh, 2, rules)
    batch_1d = sharding_lib.batch_sharding(mesh, 1, rules)
    replicated = NamedSharding(mesh, P())
    out_shardings = Samples(tokens=batch_2d, logprobs=batch_2d, mask=batch_2d, lengths=batch_1d,
                            stopped=batch_1d, num_steps=replicated)
    batch_axes = batch_2d.spec[0]
    batch_shards = sharding_lib.batch_shards(mesh, rules)

    def pure(params, prompt_ids_BP, prompt_mask_BP, key):
        return generate(model_def, params, prompt_ids_BP, prompt_mask_BP, key, config=config, mesh=mesh,
                        rules=rules)

    jitted = jax.jit(pure, in_shardings=(p_shardings, batch_2d, batch_2d, replicated),
                     out_shardings=out_shardings)

    def fn(params: Params | Sequence[Params], prompt_ids_BP, prompt_mask_BP, key) -> Samples:
        merged = _merge_params(params)
        missing = sorted(set(names) - set(merged))
        extra = sorted(set(merged) - set(names))
        if missing or extra:
            raise ValueError(f"generate: params do not match the model: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}")
        merged = {name: merged[name] for name in names}
        if np.ndim(prompt_ids_BP) != 2 or np.shape(prompt_ids_BP) != np.shape(prompt_mask_BP):
            raise ValueError(f"generate: prompt_ids {np.shape(prompt_ids_BP)} and prompt_mask "
                             f"{np.shape(prompt_mask_BP)} must both be [batch, prompt_len]")
        b = np.shape(prompt_ids_BP)[0]
        if b % batch_shards:
            raise ValueError(f"generate: batch size {b} is not divisible by the {batch_shards} shards of the "
                             f"batch axes {batch_axes} of the mesh")
        if isinstance(prompt_mask_BP, np.ndarray):  # cheap check on host inputs only (no device sync)
            empty = np.flatnonzero(prompt_mask_BP.sum(-1) == 0)
            if empty.size:
                raise ValueError(f"generate: prompt rows {empty[:5].tolist()} have no real token (all padding)")
        # device_put is a no-op for arrays already laid out as required, and moves the others
        # (host arrays, a model sharded for training on another layout).
        merged = jax.device_put(merged, p_shardings)
        return jitted(merged, prompt_ids_BP, prompt_mask_BP, key)

    fn.jitted = jitted
    return fn
