"""The PPO stage's loop: `run_ppo(config, workdir)`. Each iteration samples responses, scores
them, and runs the jitted update; metrics go to metrics.jsonl and TensorBoard, samples to
samples.jsonl every `ppo.sample_every` iterations, and checkpoints hold the whole state
(parameters, optimizer, β, key), so a killed run resumes. The policy is saved as `model/`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from tqdm import tqdm

from rlhf_jax import data as data_lib
from rlhf_jax import reward_functions as reward_functions_lib
from rlhf_jax.models import count, save_pretrained, to_host
from rlhf_jax.ppo import core
from rlhf_jax.ppo.setup import PPOSetup, build
from rlhf_jax.ppo.step import Rollout, ppo_rollout_key
from rlhf_jax.sampling import response_text
from rlhf_jax.train import pretrain as pretrain_lib
from rlhf_jax.train.checkpoint import Checkpointer, resume
from rlhf_jax.train.logging import MetricWriter, read_metrics, write_json_atomic


def _texts(s: PPOSetup, index, samples) -> tuple[list[str], list[str]]:
    """The prompts (as written) and the decoded responses of a rollout batch."""
    idx = to_host(index)
    prompts = [s.prompts.examples[i].prompt if i >= 0 else "" for i in idx.tolist()]
    toks, lens, stopped = to_host(samples.tokens), to_host(samples.lengths), to_host(samples.stopped)
    return prompts, [response_text(s.models.tokenizer, t, n, st) for t, n, st in zip(toks, lens, stopped)]


def rollout(s: PPOSetup, batch: dict, it: int, want_text: bool):
    """Samples and scores one batch of prompts: (Rollout, extra metrics, texts or None)."""
    qi, qm, index = s.rt.to_global([batch["input_ids"], batch["attention_mask"], batch["index"]])
    key = ppo_rollout_key(jax.random.wrap_key_data(s.state.key), it)
    samples = s.generate({**s.state.params["policy"], **s.state.frozen["policy"]}, qi, qm, key)
    logp, ref_logp, values, rm_scores = s.score(s.state, qi, qm, samples.tokens, samples.mask)
    texts = _texts(s, index, samples) if want_text or s.reward_fns or s.models.rm_text else None
    b, extra = int(s.cfg.ppo.batch_size), {}
    rm_np = np.zeros(b, np.float32)
    if s.models.rm_params is not None:
        rm_np = s.models.rm_text(list(zip(*texts))) if s.models.rm_text else to_host(rm_scores)
        extra["rm_score"] = float(rm_np.mean())
    fn_np = np.zeros(b, np.float32)
    if s.reward_fns:
        fn_np = reward_functions_lib.evaluate(s.reward_fns, s.fn_weights, *texts)
        extra["function_score"] = float(fn_np.mean())
    stopped = to_host(samples.stopped)
    p = s.cfg.ppo
    scores = np.asarray(core.final_scores(rm_np, fn_np, stopped, rm_weight=float(s.cfg.reward.rm_weight),
                                          missing_eos_penalty=p.missing_eos_penalty if p.penalize_missing_eos else None))
    scores_g = jax.make_array_from_callback(scores.shape, s.rt.batch_sharding(1), lambda i: scores[i])
    extra.update(frac_hit_length_limit=float(1.0 - stopped.mean()), sampling_steps=int(samples.num_steps))
    return (Rollout(query_ids=qi, query_mask=qm, response_ids=samples.tokens, response_mask=samples.mask,
                    logprobs=logp, ref_logprobs=ref_logp, values=values, scores=scores_g), extra, texts, scores)


def _repeated(batches, k: int):
    """Each prompt row k times in a row (prompt-major), for the k samples of RLOO / GRPO."""
    for batch in batches:
        yield {name: np.repeat(v, k, axis=0) for name, v in batch.items()} if k > 1 else batch


def _iterators(s: PPOSetup, start: int):
    """Prompt batches of ppo.batch_size sequences (batch_size / k prompts, each repeated k
    times) and PPO-ptx batches."""
    pi, pc = jax.process_index(), jax.process_count()
    k = s.hp.samples_per_prompt
    prompts = data_lib.batches(s.prompts, batch_size=int(s.cfg.ppo.batch_size) // k, seed=s.cfg.seed,
                               start_step=start, num_epochs=None, process_index=pi, process_count=pc)
    prompts = _repeated(prompts, k)
    ptx = None
    if isinstance(s.ptx_data, pretrain_lib.Corpus):
        size = int(s.cfg.ppo.ptx_batch_size)
        ptx = pretrain_lib.ptx_stream(s.ptx_data, size, s.cfg.seed, start * s.steps_per_update * size)
    elif s.ptx_data is not None:
        ptx = data_lib.batches(s.ptx_data, batch_size=int(s.cfg.ppo.ptx_batch_size), seed=s.cfg.seed,
                               start_step=start * s.steps_per_update, num_epochs=None, process_index=pi,
                               process_count=pc)
    return prompts, ptx


def _ptx_batch(s: PPOSetup, ptx_it):
    """E·M SFT batches (or pretraining blocks) stacked [E·M, b, T] for PPO-ptx, or None."""
    if ptx_it is None:
        return None
    stacked = {k: np.stack([v[k] for v in (next(ptx_it) for _ in range(s.steps_per_update))])
               for k in ("input_ids", "attention_mask", "loss_mask")}
    return dict(zip(stacked, s.rt.to_global(stacked.values(), stacked=True)))


def run_ppo(cfg, workdir: str | Path, reward_functions: Sequence = ()) -> dict:
    """Runs PPO; `reward_functions` adds Python callables to those the config names."""
    s = build(cfg, workdir, reward_functions)
    num_updates, p = int(cfg.ppo.num_updates), cfg.ppo
    ckpt = Checkpointer(s.rt.workdir / "checkpoints", keep=cfg.train.keep_checkpoints,
                        async_save=cfg.train.async_checkpointing)
    s.state, start = resume(ckpt, s.state, s.rt.workdir, unit="PPO iteration")
    prompt_it, ptx_it = _iterators(s, start)
    writer = MetricWriter(s.rt.workdir, tensorboard=cfg.train.tensorboard)
    if s.rt.is_main:
        print(f"stage=ppo iterations={num_updates} advantage={s.hp.advantage} k={s.hp.samples_per_prompt} "
              f"policy trainable={count(s.state.params['policy']):,} frozen={count(s.state.frozen['policy']):,} "
              f"critic={s.hp.critic if s.hp.uses_critic else 'none'} rm={'yes' if s.models.rm_params is not None else 'no'} "
              f"reward_functions={len(s.reward_fns)} mesh={dict(s.rt.mesh.shape)} devices={jax.device_count()} "
              f"processes={jax.process_count()}")
    bar = tqdm(total=num_updates, initial=start, desc="ppo", dynamic_ncols=True) if (
        s.rt.is_main and cfg.train.progress_bar) else None
    history: list[dict] = []
    for it in range(start, num_updates):
        t0, done = time.perf_counter(), it + 1
        show = bool(p.sample_every) and done % p.sample_every == 0
        ro, extra, texts, scores = rollout(s, next(prompt_it), it, want_text=show)
        s.state, metrics = s.update(s.state, ro, _ptx_batch(s, ptx_it))
        row = {f"ppo/{k}": v for k, v in {**jax.device_get(metrics), **extra}.items()}
        row["ppo/seconds_per_iteration"] = time.perf_counter() - t0
        history.append(writer.write(done, row))
        if show and s.rt.is_main:
            _log_samples(s.rt.workdir, done, *texts, scores, int(p.num_samples_shown))
        if cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0:
            ckpt.save(done, s.state)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(score=f"{row['ppo/score']:.3f}", kl=f"{row['ppo/kl']:.3f}", beta=f"{row['ppo/beta']:.3f}")
    if bar is not None:
        bar.close()
    if ckpt.latest_step() != num_updates:
        ckpt.save(num_updates, s.state, force=True)
    ckpt.close()
    writer.close()
    policy = s.models.defs["policy"].merge(s.state.params["policy"], s.state.frozen["policy"])
    save_pretrained(policy, s.rt.workdir / "model", tokenizer=s.models.tokenizer)
    return _summary(s, history, num_updates)


def _summary(s: PPOSetup, history: list[dict], num_updates: int) -> dict:
    """The last row and the mean score of the first and last fifths, over the whole metrics
    history (a resumed run's earlier processes too; `history` is this process's rows)."""
    history = read_metrics(s.rt.workdir) or history
    summary = {k: v for k, v in (history[-1] if history else {}).items() if k != "step"}
    summary["seconds"] = summary.pop("time/seconds", None)
    if history:
        k = max(1, len(history) // 5)
        summary["ppo/score_first"] = float(np.mean([h["ppo/score"] for h in history[:k]]))
        summary["ppo/score_last"] = float(np.mean([h["ppo/score"] for h in history[-k:]]))
    summary.update({"stage": "ppo", "iterations": num_updates})
    if s.rt.is_main:
        write_json_atomic(s.rt.workdir / "summary.json", summary)
    return summary


def _log_samples(workdir: Path, step: int, prompts, responses, scores, n: int) -> None:
    rows = [{"step": step, "prompt": p, "response": r, "score": float(v)}
            for p, r, v in list(zip(prompts, responses, scores))[:n]]
    with (workdir / "samples.jsonl").open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    width = 60
    print(f"\n--- samples at PPO iteration {step} ---")
    print(f"{'prompt':<{width}} | {'response':<{width}} | score")
    for row in rows:
        prompt = row["prompt"].replace("\n", "\\n")[-width:]
        print(f"{prompt:<{width}} | {row['response'].replace(chr(10), ' ')[:width]:<{width}} | {row['score']:.3f}")
