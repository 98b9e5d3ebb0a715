"""Command line: `python -m rlhf_jax.main --config FILE.py[:arg] --workdir DIR`, FILE.py a stage
config (configs/pretrain.py, sft.py, rm.py, dpo.py, ppo.py), an evaluation (configs/eval.py:KIND)
or an experiment (experiments/quickstart.py: the main job).

Any config field can be overridden (`--config.optimizer.lr=1e-5`). Re-running with the same
workdir and config resumes from the latest checkpoint, or does nothing if that run finished; with
another config it is refused, naming the fields that differ, unless `--overwrite`
(`rlhf_jax/train/workdir.py`).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from rlhf_jax.eval import run as run_eval
from rlhf_jax.pipeline import run_algorithms, run_rlhf
from rlhf_jax.ppo.trainer import run_ppo
from rlhf_jax.train import workdir as workdir_lib
from rlhf_jax.train.loop import run as run_stage

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py or experiments/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the final model.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Delete the run that --workdir holds and start afresh "
                                "(needed when its config differs from this one).")
flags.DEFINE_bool("debug", False, "Show the full traceback of an error (or set RLHF_JAX_DEBUG=1).")
flags.mark_flags_as_required(["config", "workdir"])

# What a user's mistake raises (a bad config value, file, row, model kind or checkpoint): one
# line and exit status 2, the traceback only with --debug.
USER_ERRORS = (ValueError, TypeError, KeyError, AttributeError, FileNotFoundError, ImportError, NotImplementedError,
               TimeoutError)

RUNNERS = {"pretrain": run_stage, "sft": run_stage, "rm": run_stage, "dpo": run_stage, "ppo": run_ppo, "rlhf": run_rlhf,
           "algorithms": run_algorithms, "eval": run_eval}
_PRINTED = ("eval/", "train/loss", "rm/", "ppo/score", "ppo/kl")


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file it writes at INFO
    cfg = _CONFIG.value
    if cfg.stage not in RUNNERS:
        raise ValueError(f"config stage={cfg.stage!r} is not one of {sorted(RUNNERS)}")
    workdir = _WORKDIR.value
    if workdir_lib.begin(cfg.to_dict(), workdir, overwrite=_OVERWRITE.value):
        print(f"nothing to do: {workdir} holds this run (same config), finished; its results are in "
              f"{workdir}/{'algorithms.md' if cfg.stage == 'algorithms' else 'summary.json'} "
              f"(--overwrite runs it again)")
        return
    summary = RUNNERS[cfg.stage](cfg, workdir)
    workdir_lib.finish(cfg.to_dict(), workdir)
    if cfg.stage in ("rlhf", "algorithms", "eval"):
        return  # the pipeline and the evaluations print their own tables
    for k in sorted(k for k in summary if k.startswith(_PRINTED)):
        print(f"{k:32s} {summary[k]}")


def _message(e: BaseException) -> str:
    if isinstance(e, (AttributeError, KeyError)) and any(a.startswith("--config.") for a in sys.argv):
        field = str(e).strip("'\"")  # KeyError / AttributeError quote the name
        return f"no such config field {field!r}; check the --config.* overrides"
    return str(e) or type(e).__name__


def cli() -> None:
    try:
        app.run(main)
    except USER_ERRORS as e:
        if "--debug" in sys.argv or os.environ.get("RLHF_JAX_DEBUG"):
            raise
        print(f"error: {_message(e)} (--debug shows the traceback)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
