"""Flax NNX decoder models and their checkpoint formats (Hugging Face directories, GGUF)."""

from rlhf_jax.models.checkpoints import load_gguf, load_pretrained, save_pretrained
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import KVCache, Transformer, gather_last, last_index

__all__ = [
    "KVCache",
    "ModelConfig",
    "Transformer",
    "gather_last",
    "last_index",
    "load_gguf",
    "load_pretrained",
    "save_pretrained",
]
