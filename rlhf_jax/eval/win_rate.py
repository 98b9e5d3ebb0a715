"""Win rate of a policy against a reference policy on a prompts file, judged by a reward model
(`eval.rm_path`) and/or a gold scorer (`eval.gold`: a task, an RM, a reward function).

Each prompt gets `eval.num_samples` responses from each policy; response k of the policy is
compared with response k of the reference. A win is a higher judge score, a tie an equal one
(counted a half); the win rate (wins + ties/2) / n has a Wilson interval at `eval.confidence`.
The reference samples with seed + 1, so a policy against itself is a fair coin (win rate 0.5).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rlhf_jax.eval import common
from rlhf_jax.feedback.collect import generate_texts
from rlhf_jax.models import load_tokenizer_of


def compare(policy_scores: np.ndarray, reference_scores: np.ndarray, confidence: float) -> dict:
    """Wins, ties, losses, win rate (ties a half), its Wilson interval and the mean scores."""
    d = np.asarray(policy_scores, np.float64) - np.asarray(reference_scores, np.float64)
    n = len(d)
    wins, ties = int((d > 0).sum()), int((d == 0).sum())
    rate = (wins + 0.5 * ties) / n
    lo, hi = common.wilson(wins + 0.5 * ties, n, confidence)
    return {"win_rate": rate, "ci_low": lo, "ci_high": hi, "wins": wins, "ties": ties, "losses": n - wins - ties,
            "n": n, "score_policy": float(np.mean(policy_scores)), "score_reference": float(np.mean(reference_scores))}


def run(cfg, workdir: Path) -> tuple[dict, str]:
    mesh = common.make_mesh(cfg)
    spec = common.model_spec(cfg)
    reference = common.model_path(cfg.eval.reference_path, "eval.reference_path")
    tok = load_tokenizer_of(spec)
    common.sampling_config(cfg, tok, need_temperature=False)
    k = common.positive_int(cfg, "eval.num_samples")
    confidence = float(cfg.eval.confidence)
    common.wilson(0, 0, confidence)  # checks the field before any sampling
    judges = []
    if cfg.eval.rm_path:
        judges.append(("rm", common.rm_judge(cfg.eval.rm_path, "eval.rm_path", cfg, mesh)))
    gold = common.gold_judge(cfg, mesh)
    if gold is not None:
        judges.append(("gold", gold))
    if not judges:
        raise ValueError("eval.rm_path='' and eval.gold='': set a judge (a reward model directory, and/or a task, "
                         "RM or 'module:function' as eval.gold)")
    prompts = common.prompts(cfg, tok, gold)
    kw = common.generate_kwargs(cfg)
    seed = int(cfg.seed)
    texts_p = generate_texts(spec, prompts, num_samples=k, seed=seed, mesh=mesh, **kw)
    texts_r = generate_texts(reference, prompts, num_samples=k, seed=seed + 1, mesh=mesh, **kw)
    repeated = [p for p in prompts for _ in range(k)]
    summary: dict = {"eval/prompts": len(prompts), "eval/n": len(repeated)}
    rows, scores = [], {}
    for name, judge in judges:
        sp, sr = common.score(judge, repeated, texts_p), common.score(judge, repeated, texts_r)
        scores[name] = (sp, sr)
        res = compare(sp, sr, confidence)
        summary.update({f"eval/{name}/{key}": v for key, v in res.items()})
        rows.append((f"{name}: {judge.name}", res["n"], res["win_rate"], f"{res['ci_low']:.3f}-{res['ci_high']:.3f}",
                     res["wins"], res["ties"], res["losses"], res["score_policy"], res["score_reference"]))
    first = judges[0][0]
    summary["eval/win_rate"] = summary[f"eval/{first}/win_rate"]
    summary["eval/win_rate_ci_low"] = summary[f"eval/{first}/ci_low"]
    summary["eval/win_rate_ci_high"] = summary[f"eval/{first}/ci_high"]
    with (workdir / "samples.jsonl").open("w") as f:
        for i, prompt in enumerate(repeated):
            row = {"prompt": prompt, "policy": texts_p[i], "reference": texts_r[i]}
            for name, (sp, sr) in scores.items():
                row[f"{name}_policy"], row[f"{name}_reference"] = float(sp[i]), float(sr[i])
            f.write(json.dumps(row) + "\n")
    text = "\n\n".join([
        f"Win rate of `{common.spec_label(spec)}` against `{reference}` on {len(prompts)} prompts × {k} samples",
        common.markdown_table(("judge", "n", "win rate", f"{confidence:.0%} CI", "wins", "ties", "losses",
                               "policy score", "reference score"), rows)])
    return summary, text
