"""rlhf_jax: training language models from human feedback (SFT, reward models, PPO) in JAX/Flax."""

import os

# Quiet start-up: transformers' "PyTorch was not found" advice (this package needs no torch)
# and datasets' per-file progress bars. Set these variables yourself to see them again.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

__version__ = "0.1.0"
