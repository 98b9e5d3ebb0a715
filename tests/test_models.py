"""The Flax decoder is the same network as the transformers (PyTorch) reference.

Random tiny models of each supported family are built with transformers, saved, loaded with
`load_pretrained`, and compared on a left-padded batch; `save_pretrained` goes back the other
way; KV-cache decoding matches the full forward pass.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rlhf_jax import reward_model, sharding  # noqa: E402
from rlhf_jax.models import KVCache, load_pretrained, save_pretrained  # noqa: E402

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)

CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                            initializer_range=0.1, **COMMON),
    "gpt2_untied": lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                   initializer_range=0.1, tie_word_embeddings=False, **COMMON),
    # Grouped-query attention, untied embeddings, a non-default RoPE base.
    "llama_gqa": lambda: transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                  num_key_value_heads=2, intermediate_size=64, rope_theta=500.0,
                                                  initializer_range=0.1, tie_word_embeddings=False, **COMMON),
    # SmolLM2-shaped: tied embeddings, 3 query heads per kv head.
    "llama_tied": lambda: transformers.LlamaConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                                                   num_key_value_heads=2, intermediate_size=64,
                                                   rope_theta=100000.0, initializer_range=0.1,
                                                   tie_word_embeddings=True, **COMMON),
    # Sliding window shorter than the test sequences, so the window is exercised.
    "mistral_window": lambda: transformers.MistralConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                         num_key_value_heads=1, intermediate_size=64,
                                                         sliding_window=4, initializer_range=0.1, **COMMON),
    # q/k/v biases.
    "qwen2": lambda: transformers.Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=2, intermediate_size=64,
                                              initializer_range=0.1, tie_word_embeddings=True, **COMMON),
}

LENGTHS = [9, 4, 7]  # one full row, two left-padded rows


def _hf_model(name, tmp_path):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation="eager")
    model.eval()
    with torch.no_grad():  # make every bias and norm non-trivial so none can be silently dropped
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n or "ln_" in n:
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / name
    model.save_pretrained(path)
    return model, path


def _left_padded_batch(rng):
    t = max(LENGTHS)
    ids = np.zeros((len(LENGTHS), t), np.int32)
    mask = np.zeros((len(LENGTHS), t), np.int32)
    rows = []
    for b, n in enumerate(LENGTHS):
        row = rng.integers(3, VOCAB, size=n)
        ids[b, t - n:] = row
        mask[b, t - n:] = 1
        rows.append(row)
    return ids, mask, rows


def _hf_logits(model, row):
    with torch.no_grad():
        return model(torch.tensor(row[None], dtype=torch.long)).logits[0].numpy()


@pytest.fixture(scope="module")
def single_mesh():
    return sharding.make_mesh(devices=jax.devices()[:1])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_on_left_padded_batch(name, tmp_path, single_mesh):
    hf_model, path = _hf_model(name, tmp_path)
    model = load_pretrained(path, mesh=single_mesh)
    ids, mask, rows = _left_padded_batch(np.random.default_rng(1))
    logits = np.asarray(jax.jit(lambda i, m: model(i, m))(ids, mask))
    t = ids.shape[1]
    for b, row in enumerate(rows):
        expected = _hf_logits(hf_model, row)  # the same row, unpadded
        got = logits[b, t - len(row):]
        assert np.abs(got - expected).max() < 1e-4, (name, b, np.abs(got - expected).max())
        assert np.abs(expected).max() > 0.1  # the comparison is not between near-zero numbers

    # save_pretrained round-trips through transformers with the same logits.
    out = save_pretrained(model, tmp_path / f"{name}_ours")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    for b, row in enumerate(rows):
        got = _hf_logits(reloaded, row)
        assert np.abs(got - logits[b, t - len(row):]).max() < 1e-4


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa", "mistral_window"])
def test_kv_cache_decoding_matches_full_forward(name, tmp_path, single_mesh):
    _, path = _hf_model(name, tmp_path)
    model = load_pretrained(path, mesh=single_mesh)
    rng = np.random.default_rng(2)
    ids, mask, _ = _left_padded_batch(rng)
    b, prompt_len = ids.shape
    new = rng.integers(3, VOCAB, size=(b, 6)).astype(np.int32)
    full_ids = np.concatenate([ids, new], 1)
    full_mask = np.concatenate([mask, np.ones_like(new)], 1)
    full = np.asarray(model(full_ids, full_mask))

    step = jax.jit(lambda i, m, c: model(i, m, cache=c))
    cache = KVCache.create(model.cfg, b, full_ids.shape[1])
    logits, cache = step(ids, mask, cache)  # prefill
    real = mask > 0
    np.testing.assert_allclose(np.asarray(logits)[real], full[:, :prompt_len][real], atol=1e-4)
    for t in range(new.shape[1]):
        logits, cache = step(new[:, t:t + 1], np.ones((b, 1), np.int32), cache)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, prompt_len + t], atol=1e-4)


def test_reward_and_value_heads_round_trip(tmp_path, single_mesh):
    _, path = _hf_model("llama_tied", tmp_path)
    rm = load_pretrained(path, heads=("reward",), mesh=single_mesh)  # an RM created from an LM checkpoint
    assert rm.heads == ("reward",)
    ids, mask, _ = _left_padded_batch(np.random.default_rng(3))
    rm.reward_gain.set_value(jnp.asarray(2.0))
    rm.reward_bias.set_value(jnp.asarray(-0.5))
    scores = np.asarray(reward_model.scores(rm, ids, mask))
    assert scores.shape == (len(LENGTHS),)
    out = save_pretrained(rm, tmp_path / "rm")
    again = load_pretrained(out, mesh=single_mesh)
    assert again.heads == ("reward",)
    np.testing.assert_allclose(np.asarray(reward_model.scores(again, ids, mask)), scores, atol=1e-6)

    # A value head starts at zero (OpenAI's init) on the policy trunk.
    policy = load_pretrained(path, heads=("lm", "value"), mesh=single_mesh)
    h, _ = policy.hidden(ids, mask)
    assert np.all(np.asarray(policy.values(h)) == 0)


def test_bfloat16_parameters_and_compute(tmp_path, single_mesh):
    hf_model, path = _hf_model("llama_gqa", tmp_path)
    model = load_pretrained(path, mesh=single_mesh, dtype="bfloat16", param_dtype="bfloat16")
    assert model.embed.get_value().dtype == jnp.bfloat16
    ids, mask, rows = _left_padded_batch(np.random.default_rng(4))
    logits = np.asarray(model(ids, mask))
    assert logits.dtype == np.float32
    expected = _hf_logits(hf_model, rows[0])
    assert np.abs(logits[0] - expected).max() < 0.1  # bf16 rounding, same network


@pytest.mark.parametrize("layout", ["sharded_safetensors", "pytorch_bin"])
def test_other_checkpoint_layouts(layout, tmp_path, single_mesh):
    hf_model, path = _hf_model("llama_gqa", tmp_path)
    other = tmp_path / layout
    if layout == "sharded_safetensors":
        hf_model.save_pretrained(other, max_shard_size="20KB")
        assert (other / "model.safetensors.index.json").exists()
    else:
        other.mkdir()
        (other / "config.json").write_text((path / "config.json").read_text())
        torch.save(hf_model.state_dict(), other / "pytorch_model.bin")
    model = load_pretrained(other, mesh=single_mesh)
    ids, mask, rows = _left_padded_batch(np.random.default_rng(5))
    logits = np.asarray(model(ids, mask))
    t = ids.shape[1]
    for b, row in enumerate(rows):
        assert np.abs(logits[b, t - len(row):] - _hf_logits(hf_model, row)).max() < 1e-4


def test_checkpoint_errors_name_the_tensor(tmp_path, single_mesh):
    from safetensors.numpy import load_file, save_file

    _, path = _hf_model("llama_gqa", tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"no tensor for layers\.1\.mlp\.up\.kernel"):
        load_pretrained(path, mesh=single_mesh)


def test_pad_id_outside_the_vocabulary_is_harmless(single_mesh):
    """GPT-2's tokenizer gets a dedicated <pad> = 50257, one past its 50257-row embedding."""
    from flax import nnx

    from rlhf_jax.models import ModelConfig, Transformer
    from rlhf_jax.sft import sft_loss

    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                      mlp_dim=64)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    ids, mask, _ = _left_padded_batch(np.random.default_rng(6))
    bad = np.where(mask > 0, ids, VOCAB)  # pad id = vocab size
    np.testing.assert_allclose(np.asarray(model(bad, mask)), np.asarray(model(ids, mask)), atol=1e-6)
    batch = {"input_ids": bad, "attention_mask": mask, "loss_mask": mask.astype(np.float32)}
    total, count, _ = sft_loss(model, batch)
    assert np.isfinite(float(total)) and float(count) > 0
