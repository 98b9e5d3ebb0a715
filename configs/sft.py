"""SFT on instruction demonstrations (default: the Alpaca sample in ../shared/data).

    python -m rlhf_jax.main --config configs/sft.py --workdir runs/sft
    python -m rlhf_jax.main --config configs/sft.py:smollm2 --workdir runs/sft_smollm2

Variants (after the colon): `tiny` (default: a tiny random model, byte tokenizer) and
`smollm2` (the real SmolLM2-135M-Instruct from its GGUF file; see experiments/sft_smollm2.py).
"""

from pathlib import Path

from rlhf_jax.config_lib import load_config, parse_arg

VARIANTS = ("tiny", "smollm2")


def get_config(arg=None):
    arg = parse_arg(arg, variant="tiny")
    if arg.variant not in VARIANTS:
        raise ValueError(f"configs/sft.py: unknown variant {arg.variant!r} ({', '.join(VARIANTS)})")
    c = load_config(Path(__file__).resolve().parent / "common.py")
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
    if arg.variant == "smollm2":
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
    return c
