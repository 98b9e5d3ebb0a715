"""The compiled sampler against plain references.

One tiny random Llama-shaped model per module. Its kernels are scaled up from the default
N(0, 0.02) init so that next-token distributions are neither uniform (which would make the
temperature / top-k / top-p tests powerless) nor one-hot, and greedy continuations depend on
the context (with the raw init every row repeats one token).

References are independent of the KV cache: full forward passes over prompt + generated
tokens, without a cache.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import sharding
from rlhf_jax.models import ModelConfig, Transformer
from rlhf_jax.models import ModelDef
from rlhf_jax.sampling import SamplingConfig, Samples, make_generate, rollout_key, sample_token, token_key

VOCAB = 32
CFG = ModelConfig(model_type="llama", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=64, tie_embeddings=False)
PAD = 0
# Tokens per row (the rest is left padding): a full row, two padded rows, a one-token prompt.
LENGTHS = [7, 3, 5, 1, 6, 2, 7, 4]


@pytest.fixture(scope="module")
def tiny():
    """(model_def, params dict, single-device mesh)."""
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    model = sharding.create_sharded(lambda: Transformer(CFG, rngs=nnx.Rngs(0)), mesh)
    model_def, params, rest = ModelDef.split(model)
    # Logit std ~1.6: a spread but peaked next-token distribution (see the module docstring).
    scale = {name: 15.0 if name == "lm_head.kernel" else 10.0 if name.endswith("kernel") else 1.0 for name in params}
    params = {name: np.asarray(x) * scale[name] for name, x in params.items()}
    params.update({name: np.asarray(x) for name, x in rest.items()})
    return model_def, params, mesh


@pytest.fixture(scope="module")
def gen(tiny):
    """gen(config, mesh=None) -> compiled sampler, memoised so tests share compilations."""
    model_def, _, single = tiny
    return functools.lru_cache(maxsize=None)(
        lambda config, mesh=None: make_generate(model_def, mesh or single, config))


@pytest.fixture(scope="module")
def forward(tiny):
    """Full forward pass without cache: (ids [B, T], mask [B, T]) -> float64 logits [B, T, V]."""
    model_def, params, _ = tiny
    model = model_def.merge(params)
    fwd = jax.jit(lambda ids, mask: model(ids, mask))
    return lambda ids, mask: np.asarray(fwd(ids, mask), np.float64)


def _prompts(lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    p = max(lengths)
    ids = np.full((len(lengths), p), PAD, np.int32)
    mask = np.zeros((len(lengths), p), np.int32)
    for b, n in enumerate(lengths):
        ids[b, p - n:] = rng.integers(1, VOCAB, size=n)
        mask[b, p - n:] = 1
    return ids, mask


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _greedy_reference(forward, ids, mask, n, stop_ids):
    """Argmax decoding by repeated full forward passes (no cache), then truncation at the
    first stop token. The buffer has a fixed width (future slots masked, and causal anyway) so
    the reference compiles once."""
    b, p = ids.shape
    buf = np.concatenate([ids, np.zeros((b, n), np.int32)], 1)
    buf_mask = np.concatenate([mask, np.zeros((b, n), np.int32)], 1)
    logps = np.zeros((b, n))
    for t in range(n):
        logits = forward(buf, buf_mask)[:, p + t - 1]
        tok = logits.argmax(-1)
        logps[:, t] = _log_softmax(logits)[np.arange(b), tok]
        buf[:, p + t], buf_mask[:, p + t] = tok, 1
    tokens = buf[:, p:].copy()
    gen_mask = np.ones((b, n), np.int32)
    for r in range(b):
        hits = np.flatnonzero(np.isin(tokens[r], stop_ids))
        if hits.size:
            gen_mask[r, hits[0] + 1:] = 0
    return np.where(gen_mask > 0, tokens, PAD), np.where(gen_mask > 0, logps, 0.0), gen_mask


def test_greedy_equals_full_forward_argmax(tiny, gen, forward):
    _, params, _ = tiny
    ids, mask = _prompts()
    n = 10
    free = gen(SamplingConfig(max_new_tokens=n, temperature=0.0, pad_token_id=PAD))(params, ids, mask,
                                                                                     jax.random.key(0))
    want_tokens, want_logps, _ = _greedy_reference(forward, ids, mask, n, [])
    np.testing.assert_array_equal(np.asarray(free.tokens), want_tokens)
    np.testing.assert_allclose(np.asarray(free.logprobs), want_logps, atol=1e-4)
    assert int(free.num_steps) == n and not np.asarray(free.stopped).any()
    np.testing.assert_array_equal(np.asarray(free.lengths), n)

    # A stop id that greedy really produces: first seen mid-way in some row, absent from
    # another row (so one row stops early and one runs to the limit).
    tokens = want_tokens
    stop = next(int(v) for v in range(1, VOCAB)
                if any(0 < np.argmax(row == v) < n - 2 and (row == v).any() for row in tokens)
                and any(not (row == v).any() for row in tokens))
    never = next(v for v in range(1, VOCAB) if not (tokens == v).any())  # exercises a stop *set*
    stop_ids = (stop, never)
    out = gen(SamplingConfig(max_new_tokens=n, temperature=0.0, stop_token_ids=stop_ids, pad_token_id=PAD))(
        params, ids, mask, jax.random.key(0))
    want_tokens, want_logps, want_mask = _greedy_reference(forward, ids, mask, n, stop_ids)
    np.testing.assert_array_equal(np.asarray(out.tokens), want_tokens)
    np.testing.assert_array_equal(np.asarray(out.mask), want_mask)
    np.testing.assert_allclose(np.asarray(out.logprobs), want_logps, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(out.lengths), want_mask.sum(-1))
    stopped = np.asarray(out.stopped)
    np.testing.assert_array_equal(stopped, np.isin(tokens, stop_ids).any(-1))
    assert stopped.any() and not stopped.all()
    assert (want_mask.sum(-1) < n).any()  # some row really was cut early
    # The stop token itself is part of the response.
    for r in np.flatnonzero(stopped):
        assert want_tokens[r, want_mask[r].sum() - 1] == stop


def test_logprobs_are_untruncated_tempered_log_softmax(tiny, gen, forward):
    """Sampling with top-k and top-p, the returned log-probs are still log softmax(logits / T)
    over the whole vocabulary: what PPO recomputes from the policy's logits."""
    _, params, _ = tiny
    ids, mask = _prompts(seed=1)
    temperature, n = 0.7, 8
    config = SamplingConfig(max_new_tokens=n, temperature=temperature, top_k=6, top_p=0.95,
                            stop_token_ids=(3,), pad_token_id=PAD)
    out = gen(config)(params, ids, mask, jax.random.key(3))
    tokens, logps, gen_mask = (np.asarray(x) for x in (out.tokens, out.logprobs, out.mask))
    p = ids.shape[1]
    logits = forward(np.concatenate([ids, tokens], 1), np.concatenate([mask, gen_mask], 1))
    want = np.take_along_axis(_log_softmax(logits[:, p - 1:p + n - 1] / temperature), tokens[..., None], -1)[..., 0]
    real = gen_mask > 0
    np.testing.assert_allclose(logps[real], want[real], atol=1e-4)
    assert (logps[~real] == 0).all() and (tokens[~real] == PAD).all()
    # The mask is a prefix; and the truncation really removed mass (else the test is vacuous).
    assert (np.diff(gen_mask, axis=1) <= 0).all()
    assert np.exp(want[real]).min() < 0.99


def test_token_t_is_sample_token_with_token_key_t(tiny, gen, forward):
    """`generate` draws every step's uniforms before its loop; token t is still what
    `sample_token(logits, token_key(key, t))` draws (the chat engine draws its tokens so)."""
    _, params, _ = tiny
    ids, mask = _prompts(seed=4)
    n, key = 6, jax.random.key(11)
    config = SamplingConfig(max_new_tokens=n, temperature=1.2, top_k=10, pad_token_id=PAD)
    out = gen(config)(params, ids, mask, key)
    tokens = np.asarray(out.tokens)
    p = ids.shape[1]
    logits = forward(np.concatenate([ids, tokens], 1), np.concatenate([mask, np.ones_like(tokens)], 1))
    for t in range(n):
        want, _ = sample_token(jnp.asarray(logits[:, p + t - 1], jnp.float32), token_key(key, t), config)
        np.testing.assert_array_equal(tokens[:, t], np.asarray(want))


N_ROWS = 4096  # one compiled call; the per-token standard error is <= 0.5 / sqrt(4096) ~ 0.008


@pytest.fixture(scope="module")
def first_token(tiny, forward):
    """A prompt repeated N_ROWS times, and its next-token logits (float64) [V]."""
    ids, mask = _prompts([5], seed=2)
    logits = forward(ids, mask)[0, -1]
    return np.repeat(ids, N_ROWS, 0), np.repeat(mask, N_ROWS, 0), logits


def _frequencies(gen, params, first_token, config, seed):
    ids, mask, _ = first_token
    out = gen(config)(params, ids, mask, jax.random.key(seed))
    tokens = np.asarray(out.tokens)[:, 0]
    return np.bincount(tokens, minlength=VOCAB) / len(tokens)


def _within_5_sigma(freq, probs):
    """Every token's frequency within 5 binomial standard errors (+ one count) of its
    probability. Per token the false-alarm rate is ~6e-7, so ~2e-5 over the vocabulary; a
    temperature error moves the large probabilities by far more (checked below)."""
    sigma = np.sqrt(probs * (1 - probs) / N_ROWS)
    return np.abs(freq - probs) <= 5 * sigma + 1 / N_ROWS


def _softmax(x):
    return np.exp(_log_softmax(x))


@pytest.mark.parametrize("temperature", [0.7, 1.5])
def test_first_token_frequencies_match_tempered_softmax(tiny, gen, first_token, temperature):
    _, params, _ = tiny
    logits = first_token[2]
    freq = _frequencies(gen, params, first_token, SamplingConfig(max_new_tokens=1, temperature=temperature), 0)
    probs = _softmax(logits / temperature)
    assert _within_5_sigma(freq, probs).all(), np.abs(freq - probs).max()
    # Power: the same frequencies are rejected against the untempered distribution.
    assert not _within_5_sigma(freq, _softmax(logits)).all()


def test_top_k_never_samples_outside_top_k(tiny, gen, first_token):
    _, params, _ = tiny
    logits, k, temperature = first_token[2], 3, 1.5
    freq = _frequencies(gen, params, first_token, SamplingConfig(max_new_tokens=1, temperature=temperature, top_k=k),
                        1)
    top = np.argsort(-logits)[:k]
    assert set(np.flatnonzero(freq)) == set(top.tolist())
    probs = np.zeros(VOCAB)
    probs[top] = _softmax(logits[top] / temperature)
    assert _within_5_sigma(freq, probs).all()


def test_top_p_never_samples_outside_nucleus(tiny, gen, first_token):
    _, params, _ = tiny
    logits, top_p, temperature = first_token[2], 0.6, 1.5
    freq = _frequencies(gen, params, first_token,
                        SamplingConfig(max_new_tokens=1, temperature=temperature, top_p=top_p), 2)
    probs = _softmax(logits / temperature)
    order = np.argsort(-probs)
    before = np.cumsum(probs[order]) - probs[order]
    nucleus = order[before < top_p]
    # The float32 sampler and this float64 reference agree on the nucleus only if no
    # boundary is within rounding of top_p.
    assert np.abs(np.cumsum(probs[order]) - top_p).min() > 1e-3
    assert 1 < len(nucleus) < VOCAB // 2
    assert set(np.flatnonzero(freq)) <= set(nucleus.tolist())
    want = np.zeros(VOCAB)
    want[nucleus] = probs[nucleus] / probs[nucleus].sum()
    assert _within_5_sigma(freq, want).all()


SHARDED_CONFIG = SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=10, stop_token_ids=(5,), pad_token_id=PAD)


@pytest.mark.parametrize("shape", [dict(data=8), dict(data=1, fsdp=4, tensor=2)])
def test_sharded_sampling_equals_single_device(tiny, gen, shape):
    assert len(jax.devices()) == 8, "tests/conftest.py should have set 8 fake CPU devices"
    _, params, _ = tiny
    ids, mask = _prompts()
    key = jax.random.key(7)
    want = gen(SHARDED_CONFIG)(params, ids, mask, key)
    mesh = sharding.make_mesh(**shape)
    got = gen(SHARDED_CONFIG, mesh)(params, ids, mask, key)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_array_equal(np.asarray(got.mask), np.asarray(want.mask))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), atol=1e-5)
    assert int(got.num_steps) == int(want.num_steps)
    assert got.tokens.sharding.is_equivalent_to(sharding.batch_sharding(mesh), 2)
    assert len(got.tokens.sharding.device_set) == 8


def test_same_key_same_samples_different_key_different(tiny, gen):
    _, params, _ = tiny
    ids, mask = _prompts()
    fn = gen(SHARDED_CONFIG)
    a, b = fn(params, ids, mask, jax.random.key(1)), fn(params, ids, mask, jax.random.key(1))
    c = fn(params, ids, mask, rollout_key(jax.random.key(1), 1))
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(np.asarray(a.logprobs), np.asarray(b.logprobs))
    assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()
    # Params split in several dicts (trainable + frozen) are accepted as well.
    names = sorted(params)
    d = fn((({k: params[k] for k in names[:5]}), {k: params[k] for k in names[5:]}), ids, mask, jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(d.tokens), np.asarray(a.tokens))


def test_loop_exits_once_every_row_stopped(tiny, gen):
    _, params, _ = tiny
    ids, mask = _prompts()
    n = 12
    out = gen(SamplingConfig(max_new_tokens=n, temperature=1.0, stop_token_ids=tuple(range(VOCAB)), pad_token_id=PAD))(
        params, ids, mask, jax.random.key(0))
    assert isinstance(out, Samples)
    assert int(out.num_steps) == 1  # every row stops on its first token: no decode step runs
    assert np.asarray(out.stopped).all()
    np.testing.assert_array_equal(np.asarray(out.lengths), 1)
    mask_out = np.asarray(out.mask)
    assert (mask_out[:, 0] == 1).all() and (mask_out[:, 1:] == 0).all()
    assert (np.asarray(out.tokens)[:, 1:] == PAD).all() and (np.asarray(out.logprobs)[:, 1:] == 0).all()


def test_config_validation_and_errors(tiny, gen):
    config = SamplingConfig(stop_token_ids=[2, 3])
    assert config.stop_token_ids == (2, 3) and hash(config) == hash(SamplingConfig(stop_token_ids=(2, 3)))
    for bad in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingConfig(**bad)
    _, params, _ = tiny
    ids, mask = _prompts()
    fn = gen(SHARDED_CONFIG)
    with pytest.raises(ValueError, match="missing"):
        fn({k: v for k, v in params.items() if k != "embed"}, ids, mask, jax.random.key(0))
    empty = mask.copy()
    empty[2] = 0
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        fn(params, ids, empty, jax.random.key(0))
    with pytest.raises(ValueError, match="divisible"):
        gen(SHARDED_CONFIG, sharding.make_mesh(data=8))(params, ids[:4], mask[:4], jax.random.key(0))


def test_a_response_text_leaves_out_its_stop_token_and_the_rm_reads_an_extra_stop_as_eos():
    from rlhf_jax.data import load_tokenizer
    from rlhf_jax.sampling import response_text, rm_input_ids

    tok = load_tokenizer("byte")
    nl, eos, pad = 10, tok.eos_token_id, tok.pad_token_id
    h, i = tok.encode("hi", add_special_tokens=False)
    assert response_text(tok, [h, i, nl, pad], 3, True) == "hi"  # stopped by a newline
    assert response_text(tok, [h, i, eos, pad], 3, True) == "hi"  # by EOS
    assert response_text(tok, [h, i, nl], 3, False) == "hi\n"  # ran to max_new_tokens: all of it is text
    ids = jax.numpy.asarray([[nl, h, i, nl, pad], [h, nl, i, i, eos]], np.int32)
    out = np.asarray(rm_input_ids(ids, 2, (nl,), eos))
    np.testing.assert_array_equal(out, [[nl, h, i, eos, pad], [h, nl, i, i, eos]])  # the prompt's newlines stay
    assert rm_input_ids(ids, 2, (), eos) is ids
