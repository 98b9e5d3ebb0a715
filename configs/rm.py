"""Reward model on Anthropic HH harmless pairs (implicit-prompt format) from ../shared/data.

    python -m rlhf_jax.main --config configs/rm.py --workdir runs/rm
    python -m rlhf_jax.main --config configs/rm.py:smollm2 --workdir runs/rm_smollm2

The RM is the LM with its output layer replaced by a scalar head read at the last token; after
training its scores are normalised (mean 0, std 1 on the held-out responses) and the gain and
bias are saved with it. Each sequence keeps its response and as much of the end of the prompt
as fits in data.max_length (at most data.max_prompt_length when set); pairs whose two sides
are still the same tokens are dropped and counted (summary.json: dropped_pairs). A ranked
prompt's pairs share one prompt's weight (rm.pair_weighting='per_prompt'). A batch's responses
are packed several to a row (data.packing; --config.data.packing=False pads one per row). To start from an SFT run: --config.model.init=pretrained
--config.model.path=runs/sft/model. Variants: `tiny` (default), `smollm2` (see
experiments/rm_hh_smollm2.py).
"""

from pathlib import Path

from rlhf_jax.config_lib import load_config, parse_arg

VARIANTS = ("tiny", "smollm2")


def get_config(arg=None):
    arg = parse_arg(arg, variant="tiny")
    if arg.variant not in VARIANTS:
        raise ValueError(f"configs/rm.py: unknown variant {arg.variant!r} ({', '.join(VARIANTS)})")
    c = load_config(Path(__file__).resolve().parent / "common.py")
    c.stage = "rm"
    c.data.path = "../shared/data/hh_rlhf_harmless_dev.jsonl.gz"
    c.data.on_bad_row = "skip"  # 4 rows of this file have an empty chosen response
    c.data.max_length = 256
    c.data.packing = True  # several responses to a row of max_length tokens (HH lengths vary widely)
    c.data.eval_fraction = 0.1
    c.rm.max_responses = 16  # 8 pairs of 2 responses per batch
    c.rm.max_pairs = 8
    c.optimizer.lr = 3e-4
    c.optimizer.warmup_steps = 10
    c.train.num_epochs = 1
    c.train.eval_every = 50
    c.train.log_every = 10
    c.train.checkpoint_every = 50
    if arg.variant == "smollm2":
        # Sized for 2 CPU cores (about half an hour): 150 steps of 8 pairs, the last user turn and
        # the response kept (prompts are cut from the left), the top 4 of 30 layers trained.
        c.model.init = "gguf"
        c.data.max_length = 160
        c.data.max_prompt_length = 96
        c.rm.max_responses = 16
        c.rm.max_pairs = 8
        c.optimizer.lr = 5e-5
        c.optimizer.warmup_steps = 10
        c.train.num_steps = 150
        c.train.trainable = r"layers\.(2[6-9])\.|final_norm|reward_head"
        c.train.eval_every = 75
        c.train.log_every = 5
        c.train.checkpoint_every = 25
    return c
