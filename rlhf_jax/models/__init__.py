"""Flax NNX decoder models, their checkpoint formats (Hugging Face directories, GGUF), and the
one loader every stage uses (`load_model`, `load_frozen`)."""

from rlhf_jax.models.checkpoints import load_gguf, load_pretrained, save_pretrained, to_host
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.load import abstract_def, load_frozen, load_model, load_tokenizer_of, model_mesh
from rlhf_jax.models.modeldef import ModelDef, cached_program, count
from rlhf_jax.models.transformer import KVCache, Transformer, dense, gather_last, last_index

__all__ = [
    "KVCache",
    "ModelConfig",
    "ModelDef",
    "Transformer",
    "abstract_def",
    "cached_program",
    "count",
    "dense",
    "gather_last",
    "last_index",
    "load_frozen",
    "load_gguf",
    "load_model",
    "load_pretrained",
    "load_tokenizer_of",
    "model_mesh",
    "save_pretrained",
    "to_host",
]
