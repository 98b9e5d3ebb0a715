"""The full recipe from scratch: pretrain on Shakespeare → SFT → comparisons → RM → PPO (and PPO-ptx).

    python -m rlhf_jax.main --config experiments/shakespeare_recipe.py --workdir runs/recipe

A byte-level Llama is pretrained from scratch on tinyshakespeare (configs/pretrain.py: 300
steps of 32 blocks of 128 bytes, its last 5% of lines held out); the quickstart's stages
follow, each starting from the last: SFT on the word-sentiment demonstrations, comparisons
labelled by the simulated labeler, the RM, PPO. PPO is run twice from the SFT policy against
the same RM: plain, and PPO-ptx (the next-token loss on Shakespeare *training* blocks mixed
into every PPO step, `ptx.coef`). The summary's `alignment_tax` (and alignment_tax.md) gives
every model's per-token loss and perplexity on the held-out Shakespeare blocks and on the
SFT stage's held-out demonstrations, with its gold score: the held-out perplexity after every
stage and the tax of PPO with and without its mitigation.
Variants: `experiments/shakespeare_recipe.py:ptx=0.5` (the PPO-ptx coefficient);
`:algorithm=rloo` or `grpo` (the policy-gradient step; PPO-ptx applies to them too).

What it printed (seed 0, on 2 CPU cores shared with other jobs: 244 s of pretraining, 163 s of
SFT, 55 s of RM, 89 s of PPO; RM held-out accuracy 0.703, KL to SFT 8.13 (PPO) and 7.76 (PPO-ptx)):

| model    | held-out Shakespeare loss (nats/byte) | held-out demonstration loss | gold score |
|----------|------:|------:|-------:|
| pretrain | 1.8815 | 2.6493 |        |
| SFT      | 6.7679 | 0.5769 | +0.094 |
| PPO      | 6.3231 | 1.7201 | +0.993 |
| PPO-ptx  | 1.9379 | 1.7589 | +0.989 |
"""

from pathlib import Path

from rlhf_jax.config_lib import load_config, parse_arg

ROOT = Path(__file__).resolve().parents[1]


def get_config(arg=None):
    arg = parse_arg(arg, ptx=1.0, algorithm="ppo")
    if arg.algorithm not in ("ppo", "rloo", "grpo"):
        raise ValueError(f"experiments/shakespeare_recipe.py: algorithm={arg.algorithm!r} is not one of ppo, rloo, "
                         "grpo (the recipe compares a policy-gradient step with and without PPO-ptx)")
    c = load_config(ROOT / "experiments" / "quickstart.py", f"algorithm={arg.algorithm},ptx={arg.ptx}")
    c.pretrain = load_config(ROOT / "configs" / "pretrain.py")
    c.pretrain.data.path = str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
    c.pretrain.train.progress_bar = False
    c.sft.train.num_steps = 200  # from a pretrained model (the pipeline points sft.model at pretrain/model)
    c.ptx.format = "pretrain"  # Shakespeare training blocks, the pretrain stage's held-out split kept out
    c.eval.lm_batch_size = 32
    return c
