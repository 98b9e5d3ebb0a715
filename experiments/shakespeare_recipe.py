"""The full recipe from scratch: pretrain on Shakespeare → SFT → comparisons → RM → PPO.

    python -m rlhf_jax.main --config experiments/shakespeare_recipe.py --workdir runs/recipe

A byte-level Llama is pretrained from scratch on tinyshakespeare (configs/pretrain.py, its
last 5% of lines held out); the quickstart's stages follow, each starting from the last: SFT
on the word-sentiment demonstrations, comparisons labelled by the simulated labeler, the RM,
PPO. PPO is run twice from the SFT policy against the same RM: plain, and PPO-ptx (the
next-token loss on Shakespeare training blocks mixed into every PPO step, `ptx.coef`). The
summary's alignment-tax table gives every model's per-token loss on the held-out Shakespeare
blocks and on the held-out demonstrations, with its gold score.
Variants: `experiments/shakespeare_recipe.py:ptx=0.5` (the PPO-ptx coefficient).

What it printed (seed 0; 1,098 s after pretraining on 2 CPU cores shared with other jobs; the
pretrain stage, 10 min 48 s, was reused from a `configs/pretrain.py` run with the same config):

| model    | held-out Shakespeare loss (nats/byte) | held-out demo loss | gold score |
|----------|------:|------:|------:|
| pretrain | 1.8815 | 2.6493 |        |
| SFT      | 6.7679 | 0.5769 | +0.120 |
| PPO      | 6.7727 | 2.3805 | +0.998 |
| PPO-ptx  | 1.9009 | 1.8360 | +0.992 |
"""

from pathlib import Path

from rlhf_jax.config_lib import load_config, parse_arg

ROOT = Path(__file__).resolve().parents[1]


def get_config(arg=None):
    arg = parse_arg(arg, ptx=1.0)
    c = load_config(ROOT / "experiments" / "quickstart.py")
    c.pretrain = load_config(ROOT / "configs" / "pretrain.py")
    c.pretrain.data.path = str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
    c.pretrain.train.progress_bar = False
    c.sft.model.init = "pretrained"  # the pipeline points it at pretrain/model
    c.sft.train.num_steps = 200  # a pretrained model learns to spell the task's words sooner
    c.ptx.coef = arg.ptx
    c.ptx.format = "pretrain"
    c.eval.lm_batch_size = 32
    return c
