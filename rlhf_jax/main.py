"""Command line: `python -m rlhf_jax.main --config FILE.py[:arg] --workdir DIR`, FILE.py a stage
config (configs/sft.py, rm.py, ppo.py) or an experiment (experiments/quickstart.py: the main job).

Any config field can be overridden: `--config.optimizer.lr=1e-5 --config.train.num_steps=100`.
Re-running with the same workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py or experiments/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the final model.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    cfg = _CONFIG.value
    stage = cfg.stage
    if stage in ("sft", "rm"):
        from rlhf_jax.train.loop import run

        summary = run(cfg, _WORKDIR.value)
    elif stage == "rlhf":
        from rlhf_jax.pipeline import run_rlhf

        summary = run_rlhf(cfg, _WORKDIR.value)
        return
    elif stage == "ppo":
        from rlhf_jax.ppo.trainer import run_ppo

        summary = run_ppo(cfg, _WORKDIR.value)
    else:
        raise ValueError(f"config stage={stage!r} is not one of 'sft', 'rm', 'ppo', 'rlhf'")
    keys = sorted(k for k in summary if k.startswith(("eval/", "train/loss", "rm/", "ppo/score", "ppo/kl")))
    for k in keys:
        print(f"{k:32s} {summary[k]}")


if __name__ == "__main__":
    app.run(main)
