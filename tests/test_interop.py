"""Reward models in and out of transformers (and so TRL): a `*ForSequenceClassification` with
`num_labels=1` loads as an RM with the same scores, and an RM of ours loads back in
`AutoModelForSequenceClassification` with the same scores, its normalisation included
(`score.weight` carries the gain, `config.rlhf_jax_score_offset` the constant).

transformers reads a sequence classifier's logit at the last token that is not
`pad_token_id`; it is given right-padded rows here, and our RM the left-padded rows that
`RMScorer` builds.
"""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402

from rlhf_jax import reward_model  # noqa: E402
from rlhf_jax.data import left_pad  # noqa: E402
from rlhf_jax.models import ModelDef, load_model, load_pretrained, save_pretrained  # noqa: E402
from rlhf_jax.models.checkpoints import SCORE_OFFSET_KEY, saved_heads  # noqa: E402

VOCAB = 96
PAD, BOS, EOS = 0, 1, 2
COMMON = dict(vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, num_labels=1)
CONFIGS = {
    # Untied embeddings (transformers' Llama default): an RM has no LM head at all.
    "llama": lambda: transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                              num_key_value_heads=2, intermediate_size=64, initializer_range=0.1,
                                              **COMMON),
    "qwen2": lambda: transformers.Qwen2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                              num_key_value_heads=2, intermediate_size=64, initializer_range=0.1,
                                              tie_word_embeddings=True, **COMMON),
    "mistral": lambda: transformers.MistralConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                  num_key_value_heads=1, intermediate_size=64, initializer_range=0.1,
                                                  **COMMON),
    "gpt2": lambda: transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, n_positions=64, initializer_range=0.1,
                                            **COMMON),
}
LENGTHS = [9, 4, 7]


def _hf_classifier(name, path):
    """A random transformers reward model (as TRL trains one), saved with save_pretrained."""
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(CONFIGS[name](),
                                                                        attn_implementation="eager").eval()
    with torch.no_grad():  # a score head large enough that 1e-4 is a real comparison
        model.score.weight.mul_(10.0)
    model.save_pretrained(path)
    return model


def _rows():
    rng = np.random.default_rng(1)
    return [np.concatenate([[BOS], rng.integers(3, VOCAB, size=n - 2), [EOS]]) for n in LENGTHS]


def _hf_scores(model, rows, pad=PAD):
    """transformers' logits [N] on right-padded rows (its pooling finds the last non-pad token)."""
    t = max(map(len, rows))
    ids = torch.full((len(rows), t), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, :len(row)], mask[b, :len(row)] = torch.tensor(row), 1
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[:, 0].numpy()


def _our_scores(rm, rows, pad=PAD):
    """Our scores [N] on left-padded rows, as `RMScorer` builds them."""
    model_def, _, params = ModelDef.split(rm, None)
    score = jax.jit(lambda p, ids, mask: reward_model.scores(model_def.merge(p), ids, mask))
    return np.asarray(score(params, *left_pad(rows, max(map(len, rows)), pad)))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_reward_model_round_trips_through_transformers(name, tmp_path, mesh):
    rows = _rows()
    hf = _hf_classifier(name, tmp_path / "hf")
    expected = _hf_scores(hf, rows)
    assert np.ptp(expected) > 0.1  # the scores differ between rows, so a wrong position would show

    # transformers -> ours: an RM by default (the architecture says so), the same scores.
    assert saved_heads(tmp_path / "hf") == ("reward",)
    rm, _ = load_model(str(tmp_path / "hf"), heads=("reward",), tokenizer="byte", mesh=mesh,
                       require_trained=("reward",), role="reward model")
    np.testing.assert_allclose(_our_scores(rm, rows), expected, atol=1e-4)

    # ours -> transformers: a normalised RM (gain, bias, a head bias) is a sequence classifier
    # whose logit plus the saved offset is our score.
    rm.reward_gain.set_value(jnp.asarray(2.5))
    rm.reward_bias.set_value(jnp.asarray(-0.75))
    rm.reward_head.bias.set_value(jnp.asarray([0.3]))
    ours = _our_scores(rm, rows)
    out = save_pretrained(rm, tmp_path / "ours")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [type(hf).__name__]
    assert config[SCORE_OFFSET_KEY] == pytest.approx(2.5 * 0.3 - 0.75)
    back = transformers.AutoModelForSequenceClassification.from_pretrained(out, attn_implementation="eager").eval()
    assert type(back) is type(hf)
    np.testing.assert_allclose(_hf_scores(back, rows) + back.config.rlhf_jax_score_offset, ours, atol=1e-4)


def test_tiny_rm_exports_the_tokenizers_pad_token(tmp_path, mesh):
    """An RM made by the RM stage (byte tokenizer: pad 256, EOS 258) is scored by transformers
    on the same tokens and at the same position."""
    spec = dict(init="tiny", path="", dtype="float32", param_dtype="float32",
                tiny=dict(model_type="llama", hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                          mlp_dim=64, max_position_embeddings=64, tie_embeddings=True))
    rm, tok = load_model(spec, heads=("reward",), mesh=mesh, seed=1)
    rm.reward_gain.set_value(jnp.asarray(3.0))
    texts = ["a short one", "a somewhat longer response", "mid length"]
    rows = [np.asarray([tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
            for t in texts]
    out = save_pretrained(rm, tmp_path / "rm", tokenizer=tok)
    config = json.loads((out / "config.json").read_text())
    assert config["pad_token_id"] == tok.pad_token_id != tok.eos_token_id
    back = transformers.AutoModelForSequenceClassification.from_pretrained(out, attn_implementation="eager").eval()
    np.testing.assert_allclose(_hf_scores(back, rows, tok.pad_token_id) + config[SCORE_OFFSET_KEY],
                               _our_scores(rm, rows, tok.pad_token_id), atol=1e-4)


def test_a_head_edited_by_another_tool_wins_over_the_stale_side_file(tmp_path, mesh, caplog):
    rows = _rows()
    _hf_classifier("llama", tmp_path / "hf")
    rm = load_pretrained(tmp_path / "hf", mesh=mesh)
    rm.reward_gain.set_value(jnp.asarray(2.0))
    out = save_pretrained(rm, tmp_path / "ours")
    # Another tool retrains the score layer and saves model.safetensors in place.
    tensors = load_file(out / "model.safetensors")
    tensors["score.weight"] = tensors["score.weight"] * -1.0
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out, attn_implementation="eager").eval()
    with caplog.at_level(logging.WARNING):
        edited = load_pretrained(out, mesh=mesh)
    assert "score.weight is not the reward head" in caplog.text
    np.testing.assert_allclose(_our_scores(edited, rows), _hf_scores(hf, rows) + hf.config.rlhf_jax_score_offset,
                               atol=1e-4)


def test_classifiers_that_are_not_reward_models_are_refused(tmp_path, mesh):
    config = CONFIGS["llama"]()
    config.num_labels = 3
    transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "three")
    with pytest.raises(ValueError, match="num_labels=3 is not a reward model"):
        load_pretrained(tmp_path / "three", mesh=mesh)
    _hf_classifier("llama", tmp_path / "rm")  # untied: no LM to load
    with pytest.raises(ValueError, match="no lm_head.weight .a reward model: load it with heads=.'reward',.."):
        load_pretrained(tmp_path / "rm", heads=("lm",), mesh=mesh)
