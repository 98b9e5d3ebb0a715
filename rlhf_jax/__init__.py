"""rlhf_jax: training language models from human feedback (SFT, reward models, PPO) in JAX/Flax."""

__version__ = "0.1.0"
