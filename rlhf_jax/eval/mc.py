"""Multiple-choice log-likelihood scoring, TruthfulQA style (MC1 and MC2), on a local file.

The file (.json list or .jsonl, anything `data.load_records` reads) has one question per row,
in either layout:

  {"question": str, "choices": [str, ...], "labels": [1, 0, ...]}
  {"question": str, "mc1_targets": {"choices": [...], "labels": [...]},
                    "mc2_targets": {"choices": [...], "labels": [...]}}   (TruthfulQA's own)

Labels are 1 (true) or 0 (false), one per choice, at least one true. The flat layout gives
both scores over the same choices; in TruthfulQA's layout MC1 reads `mc1_targets` and MC2
`mc2_targets`, and a row may have only one of them.

Every choice is scored by the sum of its tokens' log-probabilities after the prompt
`eval.template` with `{question}` filled in, the text before `{answer}` as context and the
choice (with the whitespace before `{answer}` and any text after it) as continuation:
"Q: {question}\\nA: {answer}" scores " <choice>" after "Q: <question>\\nA:". MC1: 1 when the
most likely choice is a true one. MC2: the probability mass of the true choices, normalised
over all choices, Σ_true p / Σ p with p = exp(log-likelihood) (Lin et al. 2022).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from rlhf_jax import data as data_lib
from rlhf_jax.data.records import LoadReport, RowProblem, check_on_bad_row, load_records
from rlhf_jax.eval import common


@dataclasses.dataclass(frozen=True)
class Question:
    question: str
    mc1: tuple[tuple[str, ...], tuple[int, ...]] | None  # (choices, labels)
    mc2: tuple[tuple[str, ...], tuple[int, ...]] | None
    row: int


def _targets(value, field: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    if not isinstance(value, dict):
        raise RowProblem("wrong_type", field, f"expected {{'choices': [...], 'labels': [...]}}, got {value!r:.60}")
    return _choices(value.get("choices"), value.get("labels"), f"{field}.choices", f"{field}.labels")


def _choices(choices, labels, cfield: str, lfield: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip()
                                                                   for c in choices):
        raise RowProblem("wrong_type", cfield, f"expected a list of at least 2 non-empty strings, got {choices!r:.60}")
    if not isinstance(labels, list) or len(labels) != len(choices) or not all(
            isinstance(v, (bool, int)) and int(v) in (0, 1) for v in labels):
        raise RowProblem("wrong_type", lfield, f"expected {len(choices)} labels, each 1 (true) or 0 (false), "
                         f"got {labels!r:.60}")
    if not any(int(v) for v in labels):
        raise RowProblem("no_true_choice", lfield, "no choice is labelled 1 (true)")
    return tuple(choices), tuple(int(v) for v in labels)


def parse_row(row: dict, index: int) -> Question:
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise RowProblem("missing_field", "question", f"expected a non-empty string, got {question!r:.60}")
    if row.get("choices") is not None or row.get("labels") is not None:
        both = _choices(row.get("choices"), row.get("labels"), "choices", "labels")
        return Question(question, both, both, index)
    mc1 = _targets(row["mc1_targets"], "mc1_targets") if row.get("mc1_targets") is not None else None
    mc2 = _targets(row["mc2_targets"], "mc2_targets") if row.get("mc2_targets") is not None else None
    if mc1 is None and mc2 is None:
        raise RowProblem("missing_field", "choices", "expected 'choices' and 'labels', or TruthfulQA's "
                         "'mc1_targets' / 'mc2_targets'")
    return Question(question, mc1, mc2, index)


def load_questions(path, on_bad_row: str = "error") -> tuple[list[Question], LoadReport]:
    """The questions of a file (the module docstring's layouts); bad rows raise `BadRowError`
    naming file, row and field, or are skipped and counted with on_bad_row='skip'."""
    check_on_bad_row(on_bad_row)
    records = load_records(path)
    report = LoadReport(source=records.source, format="mc", rows=len(records.rows))
    out = []
    for i, row in enumerate(records.rows):
        try:
            out.append(parse_row(row, i))
        except RowProblem as problem:
            report.bad_row(records, i, problem, on_bad_row)
    report.kept = len(out)
    return out, report


def split_template(template: str) -> tuple[str, str]:
    """(context template, continuation template): the whitespace before {answer} goes with the answer."""
    if template.count("{answer}") != 1 or "{question}" not in template.split("{answer}")[0]:
        raise ValueError(f"eval.template={template!r}: needs {{question}} and then {{answer}} once, e.g. "
                         f"'Q: {{question}}\\nA: {{answer}}'")
    before, after = template.split("{answer}")
    context = before.rstrip()
    return context, before[len(context):] + "{answer}" + after


def mc_scores(ll: list[float], labels: tuple[int, ...]) -> tuple[float, float]:
    """(MC1, MC2) of one question from its choices' log-likelihoods."""
    ll_arr = np.asarray(ll, np.float64)
    lab = np.asarray(labels, bool)
    mc1 = float(lab[int(np.argmax(ll_arr))])
    p = np.exp(ll_arr - ll_arr.max())
    return mc1, float(p[lab].sum() / p.sum())


def loglikelihoods(policy: common.Policy, pairs: list[tuple[str, str]], *, max_context: int, batch_size: int,
                   mesh) -> np.ndarray:
    """Σ log p(continuation tokens | [BOS] context) per (context, continuation) [N]; the
    context is cut from the left to `max_context` tokens (0 = no cap)."""
    tok = policy.tokenizer
    texts = list(dict.fromkeys(t for pair in pairs for t in pair))
    ids = dict(zip(texts, tok(texts, add_special_tokens=False)["input_ids"]))
    bos = tok.bos_token_id
    ctx, cont = [], []
    for c, a in pairs:
        c_ids = list(ids[c])
        if bos is not None and (not c_ids or c_ids[0] != bos):
            c_ids = [bos] + c_ids
        if max_context and len(c_ids) > max_context:
            c_ids = c_ids[len(c_ids) - max_context:]
        if not ids[a]:
            raise ValueError(f"choice {a!r} has no token")
        ctx.append(np.asarray(c_ids, np.int32))
        cont.append(list(ids[a]))
    q = -(-max(len(c) for c in ctx) // 8) * 8
    r = -(-max(len(a) for a in cont) // 8) * 8
    program = common.logprob_program(policy.model_def, mesh, 1.0)
    b = common.batch_rows(mesh, batch_size)
    out = np.zeros(len(pairs), np.float64)
    pad = tok.pad_token_id
    for start in range(0, len(pairs), b):
        idx = list(range(start, min(start + b, len(pairs))))
        full = idx + [idx[-1]] * (b - len(idx))
        q_ids, q_mask = data_lib.left_pad([ctx[i] for i in full], q, pad)
        r_ids = np.full((b, r), pad, np.int32)
        r_mask = np.zeros((b, r), np.int32)
        for j, i in enumerate(full):
            r_ids[j, :len(cont[i])] = cont[i]
            r_mask[j, :len(cont[i])] = 1
        lp = common.response_logprobs(program, policy.params, q_ids, q_mask, r_ids, r_mask, mesh)
        out[start:start + len(idx)] = lp.sum(-1)[:len(idx)]
    return out


def evaluate(policy: common.Policy, questions: list[Question], template: str, *, max_context: int, batch_size: int,
             mesh) -> tuple[dict, list[dict]]:
    """{"mc1", "mc2", "mc1_questions", "mc2_questions"} and one record per question."""
    context_t, answer_t = split_template(template)
    pairs, where = [], []
    for qi, q in enumerate(questions):
        context = context_t.format(question=q.question)
        for target in ("mc1", "mc2"):
            sel = getattr(q, target)
            if sel is None:
                continue
            for ci, choice in enumerate(sel[0]):
                pairs.append((context, answer_t.format(answer=choice)))
                where.append((qi, target, ci))
    ll = loglikelihoods(policy, pairs, max_context=max_context, batch_size=batch_size, mesh=mesh)
    per_q: list[dict] = [{"row": q.row + 1, "question": q.question} for q in questions]
    for (qi, target, _), v in zip(where, ll):
        per_q[qi].setdefault(f"{target}_loglikelihoods", []).append(float(v))
    mc1, mc2 = [], []
    for q, rec in zip(questions, per_q):
        if q.mc1 is not None:
            rec["mc1"] = mc_scores(rec["mc1_loglikelihoods"], q.mc1[1])[0]
            mc1.append(rec["mc1"])
        if q.mc2 is not None:
            rec["mc2"] = mc_scores(rec["mc2_loglikelihoods"], q.mc2[1])[1]
            mc2.append(rec["mc2"])
    return {"mc1": float(np.mean(mc1)) if mc1 else None, "mc2": float(np.mean(mc2)) if mc2 else None,
            "mc1_questions": len(mc1), "mc2_questions": len(mc2)}, per_q


def run(cfg, workdir: Path) -> tuple[dict, str]:
    common.check(bool(cfg.data.path), "data.path", cfg.data.path, "set it to a multiple-choice questions file "
                 "(docs/EVAL.md: {question, choices, labels} or TruthfulQA's mc1_targets/mc2_targets)")
    common.check(cfg.data.max_prompt_length >= 0, "data.max_prompt_length", cfg.data.max_prompt_length,
                 "must be >= 0 (0 = no cap on the question's tokens)")
    split_template(cfg.eval.template)
    batch_size = common.positive_int(cfg, "eval.batch_size")
    questions, report = load_questions(cfg.data.path, cfg.data.on_bad_row)
    if not questions:
        raise ValueError(f"data.path={cfg.data.path!r}: no usable question ({report.rows} rows, "
                         f"skipped {report.skipped or 'none'})")
    mesh = common.make_mesh(cfg)
    specs = [(common.spec_label(s), s) for s in [common.model_spec(cfg)]]
    specs += [(p, common.model_path(p, f"eval.policies[{i}]")) for i, p in enumerate(cfg.eval.policies)]
    rows = []
    with (workdir / "questions.jsonl").open("w") as f:
        for label, spec in specs:
            policy = common.Policy.load(spec, label, mesh, seed=int(cfg.seed))
            res, per_q = evaluate(policy, questions, cfg.eval.template, max_context=int(cfg.data.max_prompt_length),
                                  batch_size=batch_size, mesh=mesh)
            rows.append({"policy": label, **res})
            for rec in per_q:
                f.write(json.dumps({"policy": label, **rec}) + "\n")
    summary = {"policies": rows, "eval/questions": len(questions), "eval/rows_skipped": report.num_skipped,
               **{f"eval/{k}": v for k, v in rows[0].items() if k != "policy"}}
    text = "\n\n".join([
        f"Multiple choice on `{cfg.data.path}` ({len(questions)} questions), template {cfg.eval.template!r}",
        common.markdown_table(("policy", "MC1", "MC2", "MC1 questions", "MC2 questions"),
                              [(r["policy"], r["mc1"], r["mc2"], r["mc1_questions"], r["mc2_questions"])
                               for r in rows])])
    return summary, text
