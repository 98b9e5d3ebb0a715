"""The whole RLHF loop: [pretrain →] SFT → (collect comparisons → label → RM → PPO) × rounds → evaluation.

    python -m rlhf_jax.main --config experiments/quickstart.py --workdir runs/quickstart

Layout of the workdir:
  data/            the task's demonstrations and prompts (built in: nothing is downloaded)
  pretrain/        with `cfg.pretrain` (a configs/pretrain.py config): stage 0, SFT's starting model
  sft/             the SFT run (a stage workdir: metrics, checkpoints, model/)
  comparisons/     the comparison store of every round (rlhf_jax.feedback.ComparisonStore)
  round_N/         preferences.jsonl (all comparisons so far), rm/ and ppo/ stage workdirs
  ppo_curves.png   the last PPO run's curves
  round_N/ppo_ptx/ with `cfg.ptx.coef` > 0, the last round's PPO again with PPO-ptx
  summary.json     gold score of the SFT and PPO policies, RM accuracy, KL, and the alignment
                   tax: held-out LM loss on SFT demonstrations (and on pretraining text) per model

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
from rlhf_jax.feedback import ComparisonStore
from rlhf_jax.fileio import atomic_write_text
from rlhf_jax.feedback.collect import collect_comparisons, generate_texts
from rlhf_jax.feedback.labelers import GoldLabeler, label_store
from rlhf_jax.feedback.rm_labeler import RMLabeler
from rlhf_jax.ppo.trainer import run_ppo
from rlhf_jax.tasks import get_task
from rlhf_jax.train.logging import read_metrics, write_json_atomic
from rlhf_jax.models import load_tokenizer_of
from rlhf_jax.train.loop import STAGES
from rlhf_jax.train.loop import run as run_stage


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


def gold_eval(task, policy_dir: Path, prompts: list[str], cfg, seed: int) -> float:
    """Mean gold score of the policy's samples on held-out prompts."""
    texts = generate_texts(policy_dir, prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                           seed=seed, batch_size=cfg.batch_size)
    return float(np.mean(task.gold_batch(prompts, texts)))


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


def _label(cfg, task, store: ComparisonStore, ids: list[str]) -> None:
    kind = cfg.labeler.kind
    if kind == "gold":
        label_store(store, GoldLabeler(task.gold, noise=cfg.labeler.noise, seed=cfg.seed, name="simulated-gold"))
    elif kind == "rm":
        label_store(store, RMLabeler(cfg.labeler.rm_path, noise=cfg.labeler.noise, seed=cfg.seed))
    elif kind == "human":
        _wait_for_labels(store, ids, cfg.labeler.wait_timeout_s, cfg.labeler.poll_s)
    else:
        raise ValueError(f"labeler.kind={kind!r} is not one of 'gold', 'rm', 'human'")


def _round(cfg, rnd: int, workdir: Path, store: ComparisonStore, task, policy: Path, sft_model: Path,
           train_prompts: list[str], prompts_file: Path) -> tuple[dict, dict, Path]:
    """One round: collect from `policy`, label, retrain the RM on every comparison so far,
    PPO from `policy`; returns (RM summary, PPO summary, PPO workdir)."""
    rd = workdir / f"round_{rnd}"
    start = (rnd - 1) * cfg.collect.num_prompts % max(len(train_prompts), 1)
    round_prompts = [train_prompts[(start + i) % len(train_prompts)] for i in range(cfg.collect.num_prompts)]
    ids = collect_comparisons(store, policy, round_prompts, num_responses=cfg.collect.num_responses,
                              max_new_tokens=cfg.collect.max_new_tokens, temperature=cfg.collect.temperature,
                              seed=cfg.seed + rnd, batch_size=cfg.collect.batch_size, meta={"round": rnd})
    _label(cfg, task, store, ids)
    prefs = rd / "preferences.jsonl"
    rd.mkdir(parents=True, exist_ok=True)
    store.export_preferences(prefs)  # every comparison so far: the RM is retrained on all of them
    rm_summary = _stage(_with(cfg.rm, cfg, **{"data.path": str(prefs), "model.init": "pretrained",
                                              "model.path": str(sft_model)}), rd / "rm", run_stage)
    ppo_dir = rd / "ppo"
    ppo_summary = _ppo(cfg, ppo_dir, policy, sft_model, prompts_file)
    return rm_summary, ppo_summary, ppo_dir


def _ppo(cfg, ppo_dir: Path, policy: Path, sft_model: Path, prompts_file: Path, **fields) -> dict:
    """PPO from `policy` against the round's RM (`ppo_dir`'s sibling rm/), KL to the SFT model."""
    rm_model = ppo_dir.parent / "rm" / "model"
    return _stage(_with(cfg.ppo, cfg, **{"data.path": str(prompts_file), "model.init": "pretrained",
                                         "model.path": str(policy), "reward.rm_path": str(rm_model),
                                         "ppo.reference_path": str(sft_model), **fields}), ppo_dir, run_ppo)


def _ptx_fields(cfg, workdir: Path) -> dict:
    """PPO-ptx settings: pretraining text (the pretrain stage's corpus, its held-out split kept
    out) or a fresh draw of the task's demonstrations (not the SFT model's held-out ones)."""
    p = cfg.ptx
    if p.format == "pretrain":
        data = cfg.pretrain.data
        extra = {"ppo.ptx_data": data.path, "ppo.ptx_eval_fraction": data.eval_fraction,
                 "data.split_seed": data.split_seed, "data.max_length": data.max_length}
    else:
        task = get_task(cfg.task)
        path = _write_jsonl(workdir / "data" / "ptx_demonstrations.jsonl",
                            task.demonstrations(cfg.data.num_demos, seed=cfg.seed + 1))
        extra = {"ppo.ptx_data": str(path)}
    return {"ppo.ptx_coef": float(p.coef), "ppo.ptx_format": p.format, "ppo.ptx_batch_size": int(p.batch_size),
            **extra}


def alignment_tax(cfg, models: dict[str, Path], demos: Path) -> dict:
    """{model name: {"demo_loss", "text_loss"}}: per-token held-out LM loss of each model on the
    SFT stage's held-out demonstrations and, with a pretrain stage, its held-out text blocks."""
    tok = load_tokenizer_of(dict(init="pretrained", path=str(next(iter(models.values())))))
    size = int(cfg.eval.lm_batch_size)
    held_demos = STAGES["sft"].build_data(_with(cfg.sft, cfg, **{"data.path": str(demos)}), tok)[1]
    sets = {"demo_loss": eval_lm.demo_batches(held_demos, size)}
    if cfg.get("pretrain"):
        pre = _with(cfg.pretrain, cfg)
        held_text = STAGES["pretrain"].build_data(pre, tok)[1]
        blocks = eval_lm.text_batches(held_text, tok, int(pre.data.max_length), size)
        sets["text_loss"] = blocks[:cfg.eval.lm_batches or None]
    return {name: {k: eval_lm.lm_loss(path, b)["loss"] for k, b in sets.items()} for name, path in models.items()}


def _tax_table(summary: dict) -> list[str]:
    tax, gold = summary["alignment_tax"], summary["gold_scores"]
    text = any("text_loss" in v for v in tax.values())
    lines = ["| model | held-out text loss (nats/token) | held-out demo loss | gold score |",
             "|-------|------:|------:|------:|"]
    for name, v in tax.items():
        t = f"{v['text_loss']:.4f}" if text else "-"
        g = f"{gold[name]:+.3f}" if name in gold else ""
        lines.append(f"| {name} | {t} | {v['demo_loss']:.4f} | {g} |")
    return lines


def _report(summary: dict, plot) -> None:
    table = [("policy", "gold score", "RM accuracy", "KL to SFT (nats)"),
             ("SFT", f"{summary['gold_score_sft']:+.3f}", "", "0"),
             ("PPO", f"{summary['gold_score_ppo']:+.3f}",
              f"{summary['rm_eval_accuracy']:.3f}" if summary["rm_eval_accuracy"] else "-",
              f"{summary['ppo_kl_final']:.2f}" if summary["ppo_kl_final"] is not None else "-")]
    print()
    for row in table:
        print(f"| {row[0]:<6} | {row[1]:>10} | {row[2]:>11} | {row[3]:>16} |")
    print("\nalignment tax:\n" + "\n".join(_tax_table(summary)))
    print(f"\n{summary['comparisons']} comparisons, {summary['labels']} labels, {summary['seconds']:.0f} s; "
          f"curves: {plot}")


def run_rlhf(cfg: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(workdir / "config.json", cfg.to_dict())
    task = get_task(cfg.task)
    t_start = time.time()
    data = workdir / "data"  # the task's data, built in
    demos = _write_jsonl(data / "demonstrations.jsonl", task.demonstrations(cfg.data.num_demos, seed=cfg.seed))
    train_prompts = task.prompts(cfg.data.num_train_prompts)
    eval_prompts = task.prompts(cfg.data.num_eval_prompts, offset=cfg.data.num_train_prompts)
    prompts_file = _write_jsonl(data / "prompts.jsonl", [{"prompt": p} for p in train_prompts])

    models: dict[str, Path] = {}
    sft_fields = {"data.path": str(demos)}
    if cfg.get("pretrain"):
        _stage(_with(cfg.pretrain, cfg), workdir / "pretrain", run_stage)
        models["pretrain"] = workdir / "pretrain" / "model"
        sft_fields.update({"model.init": "pretrained", "model.path": str(models["pretrain"])})
    sft_dir = workdir / "sft"
    _stage(_with(cfg.sft, cfg, **sft_fields), sft_dir, run_stage)
    sft_model = policy = models["SFT"] = sft_dir / "model"
    store = ComparisonStore(workdir / "comparisons")
    rm_summary, ppo_summary, ppo_dir = {}, {}, None
    for rnd in range(1, cfg.rounds + 1):
        rm_summary, ppo_summary, ppo_dir = _round(cfg, rnd, workdir, store, task, policy, sft_model, train_prompts,
                                                  prompts_file)
        start_policy, policy = policy, ppo_dir / "model"
    if ppo_dir is not None:
        models["PPO"] = policy
    if ppo_dir is not None and cfg.get("ptx") and cfg.ptx.coef > 0:
        ptx_dir = ppo_dir.parent / "ppo_ptx"
        _ppo(cfg, ptx_dir, start_policy, sft_model, prompts_file, **_ptx_fields(cfg, workdir))
        models["PPO-ptx"] = ptx_dir / "model"

    print("[rlhf] evaluating the policies with the gold scorer and the held-out LM loss ...")
    gold = {name: gold_eval(task, models[name], eval_prompts, cfg.eval, cfg.seed)
            for name in ("SFT", "PPO", "PPO-ptx") if name in models}
    gold_sft, gold_ppo = gold["SFT"], gold.get("PPO", gold["SFT"])
    tax = alignment_tax(cfg, models, demos)
    plot = plot_ppo(ppo_dir, workdir / "ppo_curves.png") if ppo_dir is not None else None
    summary = {
        "task": task.name, "rounds": cfg.rounds, "gold_score_sft": gold_sft, "gold_score_ppo": gold_ppo,
        "gold_improvement": gold_ppo - gold_sft, "rm_eval_accuracy": rm_summary.get("eval/accuracy"),
        "ppo_kl_final": ppo_summary.get("ppo/kl"), "ppo_rm_score_first": ppo_summary.get("ppo/score_first"),
        "ppo_rm_score_last": ppo_summary.get("ppo/score_last"), "comparisons": len(store.items()),
        "labels": len(store.labels()), "seconds": time.time() - t_start, "plot": str(plot) if plot else None,
        "gold_scores": gold, "alignment_tax": tax,
    }
    write_json_atomic(workdir / "summary.json", summary)
    _report(summary, plot)
    return summary
