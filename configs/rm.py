"""Reward model on Anthropic HH harmless pairs (implicit-prompt format) from ../shared/data.

    python -m rlhf_jax.main --config configs/rm.py --workdir runs/rm
    python -m rlhf_jax.main --config configs/rm.py:smollm2 --workdir runs/rm_smollm2

The RM is the LM with its output layer replaced by a scalar head read at the last token; after
training its scores are normalised (mean 0, std 1 on the held-out responses) and the gain and
bias are saved with it. To start from an SFT run: --config.model.init=pretrained
--config.model.path=runs/sft/model
"""

from rlhf_jax.config_defaults import base_config


def get_config(variant: str = "tiny"):
    c = base_config()
    c.stage = "rm"
    c.data.path = "../shared/data/hh_rlhf_harmless_dev.jsonl.gz"
    c.data.max_length = 256
    c.data.eval_fraction = 0.1
    c.rm.max_responses = 16  # 8 pairs of 2 responses per batch
    c.rm.max_pairs = 8
    c.optimizer.lr = 3e-4
    c.optimizer.warmup_steps = 10
    c.train.num_epochs = 1
    c.train.eval_every = 50
    c.train.log_every = 10
    c.train.checkpoint_every = 50
    if variant == "smollm2":
        c.model.init = "gguf"
        c.data.max_length = 256
        c.data.max_prompt_length = 192
        c.rm.max_responses = 16
        c.rm.max_pairs = 8
        c.optimizer.lr = 5e-5
        c.optimizer.warmup_steps = 10
        c.train.trainable = r"layers\.(2[6-9])\.|final_norm|reward_head"  # top 4 layers + head
        c.train.eval_every = 50
        c.train.checkpoint_every = 25
    elif variant != "tiny":
        raise ValueError(f"configs/rm.py: unknown variant {variant!r} (tiny, smollm2)")
    return c
