"""DPO / IPO on Anthropic HH harmless pairs (implicit-prompt format) from ../shared/data.

    python -m rlhf_jax.main --config configs/dpo.py --workdir runs/dpo
    python -m rlhf_jax.main --config configs/dpo.py:smollm2 --workdir runs/dpo_smollm2

The policy starts from `model` and is pulled towards the chosen responses relative to a
frozen reference (`dpo.reference_path`; '' = the starting policy): no reward model, no
sampling. `dpo.loss_type='ipo'` gives IPO; `dpo.label_smoothing` > 0 conservative DPO;
`dpo.precompute_reference=True` scores the data once with the reference before training
and then drops it (one forward pass per step instead of two). A batch's responses are packed
several to a row (data.packing; --config.data.packing=False pads one per row). To start from
an SFT run: --config.model.init=pretrained --config.model.path=runs/sft/model. Variants:
`tiny` (default), `smollm2` (SmolLM2-135M-Instruct from its GGUF file, top layers trained).
"""

from pathlib import Path

import ml_collections

from rlhf_jax.config_lib import load_config, parse_arg

VARIANTS = ("tiny", "smollm2")


def get_config(arg=None):
    arg = parse_arg(arg, variant="tiny")
    if arg.variant not in VARIANTS:
        raise ValueError(f"configs/dpo.py: unknown variant {arg.variant!r} ({', '.join(VARIANTS)})")
    c = load_config(Path(__file__).resolve().parent / "common.py")
    c.stage = "dpo"
    c.data.path = "../shared/data/hh_rlhf_harmless_dev.jsonl.gz"
    c.data.on_bad_row = "skip"  # 4 rows of this file have an empty chosen response
    c.data.max_length = 256
    c.data.packing = True  # several responses to a row of max_length tokens (HH lengths vary widely)
    c.data.eval_fraction = 0.1
    c.dpo = ml_collections.ConfigDict(dict(
        beta=0.1,  # KL strength: implicit reward = beta * log(pi / pi_ref)
        loss_type="sigmoid",  # 'sigmoid' (DPO) or 'ipo'
        label_smoothing=0.0,  # conservative DPO: the labels' assumed flip rate, in [0, 0.5)
        reference_path="",  # '' = the starting policy; else a model path (same architecture)
        precompute_reference=False,  # True: reference log-probs once before training, stored with the data
        pair_weighting="per_prompt",  # 'per_prompt': a ranked list's pairs share one prompt's weight
        max_responses=16,  # a batch: whole prompt groups, up to this many responses...
        max_pairs=8,  # ...and pairs (8 pairs of 2 responses for HH)
    ))
    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 10
    c.train.num_epochs = 1
    c.train.eval_every = 50
    c.train.log_every = 10
    c.train.checkpoint_every = 50
    if arg.variant == "smollm2":
        # Sized for 2 CPU cores (about 12 minutes): 60 steps of 8 pairs, the last user turn and
        # the response kept (prompts are cut from the left), the top 4 of 30 layers and the
        # final norm trained; all 180 held-out pairs evaluated at steps 0, 30 and 60.
        c.model.init = "gguf"
        c.data.max_length = 160
        c.data.max_prompt_length = 96
        c.optimizer.lr = 1e-4
        c.optimizer.warmup_steps = 5
        c.train.num_steps = 60
        c.train.trainable = r"layers\.(2[6-9])\.|final_norm"
        c.train.eval_every = 30
        c.train.eval_batches = 0
        c.train.log_every = 5
        c.train.checkpoint_every = 30
    return c
