"""The PPO stage: `run_ppo(config, workdir)`, from a policy checkpoint and a reward model (and/or
reward functions) through the same CLI as SFT and the RM.

Each iteration samples a batch of responses with the compiled sampler, scores them, and runs
`ppo_update`. Logged per iteration (metrics.jsonl, TensorBoard): score, KL (k1 and k3,
sequence sums), β, entropy, approx-KL and clip fraction of the PPO ratio, policy and value
losses, explained variance, response length and the fraction of responses that hit the length
limit; every `ppo.sample_every` iterations a table of generations goes to stdout and
samples.jsonl. Checkpoints (Orbax) hold the whole PPO state (parameters, optimizer, β, key),
so a killed run resumes where its last checkpoint left it. The final policy (LM + value head)
is written to `workdir/model`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from rlhf_jax import data as data_lib
from rlhf_jax import optim, rewards as rewards_lib
from rlhf_jax import sharding as sharding_lib
from rlhf_jax.models import Transformer, load_pretrained, save_pretrained
from rlhf_jax.models.checkpoints import to_host
from rlhf_jax.params import ModelDef, count
from rlhf_jax.ppo.step import PPOHyperparams, PPOState, Rollout, ppo_update, score_rollout
from rlhf_jax.sampling import SamplingConfig, make_generate
from rlhf_jax.train import step as step_lib
from rlhf_jax.train.checkpoint import Checkpointer, resume
from rlhf_jax.train.logging import MetricWriter, write_json_atomic
from rlhf_jax.train.loop import Run, load_model_and_tokenizer, maybe_initialize_distributed

_ROLLOUT_STREAM = 1  # key streams: rollouts fold (stream, step); the update folds the step alone


def hyperparams(cfg) -> PPOHyperparams:
    p = cfg.ppo
    return PPOHyperparams(
        temperature=float(cfg.sampling.temperature), ppo_epochs=int(p.ppo_epochs),
        num_minibatches=int(p.num_minibatches), cliprange=float(p.cliprange),
        cliprange_value=float(p.cliprange_value), vf_coef=float(p.vf_coef), gamma=float(p.gamma), lam=float(p.lam),
        kl_estimator=p.kl_estimator, whiten_rewards=bool(p.whiten_rewards),
        kl_target=float(p.kl_target) if p.kl_target else None, kl_horizon=float(p.kl_horizon),
        ptx_coef=float(p.ptx_coef), critic=p.critic)


def _abstract_def(cfg, heads) -> ModelDef:
    return ModelDef.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), heads=heads)), None)[0]


def _copy(tree):
    """Fresh buffers (the state is donated to the update, the reference must not alias it)."""
    return jax.tree.map(jnp.copy, tree)


def run_ppo(cfg, workdir: str | Path, reward_functions: Sequence = ()) -> dict:
    """Runs PPO; `reward_functions` adds Python callables to those the config names."""
    maybe_initialize_distributed(cfg)
    workdir = Path(workdir)
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(workdir / "config.json", cfg.to_dict())
    r = Run(cfg, workdir)
    hp = hyperparams(cfg)
    p = cfg.ppo
    if p.batch_size % p.num_minibatches:
        raise ValueError(f"ppo.batch_size={p.batch_size} is not divisible by ppo.num_minibatches={p.num_minibatches}")

    # ---------------------------------------------------------------- models
    policy_heads = ("lm", "value") if hp.critic == "shared" else ("lm",)
    policy, tokenizer = load_model_and_tokenizer(cfg.model, cfg.tokenizer, policy_heads, r.mesh, r.rules, cfg.seed)
    policy_def, policy_train, policy_rest = ModelDef.split(policy, cfg.train.trainable)
    if not policy_train:
        raise ValueError(f"train.trainable={cfg.train.trainable!r} matches no parameter")
    policy_all = {**policy_train, **policy_rest}
    # The frozen reference: the initial policy without its value head, or another checkpoint
    # (iterated rounds keep the KL to the SFT model while the policy starts from the last one).
    ref_def = _abstract_def(policy.cfg, ("lm",))
    if p.reference_path:
        ref_model = load_pretrained(p.reference_path, heads=("lm",), mesh=r.mesh, rules=r.rules,
                                    dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype)
        ref_def, ref_params, ref_rest = ModelDef.split(ref_model, None)
        ref_params.update(ref_rest)
        del ref_model
    else:
        ref_params = _copy({n: policy_all[n] for n in ref_def.names})
    del policy

    rm_def, rm_params, rm_text_scorer = None, None, None
    if cfg.reward.rm_path:
        rm = load_pretrained(cfg.reward.rm_path, heads=("reward",), mesh=r.mesh, rules=r.rules)
        rm_def, rm_params, rest = ModelDef.split(rm, None)
        rm_params.update(rest)
        if cfg.reward.rm_tokenizer:
            # The RM reads text, not the policy's tokens: decode, re-encode exactly as the RM's
            # training data was encoded ([BOS] prompt response [EOS]), score.
            from rlhf_jax.feedback.labelers import RMLabeler

            rm_text_scorer = RMLabeler((rm, data_lib.load_tokenizer(cfg.reward.rm_tokenizer)), max_length=int(cfg.reward.rm_max_length),
                                       batch_size=int(p.batch_size))
        del rm
    fns = [rewards_lib.load_reward_function(s) for s in cfg.reward.functions if s] + list(reward_functions)
    weights = list(cfg.reward.function_weights) + [1.0] * (len(fns) - len(cfg.reward.function_weights))
    if rm_def is None and not fns:
        raise ValueError("PPO needs a reward: set reward.rm_path and/or reward.functions")

    defs = {"policy": policy_def}
    params = {"policy": policy_train, "critic": {}}
    frozen = {"policy": policy_rest, "critic": {}}
    if hp.critic == "separate":
        if rm_def is None:
            raise ValueError("ppo.critic='separate' is initialised from the RM: set reward.rm_path")
        critic = load_pretrained(cfg.reward.rm_path, heads=("value",), mesh=r.mesh, rules=r.rules)
        critic_def, critic_train, critic_rest = ModelDef.split(critic, ".*")
        # TRL's choice: the value head starts as the RM's score head.
        critic_train["value_head.kernel"] = _copy(rm_params["reward_head.kernel"])
        critic_train["value_head.bias"] = _copy(rm_params["reward_head.bias"])
        defs["critic"] = critic_def
        params["critic"], frozen["critic"] = critic_train, critic_rest
        del critic

    # ---------------------------------------------------------------- data
    prompts = data_lib.prompt_dataset(cfg.data.path, tokenizer, format=cfg.data.format,
                                      max_prompt_length=cfg.data.max_prompt_length, on_bad_row=cfg.data.on_bad_row)
    ptx_data = None
    if hp.ptx_coef > 0:
        if not p.ptx_data:
            raise ValueError("ppo.ptx_coef > 0 needs ppo.ptx_data (an SFT dataset)")
        ptx_data = data_lib.sft_dataset(p.ptx_data, tokenizer, max_length=cfg.data.max_length,
                                        on_bad_row=cfg.data.on_bad_row)

    # ---------------------------------------------------------------- state and programs
    steps_per_update = hp.ppo_epochs * hp.num_minibatches
    tx, _ = optim.make_optimizer(cfg.optimizer, int(p.num_updates) * steps_per_update)
    state = PPOState(step=step_lib.replicated_scalar(0, jnp.int32, r.mesh), params=params, frozen=frozen,
                     opt_state=step_lib.init_opt_state(tx, params, r.mesh),
                     beta=step_lib.replicated_scalar(p.init_beta, jnp.float32, r.mesh),
                     key=jax.device_put(jax.random.key_data(jax.random.key(cfg.seed)), NamedSharding(r.mesh, P())))
    ckpt = Checkpointer(workdir / "checkpoints", keep=cfg.train.keep_checkpoints,
                        async_save=cfg.train.async_checkpointing)
    state, start = resume(ckpt, state, workdir, unit="PPO iteration")

    stop_ids = tuple(sorted({i for i in (tokenizer.eos_token_id, *cfg.sampling.extra_stop_token_ids) if i is not None}))
    sampling = SamplingConfig(max_new_tokens=int(cfg.sampling.max_new_tokens),
                              temperature=float(cfg.sampling.temperature), top_k=int(cfg.sampling.top_k),
                              top_p=float(cfg.sampling.top_p), stop_token_ids=stop_ids,
                              pad_token_id=int(tokenizer.pad_token_id))
    generate = make_generate(policy_def, r.mesh, sampling, rules=r.rules)

    state_sh = jax.tree.map(lambda x: x.sharding, state)
    batch2 = sharding_lib.batch_sharding(r.mesh, 2, r.rules)
    batch1 = sharding_lib.batch_sharding(r.mesh, 1, r.rules)
    replicated = NamedSharding(r.mesh, P())
    ref_sh = jax.tree.map(lambda x: x.sharding, ref_params)
    rm_sh = jax.tree.map(lambda x: x.sharding, rm_params) if rm_params is not None else None
    token_rm_def = rm_def if rm_text_scorer is None else None  # an RM on text is scored outside the program

    def score_fn(st, ref, rmp, query_ids, query_mask, response_ids, response_mask):
        return score_rollout(defs, ref_def, token_rm_def, hp, st, ref, rmp, query_ids, query_mask, response_ids,
                             response_mask)

    score = jax.jit(score_fn, in_shardings=(state_sh, ref_sh, rm_sh, batch2, batch2, batch2, batch2),
                    out_shardings=(batch2, batch2, batch2, batch1))
    rollout_sh = Rollout(query_ids=batch2, query_mask=batch2, response_ids=batch2, response_mask=batch2,
                         logprobs=batch2, ref_logprobs=batch2, values=batch2, scores=batch1)
    ptx_sh = None
    if ptx_data is not None:
        ptx_sh = {k: NamedSharding(r.mesh, P(None, *sharding_lib.logical_to_spec(("batch",), r.rules), None))
                  for k in ("input_ids", "attention_mask", "loss_mask")}
    update = jax.jit(lambda st, ro, ptx: ppo_update(defs, hp, tx, st, ro, ptx),
                     in_shardings=(state_sh, rollout_sh, ptx_sh), out_shardings=(state_sh, replicated),
                     donate_argnums=(0,))

    pi, pc = jax.process_index(), jax.process_count()
    prompt_it = data_lib.batches(prompts, batch_size=int(p.batch_size), seed=cfg.seed, start_step=start,
                                 num_epochs=None, process_index=pi, process_count=pc)
    ptx_it = None
    if ptx_data is not None:
        ptx_it = data_lib.batches(ptx_data, batch_size=int(p.ptx_batch_size), seed=cfg.seed,
                                  start_step=start * steps_per_update, num_epochs=None, process_index=pi,
                                  process_count=pc)

    writer = MetricWriter(workdir, tensorboard=cfg.train.tensorboard)
    if is_main:
        print(f"stage=ppo iterations={p.num_updates} policy trainable={count(policy_train):,} "
              f"critic={hp.critic} rm={'yes' if rm_def is not None else 'no'} reward_functions={len(fns)} "
              f"mesh={dict(r.mesh.shape)} devices={jax.device_count()} processes={pc}")
    bar = None
    if is_main and cfg.train.progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=int(p.num_updates), initial=start, desc="ppo", dynamic_ncols=True)

    history: list[dict] = []
    for it in range(start, int(p.num_updates)):
        t0 = time.perf_counter()
        batch = next(prompt_it)
        qi, qm, index = r.to_global([batch["input_ids"], batch["attention_mask"], batch["index"]])
        base_key = jax.random.wrap_key_data(state.key)
        key = jax.random.fold_in(jax.random.fold_in(base_key, _ROLLOUT_STREAM), it)
        samples = generate({**state.params["policy"], **state.frozen["policy"]}, qi, qm, key)
        logp, ref_logp, values, rm_scores = score(state, ref_params, rm_params, qi, qm, samples.tokens, samples.mask)

        need_text = bool(fns) or rm_text_scorer is not None or (p.sample_every and (it + 1) % p.sample_every == 0)
        prompt_texts = response_texts = None
        if need_text:
            idx = to_host(index)
            prompt_texts = [prompts.examples[i].prompt if i >= 0 else "" for i in idx.tolist()]
            toks, lens = to_host(samples.tokens), to_host(samples.lengths)
            response_texts = [tokenizer.decode(t[:n], skip_special_tokens=True) for t, n in zip(toks, lens)]
        scores = np.zeros(int(p.batch_size), np.float32)
        extra = {}
        if rm_def is not None:
            if rm_text_scorer is not None:
                rm_np = np.asarray(rm_text_scorer.scores(list(zip(prompt_texts, response_texts))), np.float32)
            else:
                rm_np = to_host(rm_scores)
            scores += float(cfg.reward.rm_weight) * rm_np
            extra["rm_score"] = float(rm_np.mean())
        if fns:
            fn_np = rewards_lib.evaluate(fns, weights, prompt_texts, response_texts)
            scores += fn_np
            extra["function_score"] = float(fn_np.mean())
        stopped = to_host(samples.stopped)
        if p.penalize_missing_eos:  # OpenAI: a response that never stops gets a fixed score
            scores = np.where(stopped, scores, np.float32(p.missing_eos_penalty)).astype(np.float32)
        scores_g = jax.make_array_from_callback(scores.shape, batch1, lambda i: scores[i])
        rollout = Rollout(query_ids=qi, query_mask=qm, response_ids=samples.tokens, response_mask=samples.mask,
                          logprobs=logp, ref_logprobs=ref_logp, values=values, scores=scores_g)
        ptx = None
        if ptx_it is not None:
            ptx_np = {k: np.stack([v[k] for v in (next(ptx_it) for _ in range(steps_per_update))])
                      for k in ("input_ids", "attention_mask", "loss_mask")}
            ptx = dict(zip(ptx_np, r.to_global(ptx_np.values(), stacked=True)))
        state, metrics = update(state, rollout, ptx)
        metrics = {f"ppo/{k}": v for k, v in jax.device_get(metrics).items()}
        metrics.update({f"ppo/{k}": v for k, v in extra.items()})
        metrics["ppo/frac_hit_length_limit"] = float(1.0 - stopped.mean())
        metrics["ppo/sampling_steps"] = int(samples.num_steps)
        metrics["ppo/seconds_per_iteration"] = time.perf_counter() - t0
        done = it + 1
        row = writer.write(done, metrics)
        history.append(row)
        if prompt_texts is not None and p.sample_every and done % p.sample_every == 0:
            _log_samples(workdir, done, prompt_texts, response_texts, scores, int(p.num_samples_shown), is_main)
        if cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0:
            ckpt.save(done, state)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(score=f"{row['ppo/score']:.3f}", kl=f"{row['ppo/kl']:.3f}", beta=f"{row['ppo/beta']:.3f}")
    if bar is not None:
        bar.close()
    if ckpt.latest_step() != int(p.num_updates):
        ckpt.save(int(p.num_updates), state, force=True)
    ckpt.close()
    writer.close()
    final = policy_def.merge(state.params["policy"], state.frozen["policy"])
    save_pretrained(final, workdir / "model", tokenizer=tokenizer)

    summary = {k: v for k, v in (history[-1] if history else {}).items() if k != "step"}
    if history:
        k = max(1, len(history) // 5)
        summary["ppo/score_first"] = float(np.mean([h["ppo/score"] for h in history[:k]]))
        summary["ppo/score_last"] = float(np.mean([h["ppo/score"] for h in history[-k:]]))
    summary.update({"stage": "ppo", "iterations": int(p.num_updates)})
    if is_main:
        write_json_atomic(workdir / "summary.json", summary)
    return summary


def _log_samples(workdir: Path, step: int, prompts, responses, scores, n: int, is_main: bool) -> None:
    if not is_main:
        return
    rows = [{"step": step, "prompt": p, "response": s, "score": float(v)}
            for p, s, v in list(zip(prompts, responses, scores))[:n]]
    with (workdir / "samples.jsonl").open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    width = 60
    print(f"\n--- samples at PPO iteration {step} ---")
    print(f"{'prompt':<{width}} | {'response':<{width}} | score")
    for row in rows:
        short = lambda t: t.replace("\n", "\\n")[-width:]  # noqa: E731
        print(f"{short(row['prompt']):<{width}} | {row['response'].replace(chr(10), ' ')[:width]:<{width}} | "
              f"{row['score']:.3f}")
