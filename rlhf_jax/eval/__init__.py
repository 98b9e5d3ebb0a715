"""Evaluations of reward models and policies on the user's own files, one `eval.kind` each
(`configs/eval.py:<kind>`; docs/EVAL.md):

  rm_accuracy       an RM on a preference file: accuracy (ties reported), loss, margin, by length
  win_rate          a policy against a reference policy, judged by an RM and/or a gold scorer
  policy_stats      KL to a reference (k1, k3; per token and sequence), length, distinct-n
  best_of_n         proxy and gold score of the best of n samples, n = 1, 2, 4, …, analytic KL
  mc                TruthfulQA-style MC1 / MC2 log-likelihood scoring of a questions file
  overoptimisation  gold and proxy score against √KL over best-of-n and a PPO run's checkpoints

    python -m rlhf_jax.main --config configs/eval.py:rm_accuracy --workdir runs/eval_rm \\
        --config.model.path=runs/rm/model --config.data.path=pairs.jsonl

Every evaluation writes summary.json (flat `eval/...` numbers, what a sweep gathers, and its curves),
results.md (its markdown table, also printed), a JSONL file of its per-item results, and the
PNG plots of best_of_n and overoptimisation.
"""

from __future__ import annotations

import time
from pathlib import Path

from rlhf_jax.eval import best_of_n_curve, mc, overoptimisation, policy_stats, rm_accuracy, win_rate
from rlhf_jax.eval.common import plain
from rlhf_jax.fileio import atomic_write_text
from rlhf_jax.train.logging import write_json_atomic

KINDS = {"rm_accuracy": rm_accuracy.run, "win_rate": win_rate.run, "policy_stats": policy_stats.run,
         "best_of_n": best_of_n_curve.run, "mc": mc.run, "overoptimisation": overoptimisation.run}

__all__ = ["KINDS", "run"]


def run(cfg, workdir: str | Path) -> dict:
    """Runs the evaluation `cfg.eval.kind`; writes summary.json and results.md in `workdir`."""
    kind = cfg.eval.kind
    if kind not in KINDS:
        raise ValueError(f"eval.kind={kind!r} is not one of {', '.join(KINDS)}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(workdir / "config.json", cfg.to_dict())
    t0 = time.time()
    summary, text = KINDS[kind](cfg, workdir)
    summary = plain({**summary, "stage": "eval", "kind": kind, "seconds": time.time() - t0})
    write_json_atomic(workdir / "summary.json", summary)
    atomic_write_text(workdir / "results.md", text + "\n")
    print("\n" + text + "\n")
    return summary
