"""The performance options change numbers only within tolerance: logits only where a loss
reads them (chunked), packed SFT rows, `jax.nn.dot_product_attention`, rematerialisation and
bfloat16 compute, each against the plain path on the same weights and data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import data as data_lib
from rlhf_jax import dpo, reward_model, sft
from rlhf_jax.data import batching
from rlhf_jax.models import Transformer
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models import transformer
from rlhf_jax.models.transformer import segment_positions

CFG = ModelConfig(model_type="llama", vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=64)
GPT2 = ModelConfig(model_type="gpt2", vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4,
                   head_dim=8, mlp_dim=64, position="learned", norm="layernorm", activation="gelu_tanh",
                   gated_mlp=False, qkv_bias=True, out_bias=True, mlp_bias=True)


def _model(cfg=CFG):
    return Transformer(cfg, rngs=nnx.Rngs(0))


def _grads(model, loss):
    """{name: gradient} of loss(model) over the model's parameters (one compiled program)."""
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    g = jax.jit(jax.grad(lambda p: loss(nnx.merge(graph, p, rest))))(params)
    return {".".join(map(str, k)): v for k, v in nnx.to_flat_state(g)}


def _close(a: dict, b: dict, atol):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), atol=atol, err_msg=k)


@pytest.fixture(scope="module")
def sft_data():
    rows = [{"instruction": f"question {i} " + "x" * (i * 7 % 40), "output": "answer " + "y" * (i * 11 % 50)}
            for i in range(24)]
    return data_lib.sft_dataset(rows, "byte", format="alpaca", max_length=200)


# ---------------------------------------------------------------- logits only where read
def test_hit_is_target_at_the_maximum_ties_included():
    logits_CV = jnp.array([[1.0, 3.0, 2.0], [3.0, 3.0, 0.0], [0.0, 1.0, 1.0]])
    tl_C = logits_CV[jnp.arange(3), jnp.array([1, 1, 0])]
    np.testing.assert_array_equal(sft._is_top(tl_C, logits_CV.max(-1)), [1.0, 1.0, 0.0])


@pytest.mark.parametrize("chunk,vocab", [(7, 0), (10_000, 0), (7, 64), (10_000, 100), (5, 299)])
def test_selected_token_logprobs_equal_full_logits(chunk, vocab):
    """Whole-row logits per chunk (vocab 0) or the vocabulary in slices of 64 (4 + a part),
    100 (3) or 299 columns (1 + a part of 1) of 300."""
    model = _model()
    rng = np.random.default_rng(0)
    h_BTD = jnp.asarray(rng.normal(size=(3, 11, 32)), jnp.float32)
    top_BT = jnp.argmax(model.logits(h_BTD), -1)  # half the targets are the argmax: hits to count
    targets_BT = jnp.where(rng.random((3, 11)) < 0.5, top_BT, jnp.asarray(rng.integers(0, 300, (3, 11)))).astype(jnp.int32)
    weight_BT = jnp.asarray(rng.random((3, 11)) < 0.4, jnp.float32)

    def full(m, h):
        logits = m.logits(h)
        return sft.token_logprobs(logits, targets_BT) * weight_BT, (jnp.argmax(logits, -1) == targets_BT) * weight_BT

    def chunked(m, h):
        return sft.selected_token_logprobs(m, h, targets_BT, weight_BT, chunk_size=chunk, vocab_chunk_size=vocab)[:2]

    (lp_full, hit_full), (lp, hit) = full(model, h_BTD), chunked(model, h_BTD)
    np.testing.assert_allclose(lp, lp_full, atol=2e-5)
    np.testing.assert_array_equal(hit, hit_full)
    logp_BTV = jax.nn.log_softmax(model.logits(h_BTD) / 0.7, -1)
    entropy = sft.selected_token_logprobs(model, h_BTD, targets_BT, weight_BT, temperature=0.7, chunk_size=chunk,
                                          vocab_chunk_size=vocab).entropy
    np.testing.assert_allclose(entropy, -(jnp.exp(logp_BTV) * logp_BTV).sum(-1) * weight_BT, atol=2e-5)
    assert 0 < float(hit.sum()) < float(weight_BT.sum()) and float((lp != 0).sum()) == float(weight_BT.sum())
    g_full = jax.grad(lambda h: (full(model, h)[0] * jnp.arange(11.0)).sum())(h_BTD)
    g = jax.grad(lambda h: (chunked(model, h)[0] * jnp.arange(11.0)).sum())(h_BTD)
    np.testing.assert_allclose(g, g_full, atol=2e-5)
    _close(_grads(model, lambda m: (chunked(m, h_BTD)[0]).sum()),
           _grads(model, lambda m: (full(m, h_BTD)[0]).sum()), atol=2e-5)


@pytest.mark.parametrize("vocab", [0, 64])
def test_chunked_logits_keep_one_copy_of_the_lm_head_for_the_backward_pass(vocab):
    """What the forward pass saves for the backward pass holds the [D, V] head once, not once
    per chunk (a cond around the rematerialised chunk made it a [chunks, D, V] scan output)."""
    from jax._src.ad_checkpoint import saved_residuals

    model = _model(CFG.replace(tie_embeddings=False))
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    h_BTD = jnp.ones((2, 64, 32))
    weight_BT = jnp.ones((2, 64)).at[1, 40:].set(0.0)  # the last chunks are skipped

    def loss(p, h):
        return sft.selected_token_logprobs(nnx.merge(graph, p, rest), h, jnp.zeros((2, 64), jnp.int32), weight_BT,
                                           chunk_size=16, vocab_chunk_size=vocab).logp.sum()

    big = [r.shape for r, _ in saved_residuals(loss, params, h_BTD) if r.size >= 32 * 300]
    assert big == [(32, 300)], big


def test_chunked_logits_read_an_adapted_lm_head(mesh):
    """A LoRA adapter on an untied LM head is part of the matrix the chunked logits use."""
    from rlhf_jax.models import lora

    model = lora.attach(_model(CFG.replace(tie_embeddings=False)), lora.LoraConfig(rank=2, alpha=4.0,
                                                                                   targets="lm_head"), mesh=mesh)
    model.lm_head.lora.b.value = jax.random.normal(jax.random.key(1), model.lm_head.lora.b.value.shape)
    h_BTD = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 32)), jnp.float32)
    targets_BT, weight_BT = jnp.asarray([[1, 2, 3, 4]]), jnp.ones((1, 4))
    expected = sft.token_logprobs(model.lm_head(h_BTD), targets_BT)
    np.testing.assert_allclose(sft.selected_token_logprobs(model, h_BTD, targets_BT, weight_BT).logp, expected,
                               atol=2e-5)
    assert float(jnp.abs(expected - sft.token_logprobs(jnp.dot(h_BTD, model.lm_head.kernel[...]), targets_BT)).max()) > 0.1


def test_sft_loss_matches_full_logits_reference(sft_data):
    """sft_loss (chunked) against the same loss written with the full [B, T, V] logits."""
    model = _model()
    batch = {k: jnp.asarray(v) for k, v in batching.sft_batch(sft_data, list(range(6))).items()}

    def reference(m):
        logits = m(batch["input_ids"], batch["attention_mask"])
        w = batch["loss_mask"][:, 1:]
        return -(sft.token_logprobs(logits[:, :-1], batch["input_ids"][:, 1:]) * w).sum(), w.sum()

    nll, n, stats = sft.sft_loss(model, batch)
    ref_nll, ref_n = reference(model)
    np.testing.assert_allclose(nll, ref_nll, rtol=1e-5)
    assert float(n) == float(ref_n)
    _close(_grads(model, lambda m: sft.sft_loss(m, batch)[0]), _grads(model, lambda m: reference(m)[0]), atol=1e-4)


# ---------------------------------------------------------------- packing
def test_pack_rows_first_fit():
    lengths = [5, 3, 4, 2, 6, 1]
    rows = batching.pack_rows(lengths, [0, 1, 2, 3, 4, 5], row_length=8)
    assert rows == [[0, 1], [2, 3, 5], [4]]
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert all(sum(lengths[i] for i in r) <= 8 for r in rows)
    assert batching.pack_rows(lengths, [0, 1, 2, 3, 4, 5], row_length=8, window=1) == [[0, 1], [2, 3], [4, 5]]


def test_segment_positions_restart_per_sequence():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0, 0], [1, 2, 2, 2, 3, 3, 3]])
    np.testing.assert_array_equal(segment_positions(seg), [[0, 1, 2, 0, 1, 0, 1], [0, 0, 1, 2, 0, 1, 2]])


@pytest.mark.parametrize("cfg", [CFG, GPT2], ids=["llama", "gpt2"])
def test_packed_rows_give_each_sequence_its_own_hidden_states(cfg):
    model = _model(cfg)
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 300, 5), rng.integers(0, 300, 7)
    row = jnp.asarray(np.concatenate([a, b, [0, 0, 0]])[None], jnp.int32)
    seg = jnp.asarray([[1] * 5 + [2] * 7 + [0] * 3], jnp.int32)
    h, _ = model.hidden(row, segment_ids_BT=seg)
    np.testing.assert_allclose(h[0, :5], model.hidden(jnp.asarray(a[None]))[0][0], atol=1e-5)
    np.testing.assert_allclose(h[0, 5:12], model.hidden(jnp.asarray(b[None]))[0][0], atol=1e-5)


@pytest.mark.parametrize("cfg,option", [(CFG, {}), (GPT2, {}), (CFG.replace(sliding_window=3), {}),
                                        (CFG, dict(attention="dot_product", remat=True))],
                         ids=["llama", "gpt2", "window", "dot_product-remat"])
def test_hidden_at_and_on_a_span_equal_the_full_pass_there(cfg, option):
    """The last layer run only at the read tokens (`hidden_at`) or on a span of every row
    (`hidden_span`, the later tokens dropped) gives the full pass's hidden states there, in
    left-padded rows and in packed rows (one read per sequence), and the same gradients."""
    model = _model(cfg.replace(**option))
    ids, mask = _left_padded_batch()
    rows, cols = jnp.asarray([0, 1, 2, 1]), jnp.asarray([9, 9, 9, 4])
    full = model.hidden(ids, mask)[0]
    np.testing.assert_allclose(model.hidden_at(ids, mask, rows, cols), full[rows, cols], atol=1e-5)
    real = mask[:, 4:9, None] > 0  # (a padding token attends to nothing: its state is arbitrary)
    np.testing.assert_allclose(jnp.where(real, model.hidden_span(ids, mask, 4, 9), 0), jnp.where(real, full[:, 4:9], 0),
                               atol=1e-5)
    _close(_grads(model, lambda m: (jnp.where(real, m.hidden_span(ids, mask, 4, 9), 0) ** 2).sum()),
           _grads(model, lambda m: (jnp.where(real, m.hidden(ids, mask)[0][:, 4:9], 0) ** 2).sum()), atol=1e-4)
    seg = jnp.asarray([[1] * 4 + [2] * 6, [1] * 10, [1, 1, 2, 2, 2, 3, 3, 3, 0, 0]], jnp.int32)
    rows, cols = jnp.asarray([0, 0, 1, 2, 2, 2]), jnp.asarray([3, 9, 9, 1, 4, 7])
    full = model.hidden(ids, segment_ids_BT=seg)[0]
    np.testing.assert_allclose(model.hidden_at(ids, None, rows, cols, segment_ids_BT=seg), full[rows, cols],
                               atol=1e-5)
    np.testing.assert_allclose(model.hidden_span(ids, None, 2, 10, segment_ids_BT=seg), full[:, 2:], atol=1e-5)
    _close(_grads(model, lambda m: (m.hidden_at(ids, None, rows, cols, segment_ids_BT=seg) ** 2).sum()),
           _grads(model, lambda m: (m.hidden(ids, segment_ids_BT=seg)[0][rows, cols] ** 2).sum()), atol=1e-4)


@pytest.mark.parametrize("cfg", [GPT2, CFG.replace(sliding_window=3)], ids=["gpt2", "llama-window"])
def test_causal_query_blocks_equal_whole_rows(cfg, monkeypatch):
    """Queries taken in causal blocks (here from 4 queries on: blocks of 3, 3, 3 and 1 over a
    10-token row, of 2 over an 8-token span) give every real token the whole-row attention's
    hidden state and the same gradients, in left-padded and packed rows and on a span."""
    model = _model(cfg)
    ids, mask = _left_padded_batch()
    seg = jnp.asarray([[1] * 4 + [2] * 6, [1] * 10, [1, 1, 2, 2, 2, 3, 3, 3, 0, 0]], jnp.int32)
    real, packed = mask[..., None] > 0, seg[..., None] > 0  # (a padding query attends to nothing)

    graph, params, rest = nnx.split(model, nnx.Param, ...)

    def states(p):
        m = nnx.merge(graph, p, rest)
        return (jnp.where(real, m.hidden(ids, mask)[0], 0), jnp.where(packed, m.hidden(ids, segment_ids_BT=seg)[0], 0),
                jnp.where(real[:, 2:], m.hidden_span(ids, mask, 2, 10), 0))

    def loss(p):
        whole, _, span = states(p)
        m = nnx.merge(graph, p, rest)
        packed_span = jnp.where(packed[:, 2:], m.hidden_span(ids, None, 2, 10, segment_ids_BT=seg), 0)
        return (whole ** 2).sum() + (span ** 2).sum() + (packed_span ** 2).sum()

    def run():  # one program (traced afresh for each setting of the threshold)
        out, grads = jax.jit(lambda p: (states(p), jax.grad(loss)(p)))(params)
        return (*out, {".".join(map(str, k)): v for k, v in nnx.to_flat_state(grads)})

    monkeypatch.setattr(transformer, "_MIN_BLOCKED_QUERIES", 10 ** 6)
    whole = run()
    monkeypatch.setattr(transformer, "_MIN_BLOCKED_QUERIES", 4)
    blocked = run()
    for a, b in zip(blocked[:3], whole[:3]):
        np.testing.assert_allclose(a, b, atol=1e-5)
    _close(blocked[3], whole[3], atol=3e-4)  # gradients up to ~2.6: float32 rounding, sums in another order


def test_packed_sft_loss_equals_padded_loss(sft_data):
    """The same examples, packed or one per padded row: the same loss sum, token count and gradient."""
    model = _model()
    order = list(range(12))
    rows = batching.pack_rows([len(e.input_ids) for e in sft_data.examples], order, sft_data.seq_len)
    assert len(rows) < 12  # the test packs something
    packed = {k: jnp.asarray(v) for k, v in batching.packed_sft_batch(sft_data, rows + [[]]).items()}
    padded = {k: jnp.asarray(v) for k, v in batching.sft_batch(sft_data, order).items()}
    (p_nll, p_n, p_stats), (nll, n, stats) = sft.sft_loss(model, packed), sft.sft_loss(model, padded)
    assert float(p_n) == float(n)
    np.testing.assert_allclose(p_nll, nll, rtol=1e-5)
    np.testing.assert_allclose(p_stats["token_accuracy"][0], stats["token_accuracy"][0])
    _close(_grads(model, lambda m: sft.sft_loss(m, packed)[0]), _grads(model, lambda m: sft.sft_loss(m, padded)[0]),
           atol=1e-4)


def test_packed_batches_cover_the_epoch_and_resume(sft_data):
    kw = dict(batch_size=2, seed=3, pack=True)
    n = batching.num_batches(sft_data, **kw)
    epoch = list(batching.batches(sft_data, num_epochs=1, **kw))
    assert len(epoch) == n and n < len(sft_data) // 2
    examples_per_batch = [int(b["segment_ids"].max(1).sum()) for b in epoch]
    assert sum(examples_per_batch) > 2 * len(epoch)  # more examples than rows
    assert sum(examples_per_batch) <= len(sft_data)  # the last partial batch is dropped
    resumed = list(batching.batches(sft_data, num_epochs=1, start_step=2, **kw))
    for a, b in zip(epoch[2:], resumed):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    halves = [next(batching.batches(sft_data, process_index=i, process_count=2, **kw)) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["segment_ids"] for h in halves]), epoch[0]["segment_ids"])
    with pytest.raises(ValueError, match="packing is for SFT and preference data"):
        batching.batches(data_lib.prompt_dataset([{"prompt": "hi"}], "byte"), batch_size=1, pack=True)


# ---------------------------------------------------------------- compute options
def _left_padded_batch():
    rng = np.random.default_rng(2)
    ids = jnp.asarray(rng.integers(0, 300, (3, 10)), jnp.int32)
    mask = jnp.asarray([[0, 0, 0] + [1] * 7, [1] * 10, [0] * 6 + [1] * 4], jnp.int32)
    return ids, mask


@pytest.mark.parametrize("cfg,option", [(CFG, dict(attention="dot_product")), (GPT2, dict(remat=True)),
                                        (CFG.replace(sliding_window=3), dict(attention="dot_product", remat=True))],
                         ids=["llama-dot_product", "gpt2-remat", "window-both"])
def test_compute_options_change_numbers_within_tolerance(cfg, option):
    ids, mask = _left_padded_batch()
    base, other = _model(cfg), _model(cfg.replace(**option))

    def loss(m):
        return ((m(ids, mask) * mask[..., None]) ** 2).mean()

    np.testing.assert_allclose(other(ids, mask) * mask[..., None], base(ids, mask) * mask[..., None], atol=1e-5)
    g_other = _grads(other, loss)
    assert all(np.isfinite(np.asarray(v)).all() for v in g_other.values())
    _close(g_other, _grads(base, loss), atol=1e-5)
    seg = jnp.asarray([[1] * 4 + [2] * 6, [1] * 10, [1, 1, 2, 2, 2, 3, 3, 3, 0, 0]], jnp.int32)
    np.testing.assert_allclose(other.hidden(ids, segment_ids_BT=seg)[0], base.hidden(ids, segment_ids_BT=seg)[0],
                               atol=1e-5)


def test_bfloat16_compute_with_float32_weights_stays_close():
    ids, mask = _left_padded_batch()
    base, bf16 = _model(), _model(CFG.replace(dtype="bfloat16"))
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    lp32 = jax.nn.log_softmax(base(ids, mask))
    lp16 = jax.nn.log_softmax(bf16(ids, mask))
    assert lp16.dtype == jnp.float32
    real = mask[..., None] > 0
    assert float(jnp.abs(jnp.where(real, lp16 - lp32, 0)).max()) < 0.05


@pytest.mark.parametrize("din,dout", [(6, 20), (20, 6)], ids=["narrow-input", "narrow-output"])
@pytest.mark.parametrize("dtype,out", [(jnp.float32, None), (jnp.bfloat16, jnp.float32)], ids=["f32", "bf16-f32"])
def test_dense_backward_on_cpu_equals_the_compilers(din, dout, dtype, out):
    """`dense`'s written-out CPU backward (the weight gradient from an explicit transpose of
    the narrower operand) gives XLA's own gradients of jnp.dot, in value and dtype."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 5, din)), dtype)
    w = jnp.asarray(rng.normal(size=(din, dout)), dtype)
    dy = jnp.asarray(rng.normal(size=(2, 5, dout)), out or dtype)
    y_ref, vjp_ref = jax.vjp(lambda a, b: jnp.dot(a, b, preferred_element_type=out), x, w)
    y, vjp = jax.jit(lambda a, b, c: (lambda r: (r[0], r[1](c)))(jax.vjp(
        lambda a, b: transformer._dense_cpu(a, b, out), a, b)))(x, w, dy)
    assert y.dtype == y_ref.dtype
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32), rtol=1e-6)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for g, g_ref in zip(vjp, vjp_ref(dy)):
        assert g.dtype == g_ref.dtype and g.shape == g_ref.shape
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32), rtol=tol, atol=tol)


def test_model_gradients_do_not_depend_on_the_dense_backward(monkeypatch):
    """The whole model's gradients (attention, MLP, LM head through the chunked logits) with
    the CPU backward equal those with the compiler's."""
    ids, mask = _left_padded_batch()
    model = _model(GPT2)

    def loss(m):
        h, _ = m.hidden(ids, mask)
        return sft.selected_token_logprobs(m, h[:, :-1], ids[:, 1:], mask[:, 1:].astype(jnp.float32),
                                           chunk_size=8).logp.sum()

    written = _grads(model, loss)
    monkeypatch.setattr(transformer, "_dense_cpu", lambda x, w, t: jnp.dot(x, w, preferred_element_type=t))
    _close(written, _grads(model, loss), atol=1e-5)


def test_unknown_attention_implementation_is_refused():
    from rlhf_jax.models.load import resolve

    with pytest.raises(ValueError, match="attention='flash'"):
        CFG.replace(attention="flash")
    with pytest.raises(ValueError, match=r"^model.attention='flash' is not one of \('einsum', 'dot_product'\)$"):
        resolve(dict(init="tiny", tiny={}, attention="flash"))


# ---------------------------------------------------------------- length buckets
def test_pad_to_multiple_of_trims_left_padding_without_changing_losses(sft_data):
    from pathlib import Path

    full = next(batching.batches(sft_data, batch_size=4, shuffle=False))
    short = next(batching.batches(sft_data, batch_size=4, shuffle=False, pad_to_multiple_of=32))
    longest = int(full["attention_mask"].sum(1).max())
    assert short["input_ids"].shape[1] == -(-longest // 32) * 32 < full["input_ids"].shape[1]
    model = _model()
    as_jnp = lambda b: {k: jnp.asarray(v) for k, v in b.items()}
    np.testing.assert_allclose(sft.sft_loss(model, as_jnp(short))[0], sft.sft_loss(model, as_jnp(full))[0], rtol=1e-5)

    prefs = data_lib.preference_dataset(Path(__file__).parent / "fixtures" / "pref_ranked.jsonl", "byte",
                                        max_length=64)
    kw = dict(max_responses=8, max_pairs=8, shuffle=False, pair_weighting="per_pair")
    p_full, p_short = (next(batching.batches(prefs, **kw, pad_to_multiple_of=m)) for m in (0, 8))
    assert p_short["input_ids"].shape[1] < 64 and p_short["input_ids"].shape[1] % 8 == 0
    rm = Transformer(CFG, rngs=nnx.Rngs(0), heads=("reward",))
    np.testing.assert_allclose(reward_model.rm_loss(rm, as_jnp(p_short))[0], reward_model.rm_loss(rm, as_jnp(p_full))[0],
                               rtol=1e-5)


@pytest.fixture(scope="module")
def pref_data():
    rng = np.random.default_rng(4)
    rows = [{"prompt": f"q{i} " + "p" * int(rng.integers(0, 30)),
             "ranked": [f" r{k} " + "z" * int(rng.integers(0, 40)) for k in range(2 + i % 3)]} for i in range(20)]
    return data_lib.preference_dataset(rows, "byte", max_length=64)


def test_packed_preference_batch_holds_each_response_once(pref_data):
    groups = [0, 1, 2, 3]
    padded = batching.preference_batch(pref_data, groups, 12, 12)
    packed = batching.packed_preference_batch(pref_data, groups, 12, 12)
    R = packed["input_ids"].shape[0]
    assert R < int((padded["attention_mask"].sum(1) > 0).sum())  # the test packs something
    for n in range(12):
        real = padded["attention_mask"][n] > 0
        if not real.any():
            assert packed["response_row"][n] == packed["response_end"][n] == -1
            continue
        r, end = packed["response_row"][n], packed["response_end"][n]
        seg = packed["segment_ids"][r]
        tokens = packed["input_ids"][r][seg == seg[end]]
        np.testing.assert_array_equal(tokens, padded["input_ids"][n][real])
        assert end == np.flatnonzero(seg == seg[end])[-1]
    for k in ("chosen_idx", "rejected_idx", "margin", "pair_mask"):
        np.testing.assert_array_equal(packed[k], padded[k])
    assert batching.packed_preference_batch(pref_data, groups, 12, 12, num_rows=R + 3)["input_ids"].shape[0] == R + 3
    with pytest.raises(ValueError, match="need"):
        batching.packed_preference_batch(pref_data, groups, 12, 12, num_rows=R - 1)


def test_packed_rm_loss_equals_padded_loss(pref_data):
    """The same pairs with their responses packed or one per row: the same loss, metrics and gradient."""
    rm = Transformer(GPT2, rngs=nnx.Rngs(0), heads=("reward",))
    as_jnp = lambda b: {k: jnp.asarray(v) for k, v in b.items()}
    kw = dict(max_responses=12, max_pairs=12, shuffle=False, pair_weighting="per_prompt")
    padded, packed = (as_jnp(next(batching.batches(pref_data, **kw, pack=p))) for p in (False, True))
    assert packed["input_ids"].shape[0] < 12
    (l_p, w_p, s_p), (l, w, s) = reward_model.rm_loss(rm, packed), reward_model.rm_loss(rm, padded)
    np.testing.assert_allclose(l_p, l, rtol=1e-5)
    assert float(w_p) == float(w)
    for k in s:
        np.testing.assert_allclose(s_p[k][0], s[k][0], rtol=1e-5, atol=1e-6, err_msg=k)
    _close(_grads(rm, lambda m: reward_model.rm_loss(m, packed)[0]),
           _grads(rm, lambda m: reward_model.rm_loss(m, padded)[0]), atol=1e-5)
    np.testing.assert_array_equal(reward_model.responses_in(packed), reward_model.responses_in(padded))


def test_packed_preference_batches_round_rows_resume_and_split(pref_data):
    kw = dict(max_responses=8, max_pairs=8, seed=1, pack=True, row_multiple=2)
    epoch = list(batching.batches(pref_data, num_epochs=1, **kw))
    assert len(epoch) == batching.num_batches(pref_data, **kw)
    assert all(b["input_ids"].shape[0] % 2 == 0 for b in epoch)
    assert len({b["input_ids"].shape[0] for b in epoch}) > 1  # the row count follows the batch
    resumed = list(batching.batches(pref_data, num_epochs=1, start_step=2, **kw))
    for a, b in zip(epoch[2:], resumed):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    halves = [next(batching.batches(pref_data, process_index=i, process_count=2, **kw)) for i in range(2)]
    for k in ("input_ids", "segment_ids", "response_row", "response_end", "chosen_idx"):
        np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), epoch[0][k])
    stepped = list(batching.batches(pref_data, num_epochs=1, grad_accum=2, **kw))
    for a, b in zip(stepped[::2], stepped[1::2]):
        assert a["input_ids"].shape == b["input_ids"].shape  # a step's micro-batches stack
    dpo_epoch = list(batching.batches(pref_data, num_epochs=1, response_mask=True, **kw))
    for a, b in zip(epoch, dpo_epoch):  # the same layout, with DPO's two keys padded along
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        assert b["response_mask"].shape == b["response_idx"].shape == a["input_ids"].shape
        assert (b["response_idx"][a["segment_ids"] == 0] == -1).all()


def test_packed_dpo_batch_masks_each_response_like_the_padded_batch(pref_data):
    """Response n's tokens and its response tokens: the same in a packed row (where
    response_idx is n) as in its own left-padded row."""
    groups = [0, 1, 2, 3]
    padded = batching.preference_batch(pref_data, groups, 12, 12, response_mask=True)
    rows = batching.packed_preference_batch(pref_data, groups, 12, 12)["input_ids"].shape[0]
    packed = batching.packed_preference_batch(pref_data, groups, 12, 12, response_mask=True, num_rows=rows + 2)
    assert packed["input_ids"].shape[0] == rows + 2 and (packed["response_idx"][rows:] == -1).all()
    for n in range(12):
        real = padded["attention_mask"][n] > 0
        mine = packed["response_idx"] == n
        assert mine.sum() == real.sum()
        np.testing.assert_array_equal(packed["input_ids"][mine], padded["input_ids"][n][real])
        np.testing.assert_array_equal(packed["response_mask"][mine], padded["response_mask"][n][real])
    assert packed["response_mask"].sum() == padded["response_mask"].sum() > 0


def test_packed_dpo_loss_equals_padded_loss(pref_data):
    """DPO over the same pairs, responses packed or one per row: the same per-response
    log-probs, loss, metrics and gradient (the reference both in the state and precomputed)."""
    policy = _model()
    as_jnp = lambda b: {k: jnp.asarray(v) for k, v in b.items()}
    kw = dict(max_responses=12, max_pairs=12, shuffle=False, pair_weighting="per_prompt", response_mask=True)
    padded, packed = (as_jnp(next(batching.batches(pref_data, **kw, pack=p))) for p in (False, True))
    assert packed["input_ids"].shape[0] < 12
    logp = dpo.response_logprobs(policy, padded)
    np.testing.assert_allclose(dpo.response_logprobs(policy, packed), logp, rtol=1e-5)
    ref = jnp.asarray(np.random.default_rng(0).normal(size=12), jnp.float32) + logp  # a reference off the policy
    loss = lambda m, b: dpo.stage_loss(m, dict(b, ref_logps=ref), {}, beta=0.5, loss_type="sigmoid",
                                       label_smoothing=0.0)
    (l_p, w_p, s_p), (l, w, s) = loss(policy, packed), loss(policy, padded)
    np.testing.assert_allclose(l_p, l, rtol=1e-5)
    assert float(w_p) == float(w)
    for k in s:
        # Sums of ~-300 nats in another order: float32 rounding of ~1e-5 in their differences.
        np.testing.assert_allclose(s_p[k][0], s[k][0], rtol=1e-5, atol=1e-4, err_msg=k)
    _close(_grads(policy, lambda m: loss(m, packed)[0]), _grads(policy, lambda m: loss(m, padded)[0]),
           atol=1e-4)  # entries up to ~8: float32 rounding


@pytest.mark.parametrize("stage,data,match", [
    ("pretrain", dict(packing=True), "data.packing=True packs SFT examples and RM/DPO responses"),
    ("rm", dict(packing=True, packed_rows_multiple=0), "data.packed_rows_multiple=0"),
    ("sft", dict(packing=True, pad_to_multiple_of=64), "data.pad_to_multiple_of=64"),
    ("sft", dict(pad_to_multiple_of=-8), "data.pad_to_multiple_of=-8"),
])
def test_padding_options_are_checked_by_field(stage, data, match):
    import ml_collections

    from rlhf_jax.train import loop

    cfg = ml_collections.ConfigDict(dict(stage=stage, data=dict(dict(packing=False, pad_to_multiple_of=0), **data)))
    with pytest.raises(ValueError, match=match):
        loop._check_padding(cfg)
