"""Best-of-n curves: the proxy-RM and gold score of the best of n samples, n = 1, 2, 4, …, with
the analytic KL log n − (n − 1)/n (`ppo.advantages.best_of_n_kl`).

N = max(n) samples are drawn per prompt once; the score of best-of-n for every n <= N is the
unbiased estimate over all n-subsets of them (Nakano et al. 2021; Gao et al. 2022): with the
samples ranked by proxy score, the one at rank i (1 = lowest) is the best of a random n-subset
with probability C(i − 1, n − 1) / C(N, n). Ties go to the earlier sample, as in
`best_of_n.best_of_n`, so n = N is exactly its argmax and n = 1 is the mean over all samples:
plain sampling. `kl_plugin` is `best_of_n.plugin_kl` of the first n samples' proxy scores.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from rlhf_jax.best_of_n import plugin_kl
from rlhf_jax.eval import common
from rlhf_jax.feedback.collect import generate_texts
from rlhf_jax.models import load_tokenizer_of
from rlhf_jax.ppo.advantages import best_of_n_kl


def rank_weights(num: int, n: int) -> np.ndarray:
    """[num] probability that the sample of ascending rank i is the best of a random n-subset."""
    if not 1 <= n <= num:
        raise ValueError(f"best-of-n: n={n} must be in [1, {num}] (the samples drawn per prompt)")
    total = math.comb(num, n)
    return np.asarray([math.comb(i, n - 1) / total for i in range(num)], np.float64)


def expected_best(proxy_GxN: np.ndarray, others: dict[str, np.ndarray], n: int) -> dict[str, float]:
    """Mean over prompts of E[score of the best of n] for the proxy and each of `others` [G, N]
    (scores of the same samples), the best chosen by the proxy (ties: the earlier sample)."""
    proxy_GxN = np.asarray(proxy_GxN, np.float64)
    g, num = proxy_GxN.shape
    w = rank_weights(num, n)
    # Ascending by proxy; among ties the earlier sample ranks higher (it wins the argmax).
    order = np.lexsort((-np.arange(num)[None, :].repeat(g, 0), proxy_GxN), axis=-1)
    out = {"proxy": float(np.mean(np.take_along_axis(proxy_GxN, order, -1) @ w))}
    for name, s in others.items():
        out[name] = float(np.mean(np.take_along_axis(np.asarray(s, np.float64), order, -1) @ w))
    return out


def curve(proxy_GxN: np.ndarray, gold_GxN: np.ndarray | None, ns) -> list[dict]:
    """One point per n: n, proxy, gold (None without a gold scorer), kl_analytic, sqrt_kl, kl_plugin."""
    points = []
    for n in ns:
        est = expected_best(proxy_GxN, {} if gold_GxN is None else {"gold": gold_GxN}, int(n))
        kl = best_of_n_kl(int(n))
        points.append({"n": int(n), "proxy": est["proxy"], "gold": est.get("gold"), "kl_analytic": kl,
                       "sqrt_kl": math.sqrt(kl), "kl_plugin": plugin_kl(np.asarray(proxy_GxN)[:, :int(n)])})
    return points


def check_ns(cfg) -> tuple[int, ...]:
    ns = tuple(cfg.eval.ns)
    common.check(len(ns) > 0 and all(isinstance(n, int) and n >= 1 for n in ns) and list(ns) == sorted(set(ns)),
                 "eval.ns", cfg.eval.ns, "must be increasing integers >= 1, e.g. (1, 2, 4, 8, 16)")
    return ns


def sample_and_score(cfg, spec, prompts: list[str], num: int, proxy: common.Judge, gold: common.Judge | None, mesh):
    """(texts [G·num], proxy [G, num], gold [G, num] or None) of `num` samples per prompt."""
    texts = generate_texts(spec, prompts, num_samples=num, seed=int(cfg.seed), mesh=mesh, **common.generate_kwargs(cfg))
    repeated = [p for p in prompts for _ in range(num)]
    proxy_s = common.score(proxy, repeated, texts).reshape(len(prompts), num)
    gold_s = None if gold is None else common.score(gold, repeated, texts).reshape(len(prompts), num)
    return texts, proxy_s, gold_s


def curve_rows(points: list[dict]) -> list[tuple]:
    return [(p["n"], p["kl_analytic"], p["sqrt_kl"], p["kl_plugin"], p["proxy"], p["gold"]) for p in points]


CURVE_HEADER = ("n", "KL analytic (nats)", "√KL", "KL plug-in", "proxy RM", "gold")


def plot(points: list[dict], out: Path, title: str) -> Path:
    plt = common.matplotlib_pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ns = [p["n"] for p in points]
    for key, label in (("proxy", "proxy RM"), ("gold", "gold")):
        if points[0][key] is None:
            continue
        ys = [p[key] for p in points]
        axes[0].plot(ns, ys, "o-", label=label)
        axes[1].plot([p["sqrt_kl"] for p in points], ys, "o-", label=label)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xticks(ns, [str(n) for n in ns])
    axes[0].minorticks_off()
    axes[0].set_xlabel("n")
    axes[1].set_xlabel("√KL (nats^½), analytic")
    for ax in axes:
        ax.set_ylabel("score of the best of n")
        ax.grid(alpha=0.3)
        ax.legend()
    return common.save_figure(fig, out, title)


def run(cfg, workdir: Path) -> tuple[dict, str]:
    ns = check_ns(cfg)
    mesh = common.make_mesh(cfg)
    spec = common.model_spec(cfg)
    tok = load_tokenizer_of(spec)
    common.sampling_config(cfg, tok, need_temperature=True)
    common.check(bool(cfg.eval.rm_path), "eval.rm_path", cfg.eval.rm_path,
                 "set it to the reward model that picks the best sample (a stage's workdir/model)")
    proxy = common.rm_judge(cfg.eval.rm_path, "eval.rm_path", cfg, mesh)
    gold = common.gold_judge(cfg, mesh)
    prompts = common.prompts(cfg, tok, gold)
    num = ns[-1]
    texts, proxy_s, gold_s = sample_and_score(cfg, spec, prompts, num, proxy, gold, mesh)
    points = curve(proxy_s, gold_s, ns)
    with (workdir / "samples.jsonl").open("w") as f:
        for k, t in enumerate(texts):
            g, i = divmod(k, num)
            f.write(json.dumps({"prompt": prompts[g], "sample": i, "response": t, "proxy": float(proxy_s[g, i]),
                                "gold": None if gold_s is None else float(gold_s[g, i])}) + "\n")
    png = plot(points, workdir / "best_of_n.png", f"best-of-n of {common.spec_label(spec)}")
    summary = {"eval/prompts": len(prompts), "eval/samples_per_prompt": num, "best_of_n": points,
               "plot": str(png)}
    for p in points:
        summary[f"eval/best_of_{p['n']}/proxy"] = p["proxy"]
        if p["gold"] is not None:
            summary[f"eval/best_of_{p['n']}/gold"] = p["gold"]
    text = "\n\n".join([
        f"Best-of-n of `{common.spec_label(spec)}` on {len(prompts)} prompts ({num} samples each), picked by "
        f"`{proxy.name}`, gold: {gold.name if gold else 'none'}",
        common.markdown_table(CURVE_HEADER, curve_rows(points)), f"Plot: {png.name}"])
    return summary, text
