"""Reward over-optimisation (Gao et al. 2022): the gold and the proxy score against √KL from the
initial policy, for best-of-n from the initial policy and for the checkpoints of a PPO, RLOO or
GRPO run, with a plot.

The run is a PPO-stage workdir (`eval.run_dir`: its config.json and the Orbax checkpoints in
checkpoints/, which hold the policy's parameters at every saved iteration; keep them all with
--config.train.keep_checkpoints=1000 when training). The initial policy is `model.path`, or
the run's own `model` when that is ''; the proxy is `eval.rm_path`, or the run's
`reward.rm_path`; the gold is `eval.gold` (a task, an RM trained on more labels, or a reward
function). Each checkpoint samples the prompts with the same seed; its KL is k1 summed over a
response, averaged (nats per sequence, as `ppo/kl`), at the sampling temperature. Best-of-n
uses the analytic KL log n − (n − 1)/n (`best_of_n_curve`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import orbax.checkpoint as ocp

from rlhf_jax.eval import common
from rlhf_jax.eval.best_of_n_curve import CURVE_HEADER, check_ns, curve, curve_rows, sample_and_score
from rlhf_jax.eval.policy_stats import kl_stats
from rlhf_jax.train.checkpoint import Checkpointer


def run_config(run_dir: str) -> dict:
    """The config a PPO-stage workdir was run with (its config.json)."""
    common.check(bool(run_dir), "eval.run_dir", run_dir, "set it to a PPO / RLOO / GRPO stage workdir (it holds "
                 "config.json and checkpoints/)")
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"eval.run_dir={run_dir!r}: no config.json (expected a PPO stage workdir, e.g. "
                                f"runs/ppo or a pipeline's round_1/ppo)")
    cfg = json.loads(path.read_text())
    if cfg.get("stage") != "ppo":
        raise ValueError(f"eval.run_dir={run_dir!r}: the run is stage {cfg.get('stage')!r}, not a PPO / RLOO / GRPO "
                         f"run (stage 'ppo')")
    if not (Path(run_dir) / "checkpoints").is_dir():
        raise FileNotFoundError(f"eval.run_dir={run_dir!r}: no checkpoints/ folder")
    return cfg


def checkpoint_steps(run_dir: str, steps) -> list[int]:
    """The run's saved iterations (all of them, or those in `steps`, which must exist)."""
    ckpt = Checkpointer(Path(run_dir) / "checkpoints", async_save=False)
    try:
        saved = sorted(int(s) for s in ckpt.manager.all_steps())
    finally:
        ckpt.close()
    if not saved:
        raise FileNotFoundError(f"eval.run_dir={run_dir!r}: checkpoints/ holds no checkpoint")
    if steps:
        missing = sorted(set(steps) - set(saved))
        common.check(not missing, "eval.steps", tuple(steps), f"no checkpoint at iterations {missing}; the run has "
                     f"{saved}")
        saved = [s for s in saved if s in set(steps)]
    return saved


def restore_policy(run_dir: str, step: int) -> dict:
    """The policy's {dotted name: array} at iteration `step`, restored without building the PPO
    state (no target: the arrays as saved). A shared critic's value head is in it too; callers
    keep the names they need."""
    ckpt = Checkpointer(Path(run_dir) / "checkpoints", async_save=False)
    try:
        state = ckpt.manager.restore(step, args=ocp.args.StandardRestore())
    finally:
        ckpt.close()
    return {**state["frozen"]["policy"], **state["params"]["policy"]}


def _policy_params(policy: common.Policy, params: dict, step: int, run_dir: str) -> dict:
    missing = [n for n in policy.model_def.names if n not in params]
    shape = [n for n in policy.model_def.names if n in params and
             tuple(params[n].shape) != tuple(policy.params[n].shape)]
    if missing or shape:
        raise ValueError(f"eval.run_dir={run_dir!r}: the checkpoint at iteration {step} does not fit the initial "
                         f"policy's architecture (missing {missing[:3]}, other shapes {shape[:3]}); set model.path to "
                         f"the run's initial policy")
    return {n: params[n] for n in policy.model_def.names}


def plot(bon: list[dict], rl: list[dict], out: Path, title: str) -> Path:
    plt = common.matplotlib_pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, name in ((axes[0], "gold", "gold score"), (axes[1], "proxy", "proxy RM score")):
        ax.plot([p["sqrt_kl"] for p in bon], [p[key] for p in bon], "o-", label="best-of-n")
        for p in bon:
            ax.annotate(f"n={p['n']}", (p["sqrt_kl"], p[key]), fontsize=7, textcoords="offset points",
                        xytext=(3, 3))
        ax.plot([p["sqrt_kl"] for p in rl], [p[key] for p in rl], "s-", label="RL checkpoints")
        for p in rl:
            ax.annotate(str(p["step"]), (p["sqrt_kl"], p[key]), fontsize=7, textcoords="offset points",
                        xytext=(3, -9))
        ax.set_xlabel("√KL from the initial policy (nats^½)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    return common.save_figure(fig, out, title)


def run(cfg, workdir: Path) -> tuple[dict, str]:
    ns = check_ns(cfg)
    run_cfg = run_config(cfg.eval.run_dir)
    steps = checkpoint_steps(cfg.eval.run_dir, tuple(int(s) for s in cfg.eval.steps))
    mesh = common.make_mesh(cfg)
    if cfg.model.path or cfg.model.init == "gguf":
        spec, seed = common.model_spec(cfg), 0
    else:  # the run's initial policy (a tiny one is rebuilt from the run's seed)
        spec, seed = run_cfg["model"], int(run_cfg.get("seed", 0))
    proxy_path = cfg.eval.rm_path or run_cfg.get("reward", {}).get("rm_path", "")
    common.check(bool(proxy_path), "eval.rm_path", cfg.eval.rm_path,
                 "the run used no RM (reward functions only): set the proxy RM to plot")
    proxy = common.rm_judge(proxy_path, "eval.rm_path" if cfg.eval.rm_path else "the run's reward.rm_path", cfg,
                            mesh)
    gold = common.gold_judge(cfg, mesh)
    common.check(gold is not None, "eval.gold", cfg.eval.gold,
                 "set the gold scorer: a task, an RM trained on more labels, or 'module:function'")
    initial = common.Policy.load(spec, "initial policy", mesh, seed=seed)
    sampling = common.sampling_config(cfg, initial.tokenizer, need_temperature=True)
    prompts = common.prompts(cfg, initial.tokenizer, gold)
    k = common.positive_int(cfg, "eval.num_samples")
    kw = common.generate_kwargs(cfg)

    pair = (initial.model_def.merge(initial.params), initial.tokenizer)
    _, proxy_s, gold_s = sample_and_score(cfg, pair, prompts, ns[-1], proxy, gold, mesh)
    bon = curve(proxy_s, gold_s, ns)

    rl = []
    for step in [0, *steps]:
        params = initial.params if step == 0 else _policy_params(initial, restore_policy(cfg.eval.run_dir, step),
                                                                 step, cfg.eval.run_dir)
        policy = common.Policy(f"iteration {step}", initial.model_def, params, initial.tokenizer)
        sampled = common.sample(policy, prompts, sampling, seed=int(cfg.seed), batch_size=kw["batch_size"],
                                max_prompt_length=kw["max_prompt_length"], mesh=mesh, num_samples=k)
        ref_lp = common.other_logprobs(sampled, initial, sampling.temperature, mesh)
        kl = kl_stats(sampled.logprobs, ref_lp) if step else {"kl_k1_seq": 0.0, "kl_k3_seq": 0.0}
        repeated = [prompts[g] for g in sampled.prompt_index]
        rl.append({"step": step, "kl": kl["kl_k1_seq"], "kl_k3": kl["kl_k3_seq"],
                   "sqrt_kl": math.sqrt(max(kl["kl_k1_seq"], 0.0)),
                   "proxy": float(common.score(proxy, repeated, sampled.texts).mean()),
                   "gold": float(common.score(gold, repeated, sampled.texts).mean()),
                   "length": float(sampled.lengths.mean())})

    png = plot(bon, rl, workdir / "overoptimisation.png", f"over-optimisation: {cfg.eval.run_dir}")
    best = max(rl, key=lambda p: p["gold"])
    summary = {
        "best_of_n": bon, "rl": rl, "plot": str(png), "eval/prompts": len(prompts),
        "eval/rl_gold_final": rl[-1]["gold"], "eval/rl_proxy_final": rl[-1]["proxy"], "eval/rl_kl_final": rl[-1]["kl"],
        "eval/rl_gold_max": best["gold"], "eval/rl_gold_max_step": best["step"],
        "eval/best_of_n_gold_max": max(p["gold"] for p in bon), "eval/initial_gold": rl[0]["gold"],
    }
    text = "\n\n".join([
        f"Over-optimisation of `{cfg.eval.run_dir}`: proxy `{proxy.name}`, gold `{gold.name}`, {len(prompts)} "
        f"prompts",
        "Best-of-n from the initial policy:", common.markdown_table(CURVE_HEADER, curve_rows(bon)),
        "RL checkpoints (iteration 0: the initial policy; KL k1, nats per sequence):",
        common.markdown_table(("iteration", "KL", "√KL", "KL k3", "proxy RM", "gold", "length"),
                              [(p["step"], p["kl"], p["sqrt_kl"], p["kl_k3"], p["proxy"], p["gold"], p["length"])
                               for p in rl]),
        f"Plot: {png.name}"])
    return summary, text
