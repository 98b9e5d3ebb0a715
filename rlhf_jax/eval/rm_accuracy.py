"""RM accuracy on a preference file: accuracy (a tie counts a half and is reported as a tie),
the pairwise loss, the mean margin, accuracy by response-length bucket, and a length-only
baseline ("the longer response wins").

The file is read as the RM stage reads it (`data.preference_dataset`: any preference format,
the same truncation), with the RM's tokenizer; every response is scored once. Loss and margin
use the RM's raw head output, as the RM stage's `eval/loss` and `eval/reward_margin`;
`margin_normalized` is in the units PPO sees (the saved gain times the raw margin).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from rlhf_jax import data as data_lib
from rlhf_jax import sharding as sharding_lib
from rlhf_jax.eval import common
from rlhf_jax.models import ModelDef, cached_program, load_model, to_host
from rlhf_jax.reward_model import raw_scores


def _raw_program(model_def: ModelDef, mesh):
    def build():
        b2, b1 = sharding_lib.batch_sharding(mesh, 2), sharding_lib.batch_sharding(mesh, 1)
        return jax.jit(lambda params, ids, mask: raw_scores(model_def.merge(params), ids, mask),
                       in_shardings=(sharding_lib.param_shardings(model_def, mesh), b2, b2), out_shardings=b1)

    return cached_program("eval_rm_raw", model_def, mesh, None, build)


def score_sequences(model_def: ModelDef, params: dict, seqs: list[np.ndarray], length: int, pad_id: int,
                    batch_size: int, mesh) -> np.ndarray:
    """Raw RM scores float64 [N] of token sequences, left-padded to `length`, in fixed batches."""
    program = _raw_program(model_def, mesh)
    b = common.batch_rows(mesh, batch_size)
    out = np.zeros(len(seqs), np.float64)
    for start in range(0, len(seqs), b):
        chunk = seqs[start:start + b]
        n = len(chunk)
        ids, mask = data_lib.left_pad(chunk + [chunk[0]] * (b - n), length, pad_id)
        ids, mask = jax.device_put((ids, mask), sharding_lib.batch_sharding(mesh, 2))
        out[start:start + n] = to_host(program(params, ids, mask))[:n]
    return out


def bucket_labels(edges: tuple[int, ...]) -> list[str]:
    bounds = [0, *edges]
    return [f"{a}-{b - 1}" for a, b in zip(bounds, bounds[1:])] + [f">={bounds[-1]}"]


def pair_outcomes(diff: np.ndarray, tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """(win, tie) booleans per pair: chosen − rejected > tol is a win, |·| <= tol a tie."""
    return diff > tolerance, np.abs(diff) <= tolerance


def _check(cfg) -> tuple[tuple[int, ...], float]:
    edges = tuple(int(e) for e in cfg.eval.length_buckets)
    common.check(all(e > 0 for e in edges) and list(edges) == sorted(set(edges)), "eval.length_buckets",
                 cfg.eval.length_buckets, "must be increasing positive token counts, e.g. (32, 64, 128)")
    tol = float(cfg.eval.tie_tolerance)
    common.check(tol >= 0, "eval.tie_tolerance", tol, "must be >= 0 (0: only equal scores tie)")
    common.wilson(0, 0, float(cfg.eval.confidence))  # checks eval.confidence
    common.check(bool(cfg.data.path), "data.path", cfg.data.path, "set it to a preference file (any format the "
                 "RM stage reads: explicit, implicit, ranked, alpaca_ranked)")
    common.positive_int(cfg, "data.max_length", 2)
    common.check(cfg.data.max_prompt_length >= 0, "data.max_prompt_length", cfg.data.max_prompt_length,
                 "must be >= 0 (0 = no cap)")
    return edges, tol


def run(cfg, workdir: Path) -> tuple[dict, str]:
    edges, tol = _check(cfg)
    mesh = common.make_mesh(cfg)
    spec = common.model_spec(cfg)
    model, tok = load_model(spec, heads=("reward",), tokenizer=cfg.tokenizer, mesh=mesh,
                            require_trained=("reward",), role="model.path")
    ds = data_lib.preference_dataset(cfg.data.path, tok, format=cfg.data.format,
                                     max_length=int(cfg.data.max_length),
                                     max_prompt_length=int(cfg.data.max_prompt_length) or None,
                                     on_bad_row=cfg.data.on_bad_row)
    if not ds.num_pairs():
        raise ValueError(f"data.path={cfg.data.path!r}: no preference pair to evaluate "
                         f"({ds.report.rows} rows, skipped {ds.report.skipped or 'none'})")
    model_def, _, params = ModelDef.split(model, None)
    seqs = [r for g in ds.examples for r in g.responses]
    raw = score_sequences(model_def, params, seqs, ds.seq_len, ds.pad_id, common.positive_int(cfg, "eval.batch_size"),
                          mesh)
    gain = float(np.asarray(params["reward_gain"]))

    chosen, rejected, margin, length, rows = [], [], [], [], []
    offset = 0
    for g in ds.examples:
        resp_len = [len(r) - int(s) for r, s in zip(g.responses, g.response_starts)]
        for c, r, m in zip(g.chosen.tolist(), g.rejected.tolist(), g.margin.tolist()):
            chosen.append(offset + c)
            rejected.append(offset + r)
            margin.append(m)
            length.append((resp_len[c], resp_len[r]))
            rows.append(g.rows[0])
        offset += len(g.responses)
    chosen, rejected, margin = np.asarray(chosen), np.asarray(rejected), np.asarray(margin, np.float64)
    length = np.asarray(length, np.float64)
    diff = raw[chosen] - raw[rejected]
    win, tie = pair_outcomes(diff, tol)
    n = len(diff)
    loss = np.logaddexp(0.0, -(diff - margin))  # −log σ(r₊ − r₋ − margin), as the RM stage
    accuracy = (win.sum() + 0.5 * tie.sum()) / n
    lo, hi = common.wilson(win.sum() + 0.5 * tie.sum(), n, float(cfg.eval.confidence))
    longer = np.sign(length[:, 0] - length[:, 1])
    summary = {
        "eval/accuracy": accuracy, "eval/accuracy_ci_low": lo, "eval/accuracy_ci_high": hi, "eval/pairs": n,
        "eval/wins": int(win.sum()), "eval/ties": int(tie.sum()), "eval/losses": int(n - win.sum() - tie.sum()),
        "eval/tie_fraction": tie.mean(), "eval/loss": loss.mean(), "eval/margin": diff.mean(),
        "eval/margin_normalized": gain * diff.mean(), "eval/reward_chosen": raw[chosen].mean(),
        "eval/reward_rejected": raw[rejected].mean(),
        "eval/length_baseline_accuracy": float(np.mean((longer > 0) + 0.5 * (longer == 0))),
        "eval/rows_skipped": ds.report.num_skipped, "eval/truncated": ds.report.truncated, "format": ds.format,
    }
    # Buckets by the mean token length of the pair's two responses (EOS included).
    labels = bucket_labels(edges)
    bucket = np.searchsorted(np.asarray(edges), length.mean(axis=1), side="right")
    bucket_rows = []
    for k, label in enumerate(labels):
        sel = bucket == k
        m = int(sel.sum())
        acc = float((win[sel].sum() + 0.5 * tie[sel].sum()) / m) if m else None
        summary[f"eval/bucket_{label}/pairs"] = m
        summary[f"eval/bucket_{label}/accuracy"] = acc
        bucket_rows.append((label, m, acc, int(tie[sel].sum()), float(diff[sel].mean()) if m else None))

    with (workdir / "pairs.jsonl").open("w") as f:
        for i in range(n):
            f.write(json.dumps({"group_row": int(rows[i]) + 1, "chosen_score": float(raw[chosen[i]]),
                                "rejected_score": float(raw[rejected[i]]), "outcome": "win" if win[i] else
                                "tie" if tie[i] else "loss", "chosen_tokens": int(length[i, 0]),
                                "rejected_tokens": int(length[i, 1])}) + "\n")
    text = "\n\n".join([
        f"RM accuracy of `{common.spec_label(spec)}` on `{cfg.data.path}` ({ds.format} format)",
        common.markdown_table(
            ("pairs", "accuracy", f"{float(cfg.eval.confidence):.0%} CI", "wins", "ties", "losses", "loss",
             "mean margin", "length baseline"),
            [(n, accuracy, f"{lo:.3f}-{hi:.3f}", int(win.sum()), int(tie.sum()), int(n - win.sum() - tie.sum()),
              loss.mean(), diff.mean(), summary["eval/length_baseline_accuracy"])]),
        "By mean response length (tokens):",
        common.markdown_table(("length", "pairs", "accuracy", "ties", "mean margin"), bucket_rows),
    ])
    return summary, text
