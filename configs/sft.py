"""SFT on instruction demonstrations (default: the Alpaca sample in ../shared/data).

    python -m rlhf_jax.main --config configs/sft.py --workdir runs/sft
    python -m rlhf_jax.main --config configs/sft.py:smollm2 --workdir runs/sft_smollm2

Variants (after the colon): `tiny` (default: a tiny random model, byte tokenizer) and
`smollm2` (the real SmolLM2-135M-Instruct from its GGUF file).
"""

from rlhf_jax.config_defaults import base_config


def get_config(variant: str = "tiny"):
    c = base_config()
    c.stage = "sft"
    c.data.path = "../shared/data/alpaca_en_demo.json"
    c.data.max_length = 256
    c.data.eval_fraction = 0.1
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 10
    c.train.batch_size = 16
    c.train.num_epochs = 1
    c.train.eval_every = 25
    c.train.log_every = 5
    c.train.checkpoint_every = 25
    if variant == "smollm2":
        c.model.init = "gguf"
        c.data.max_length = 192
        c.optimizer.lr = 2e-5
        c.optimizer.warmup_steps = 5
        c.train.batch_size = 8
        c.train.num_steps = 40
        c.train.eval_every = 20
        c.train.eval_batches = 8
        c.train.log_every = 5
        c.train.checkpoint_every = 20
        c.train.trainable = r"layers\.(2[6-9])\."  # the top 4 of 30 layers: practical on 2 CPU cores
    elif variant != "tiny":
        raise ValueError(f"configs/sft.py: unknown variant {variant!r} (tiny, smollm2)")
    return c
