"""Per-policy statistics on a prompts file: KL to a reference policy (k1 and k3, per token and
per sequence), response length, how often responses stop, distinct-1/2, and optionally the
mean RM and gold score. One row per policy: `model.path`, then each of `eval.policies`.

The KL is estimated on the policy's own samples, both log-probs at the sampling temperature
(log softmax(logits / T)), as PPO's `ppo/kl`: k1 = log π − log π_ref (unbiased, can be
negative) and k3 = (r − 1) − log r with r = π_ref/π (unbiased, >= 0; `ppo.core`). Per
sequence: the sum over the response's tokens, averaged over responses; per token: the sum
over all responses divided by their token count. With top_k / top_p the log-probs are of
the untruncated distribution (as PPO's).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rlhf_jax.eval import common
from rlhf_jax.ppo.core import kl_k1, kl_k3


def kl_stats(logp: list[np.ndarray], ref_logp: list[np.ndarray]) -> dict:
    """k1 and k3 per sequence (mean of sums) and per token (sum / tokens) of responses whose
    tokens have log-probs `logp` under the policy and `ref_logp` under the reference."""
    a = np.concatenate([np.asarray(x, np.float64) for x in logp])
    b = np.concatenate([np.asarray(x, np.float64) for x in ref_logp])
    ends = np.cumsum([len(x) for x in logp])[:-1]
    out = {}
    for name, fn in (("k1", kl_k1), ("k3", kl_k3)):
        per_token = np.asarray(fn(a, b), np.float64)
        out[f"kl_{name}_seq"] = float(np.mean([x.sum() for x in np.split(per_token, ends)]))
        out[f"kl_{name}_token"] = float(per_token.sum() / max(len(per_token), 1))
    return out


def describe(sampled: common.Sampled) -> dict:
    return {"length": float(sampled.lengths.mean()), "stopped": float(sampled.stopped.mean()),
            "distinct_1": common.distinct_n(sampled.texts, 1), "distinct_2": common.distinct_n(sampled.texts, 2)}


COLUMNS = (("kl_k1_token", "k1/token"), ("kl_k3_token", "k3/token"), ("kl_k1_seq", "k1/seq"),
           ("kl_k3_seq", "k3/seq"), ("length", "length"), ("stopped", "stopped"), ("distinct_1", "distinct-1"),
           ("distinct_2", "distinct-2"), ("rm", "RM score"), ("gold", "gold"))


def run(cfg, workdir: Path) -> tuple[dict, str]:
    mesh = common.make_mesh(cfg)
    specs = [(common.spec_label(s), s) for s in [common.model_spec(cfg)]]
    for i, p in enumerate(cfg.eval.policies):
        specs.append((p, common.model_path(p, f"eval.policies[{i}]")))
    k = common.positive_int(cfg, "eval.num_samples")
    kw = common.generate_kwargs(cfg)
    reference = None
    if cfg.eval.reference_path:
        reference = common.Policy.load(common.model_path(cfg.eval.reference_path, "eval.reference_path"),
                                       cfg.eval.reference_path, mesh)
    rm = common.rm_judge(cfg.eval.rm_path, "eval.rm_path", cfg, mesh) if cfg.eval.rm_path else None
    gold = common.gold_judge(cfg, mesh)
    summary: dict = {"policies": []}
    prompts = None
    samples_file = (workdir / "samples.jsonl").open("w")
    for label, spec in specs:
        policy = common.Policy.load(spec, label, mesh, seed=int(cfg.seed))
        sampling = common.sampling_config(cfg, policy.tokenizer, need_temperature=reference is not None)
        if prompts is None:
            prompts = common.prompts(cfg, policy.tokenizer, gold)
        sampled = common.sample(policy, prompts, sampling, seed=int(cfg.seed), batch_size=kw["batch_size"],
                                max_prompt_length=kw["max_prompt_length"], mesh=mesh, num_samples=k)
        row = {"policy": label, **describe(sampled)}
        if reference is not None:
            common.check_same_vocab(policy, reference, "eval.reference_path")
            ref_lp = common.other_logprobs(sampled, reference, sampling.temperature, mesh)
            row.update(kl_stats(sampled.logprobs, ref_lp))
        repeated = [prompts[g] for g in sampled.prompt_index]
        scores = {}
        for name, judge in (("rm", rm), ("gold", gold)):
            if judge is not None:
                scores[name] = common.score(judge, repeated, sampled.texts)
                row[name] = float(scores[name].mean())
        for i, t in enumerate(sampled.texts):
            samples_file.write(json.dumps({"policy": label, "prompt": repeated[i], "response": t,
                                           "tokens": int(sampled.lengths[i]), "stopped": bool(sampled.stopped[i]),
                                           **{n: float(s[i]) for n, s in scores.items()}}) + "\n")
        summary["policies"].append(row)
    samples_file.close()
    first = summary["policies"][0]
    summary.update({f"eval/{key}": v for key, v in first.items() if key != "policy"})
    summary["eval/prompts"] = len(prompts)
    summary["eval/samples_per_prompt"] = k
    columns = [(key, name) for key, name in COLUMNS if key in first]
    text = "\n\n".join([
        f"Policy statistics on {len(prompts)} prompts × {k} samples (T = {float(cfg.sampling.temperature)}, "
        f"{int(cfg.sampling.max_new_tokens)} new tokens at most); KL (nats) to "
        f"{'`' + cfg.eval.reference_path + '`' if reference is not None else 'no reference (eval.reference_path)'}",
        common.markdown_table(("policy", *[name for _, name in columns]),
                              [(r["policy"], *[r.get(key) for key, _ in columns]) for r in summary["policies"]])])
    return summary, text
