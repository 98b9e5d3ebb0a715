"""The quickstart task once per algorithm, at the same sample budget, into one table.

    python -m rlhf_jax.main --config experiments/algorithms.py --workdir runs/algorithms

Each algorithm runs experiments/quickstart.py:algorithm=NAME (rlhf_jax/pipeline.py). With one
round they share one workdir: the SFT model, the comparisons and the RM are made once, and only
the policy step differs. PPO, RLOO and GRPO spend 40 iterations × 64 samples; best-of-n spends
n = 10 samples on each of the 256 evaluation prompts (the same 2560). Columns: gold score, KL to
SFT in nats (PPO/RLOO/GRPO: the last iteration's rollouts, sequence-summed k1 against the SFT
model; best-of-n: analytic log n − (n−1)/n, the plug-in estimate in brackets) and the wall time
of the policy step (best-of-n: sampling and RM scoring at evaluation). Options:
`experiments/algorithms.py:algorithms=ppo+rloo,rounds=2` (algorithms joined by '+').
"""

from pathlib import Path

import ml_collections

from rlhf_jax.config_lib import load_config, parse_arg

QUICKSTART = Path(__file__).resolve().parent / "quickstart.py"


def get_config(arg=None):
    arg = parse_arg(arg, algorithms="ppo+rloo+grpo+dpo+best_of_n", rounds=1)
    c = ml_collections.ConfigDict()
    c.stage = "algorithms"
    c.algorithms = tuple(arg.algorithms.split("+"))
    c.rounds = arg.rounds
    c.seed = 0  # every run's seed (a sweep over seeds sets this one)
    # One pipeline config per algorithm: --config.runs.rloo.ppo.ppo.num_updates=20 changes one.
    c.runs = ml_collections.ConfigDict({alg: load_config(QUICKSTART, f"algorithm={alg},rounds={arg.rounds}")
                                        for alg in c.algorithms})
    return c
