"""The config-driven training loop of the pretraining, SFT, reward-model and DPO stages: `run(config, workdir)`.

A run writes `config.json`, `metrics.jsonl`, `tensorboard/`, `checkpoints/`, `model/` (a
Hugging Face directory with its tokenizer) and `summary.json`; restarted with the same
workdir it resumes from the latest checkpoint, and since the data order is a pure function
of (seed, step) it sees exactly the batches an uninterrupted run would. Pretraining streams
packed text blocks instead; their position is saved with every checkpoint (`train/pretrain.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from rlhf_jax import data as data_lib
from rlhf_jax import dpo, optim, reward_model, sft
from rlhf_jax.models import ModelDef, count, load_model, lora, save_pretrained, to_host
from rlhf_jax.train import pretrain as pretrain_lib
from rlhf_jax.train import step as step_lib
from rlhf_jax.train.checkpoint import Checkpointer, resume
from rlhf_jax.train.logging import MetricWriter, last_values, write_json_atomic
from rlhf_jax.train.runtime import Runtime


# --------------------------------------------------------------------------- stages
@dataclasses.dataclass
class Stage:
    """What differs between the stages (pretraining, SFT, reward modelling, DPO)."""

    heads: tuple[str, ...]
    build_data: Callable  # (config, tokenizer) -> (train Dataset, eval Dataset | None)
    batch_kwargs: Callable  # (config) -> kwargs of data.batches for one micro-batch
    loss_fn: Callable  # (config) -> loss(model, micro_batch) -> (sum, normaliser, stats)
    finalize: Callable | None = None
    after_training: Callable | None = None  # (config, StageRun) -> extra summary
    scoring: Callable | None = None  # (config, StageRun) -> scoring settings saved with the model (the RM's)
    # (config, Runtime, model_def, params, frozen, train, eval) -> (frozen, train, eval), before
    # the state is built: DPO's reference (extra frozen arrays, or log-probs stored with the data).
    setup: Callable | None = None
    # Streamed data (pretraining) instead of data.batches over examples:
    stream: Callable | None = None  # (StageRun, start micro-batch, saved state | None) -> iterator with .state()
    eval_stream: Callable | None = None  # (StageRun) -> held-out micro-batches
    num_batches: Callable | None = None  # (config, train data) -> micro-batches per epoch


def _train_and_held_out(cfg, load: Callable):
    """`data.eval_path` if given, else a split of `data.eval_fraction` of the prompts (never
    splitting one prompt's pairs)."""
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


def _dpo_data(cfg, tokenizer):
    return _train_and_held_out(cfg, lambda path: data_lib.preference_dataset(
        path, tokenizer, max_responses=cfg.dpo.max_responses, max_pairs=cfg.dpo.max_pairs,
        **_common_data_kwargs(cfg)))


def _raw_scores_program(model_def: ModelDef, state, batch):
    return reward_model.batch_raw_scores(model_def.merge(state.params, state.frozen), batch)


def _rm_after_training(cfg, r: "StageRun") -> dict:
    """Normalise the RM so its scores on the held-out chosen and rejected responses (the
    reference responses) have mean 0 and std 1; gain and bias are saved with the model."""
    if not cfg.rm.normalize:
        return {}
    score = jax.jit(functools.partial(_raw_scores_program, r.model_def))
    scores = []
    for batch in r.batches(r.eval_data or r.train_data, shuffle=False, drop_last=False):
        keys = [k for k in ("input_ids", "attention_mask", "segment_ids", "response_row", "response_end")
                if k in batch]
        s = to_host(score(r.state, dict(zip(keys, r.rt.to_global([batch[k] for k in keys])))))
        scores.append(s[reward_model.responses_in(batch)])  # not the unused response slots
    gain, bias = reward_model.normalisation(np.concatenate(scores))
    frozen = dict(r.state.frozen, reward_gain=jnp.asarray(gain, jnp.float32),
                  reward_bias=jnp.asarray(bias, jnp.float32))
    r.state = r.state.replace(frozen=jax.device_put(frozen, {k: v.sharding for k, v in r.state.frozen.items()}))
    return {"rm/gain": gain, "rm/bias": bias}


STAGES: dict[str, Stage] = {
    "pretrain": Stage(
        heads=("lm",),
        build_data=pretrain_lib.pretrain_data,
        batch_kwargs=lambda cfg: dict(batch_size=cfg.train.batch_size),
        loss_fn=lambda cfg: sft.sft_loss,  # loss_mask is all ones: every token but a block's first
        finalize=sft.finalize_sft_metrics,
        after_training=pretrain_lib.unigram_baseline,
        stream=pretrain_lib.train_stream,
        eval_stream=pretrain_lib.eval_stream,
        num_batches=pretrain_lib.num_batches,
    ),
    "sft": Stage(
        heads=("lm",),
        build_data=_sft_data,
        batch_kwargs=lambda cfg: dict(batch_size=cfg.train.batch_size, pack=bool(cfg.data.get("packing", False)),
                                      pad_to_multiple_of=int(cfg.data.get("pad_to_multiple_of", 0))),
        loss_fn=lambda cfg: sft.sft_loss,
        finalize=sft.finalize_sft_metrics,
    ),
    "rm": Stage(
        heads=("reward",),
        build_data=_rm_data,
        batch_kwargs=reward_model.batch_kwargs,
        loss_fn=lambda cfg: functools.partial(reward_model.rm_loss, center_rewards_coef=cfg.rm.center_rewards_coef),
        after_training=_rm_after_training,
        scoring=lambda cfg, r: reward_model.scoring_settings(
            max_length=cfg.data.max_length, max_prompt_length=cfg.data.get("max_prompt_length") or None,
            format=r.train_data.format),
    ),
    "dpo": Stage(
        heads=("lm",),
        build_data=_dpo_data,
        batch_kwargs=dpo.batch_kwargs,
        loss_fn=dpo.loss_fn,
        setup=dpo.setup_reference,
    ),
}


# --------------------------------------------------------------------------- the run
def _stack(micro_batches: list[dict]) -> dict:
    return {k: np.stack([b[k] for b in micro_batches]) for k in micro_batches[0]}


@dataclasses.dataclass
class StageRun:
    """Everything a running SFT/RM/DPO stage holds: data, state and its compiled steps."""

    cfg: Any
    stage: Stage
    rt: Runtime
    tokenizer: Any
    train_data: data_lib.Dataset
    eval_data: data_lib.Dataset | None
    model_def: ModelDef
    state: step_lib.TrainState
    num_steps: int
    train_step: Callable = None
    eval_step: Callable = None
    data_state: dict | None = None  # a streamed stage's saved position to resume from
    train_iter: Any = None  # the streamed stage's current train iterator

    def batches(self, dataset, **kw):
        """Micro-batches of this process, sized by the stage's batch fields (packed preference
        rows in a multiple of the batch shards, so that they split evenly over the mesh)."""
        kwargs = self.stage.batch_kwargs(self.cfg)
        if kwargs.get("pack") and dataset.kind == "preference":
            kwargs["row_multiple"] = self.rt.packed_rows_multiple(kwargs.get("row_multiple", 1))
        return data_lib.batches(dataset, process_index=jax.process_index(), process_count=jax.process_count(),
                                **kwargs, **kw)

    def stacked_batches(self, start_step: int, data_state: dict | None = None):
        """Train batches [A, micro, ...] from `start_step` on (A = gradient accumulation)."""
        accum = int(self.cfg.train.grad_accum)
        if self.stage.stream is not None:
            it = self.train_iter = self.stage.stream(self, start_step * accum, data_state)
        else:
            it = self.batches(self.train_data, seed=self.cfg.seed, start_step=start_step * accum, num_epochs=None,
                              grad_accum=accum)
        while True:
            yield _stack([next(it) for _ in range(accum)])

    def compile(self, tx, schedule) -> None:
        """The jitted train and eval steps, with shardings from the runtime's rules."""
        loss_fn = self.stage.loss_fn(self.cfg)
        example = next(self.stacked_batches(0))
        self.train_step = step_lib.jit_step(
            step_lib.make_train_step(self.model_def, tx, loss_fn, schedule, self.stage.finalize), self.state,
            self.rt.batch_shardings(example), self.rt.mesh)
        self.eval_step = step_lib.jit_eval_step(step_lib.make_eval_step(self.model_def, loss_fn), self.state,
                                                self.rt.batch_shardings(example), self.rt.mesh)

    def eval_batches(self):
        """Held-out micro-batches in order, the last one padded."""
        if self.stage.eval_stream is not None:
            return self.stage.eval_stream(self)
        return self.batches(self.eval_data, shuffle=False, drop_last=False)

    def save(self, ckpt: Checkpointer, step: int, force: bool = False) -> None:
        """A checkpoint of the state, and a streamed stage's data position with it."""
        ckpt.save(step, self.state, force=force)
        if self.stage.stream is not None and self.rt.is_main:
            pretrain_lib.save_data_state(self.rt.workdir, step, self.train_iter.state())

    def evaluate(self) -> dict:
        if self.eval_data is None:
            return {}
        outs = []
        for b in self.eval_batches():
            outs.append(self.eval_step(self.state, dict(zip(b, self.rt.to_global([v[None] for v in b.values()],
                                                                                  stacked=True)))))
            if self.cfg.train.eval_batches and len(outs) >= self.cfg.train.eval_batches:
                break
        return {f"eval/{k}": v for k, v in step_lib.finish_eval(jax.device_get(outs), self.stage.finalize).items()}


def _check_padding(cfg) -> None:
    packing, multiple = cfg.data.get("packing", False), cfg.data.get("pad_to_multiple_of", 0)
    if packing and cfg.stage not in ("sft", "rm", "dpo"):
        raise ValueError(f"data.packing=True packs SFT examples and RM/DPO responses; stage={cfg.stage!r} does not "
                         "pack (set data.pad_to_multiple_of to trim its padding instead)")
    rows = cfg.data.get("packed_rows_multiple", 1)
    if not isinstance(rows, int) or rows < 1:
        raise ValueError(f"data.packed_rows_multiple={rows!r}: use a positive integer (packed RM/DPO batches are "
                         "rounded up to a multiple of this many rows)")
    if not isinstance(multiple, int) or multiple < 0 or (packing and multiple):
        raise ValueError(f"data.pad_to_multiple_of={multiple!r}: use 0 (pad to data.max_length) or a positive "
                         "multiple such as 64, and not with data.packing (packed rows are full)")


def build(cfg, workdir) -> tuple[StageRun, Any]:
    """Loads the model and data of `cfg.stage`, splits the trainable parameters, and builds
    the state; returns (run, optimizer)."""
    if cfg.stage not in STAGES:
        raise ValueError(f"stage={cfg.stage!r} is not one of {sorted(STAGES)} (PPO is run by its own stage)")
    stage = STAGES[cfg.stage]
    _check_padding(cfg)
    rt = Runtime(cfg, workdir)
    model, tokenizer = load_model(cfg.model, heads=stage.heads, tokenizer=cfg.tokenizer, mesh=rt.mesh, rules=rt.rules,
                                  seed=cfg.seed)
    train_data, eval_data = stage.build_data(cfg, tokenizer)
    accum = int(cfg.train.grad_accum)
    per_epoch = (stage.num_batches(cfg, train_data) if stage.num_batches else
                 data_lib.num_batches(train_data, seed=cfg.seed, **stage.batch_kwargs(cfg))) // accum
    num_steps = int(cfg.train.num_steps) or per_epoch * int(cfg.train.num_epochs)
    if num_steps <= 0:
        raise ValueError(f"train.num_steps resolves to {num_steps}: {len(train_data)} examples give "
                         f"{per_epoch} steps per epoch")
    tx, schedule = optim.make_optimizer(cfg.optimizer, num_steps)
    model_def, params, frozen = lora.split_trainable(model, cfg.train.trainable)  # LoRA: adapters and heads
    if stage.setup is not None:
        frozen, train_data, eval_data = stage.setup(cfg, rt, model_def, params, frozen, train_data, eval_data)
    state = step_lib.init_state(params, frozen, tx, rt.mesh)
    r = StageRun(cfg, stage, rt, tokenizer, train_data, eval_data, model_def, state, num_steps)
    r.compile(tx, schedule)
    return r, tx


class _Throughput:
    """Tokens per second between logged steps; metrics are read back one step late, so
    dispatch stays asynchronous and the interval ends when a step's metrics arrive."""

    def __init__(self, start: int):
        self.cum_tokens = {start: 0}  # tokens dispatched up to each step
        self.last_step, self.last_time = start, time.perf_counter()

    def dispatched(self, done: int, tokens: int) -> None:
        self.cum_tokens[done] = self.cum_tokens[done - 1] + tokens

    def read(self, done: int) -> float:
        now = time.perf_counter()
        rate = (self.cum_tokens[done] - self.cum_tokens[self.last_step]) / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = done, now
        return rate

    def pause_ended(self) -> None:
        self.last_time = time.perf_counter()  # evaluation time is not training throughput


def train(r: StageRun, start: int, ckpt: Checkpointer, writer: MetricWriter, bar) -> dict:
    """Steps `start` .. num_steps with logging, evaluation and checkpoints; the last rows."""
    cfg, last = r.cfg, {}
    throughput, pending = _Throughput(start), None

    def flush(step_done: int, metrics) -> None:
        row = {f"train/{k}": v for k, v in jax.device_get(metrics).items()}  # waits for that step
        row["train/tokens_per_second"] = throughput.read(step_done)
        last.update(writer.write(step_done, row))
        if bar is not None:
            bar.set_postfix(loss=f"{row['train/loss']:.4f}", tok_s=f"{row['train/tokens_per_second']:.0f}")

    batches = r.stacked_batches(start, r.data_state)
    for step in range(start, r.num_steps):
        batch, done = next(batches), step + 1
        throughput.dispatched(done, int(batch["attention_mask"].sum()) * jax.process_count())
        r.state, metrics = r.train_step(r.state, dict(zip(batch, r.rt.to_global(batch.values(), stacked=True))))
        if pending is not None:
            flush(*pending)
            pending = None
        if done % cfg.train.log_every == 0 or done == r.num_steps:
            pending = (done, metrics)
        if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != r.num_steps:
            if pending is not None:  # close the throughput interval before the evaluation
                flush(*pending)
                pending = None
            last.update(writer.write(done, r.evaluate()))
            throughput.pause_ended()
        if cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0:
            r.save(ckpt, done)
        if bar is not None:
            bar.update(1)
    if pending is not None:
        flush(*pending)
    return last


def run(cfg, workdir) -> dict:
    """Trains the stage `cfg.stage` ('pretrain', 'sft', 'rm' or 'dpo') and returns the summary dict."""
    r, _ = build(cfg, workdir)
    ckpt = Checkpointer(r.rt.workdir / "checkpoints", keep=cfg.train.keep_checkpoints,
                        async_save=cfg.train.async_checkpointing)
    r.state, start = resume(ckpt, r.state, r.rt.workdir)
    r.data_state = pretrain_lib.load_data_state(r.rt.workdir, start) if start and r.stage.stream else None
    writer = MetricWriter(r.rt.workdir, tensorboard=cfg.train.tensorboard)
    n_params = count(r.state.params)
    if r.rt.is_main:
        print(f"stage={cfg.stage} steps={r.num_steps} trainable={n_params:,} frozen={count(r.state.frozen):,} "
              f"mesh={dict(r.rt.mesh.shape)} devices={jax.device_count()} processes={jax.process_count()}")
    bar = (tqdm(total=r.num_steps, initial=start, desc=cfg.stage, dynamic_ncols=True)
           if r.rt.is_main and cfg.train.progress_bar else None)
    if start == 0 and cfg.train.eval_every and cfg.train.get("eval_at_start", True):
        writer.write(0, r.evaluate())  # the baseline every later evaluation is compared with
    last = train(r, start, ckpt, writer, bar)
    if bar is not None:
        bar.close()
    final_eval = r.evaluate()
    if final_eval:
        last.update(writer.write(r.num_steps, final_eval))
    if ckpt.latest_step() != r.num_steps:
        r.save(ckpt, r.num_steps, force=True)
    ckpt.close()
    extra = r.stage.after_training(cfg, r) if r.stage.after_training else {}
    save_pretrained(r.model_def.merge(r.state.params, r.state.frozen), r.rt.workdir / "model", tokenizer=r.tokenizer,
                    scoring=r.stage.scoring(cfg, r) if r.stage.scoring else None)
    writer.close()
    # The whole history (a resumed run's earlier processes too), then this process's last rows.
    summary = {**last_values(r.rt.workdir), **{k: v for k, v in last.items() if k != "step"}}
    summary["seconds"] = summary.pop("time/seconds", None)
    summary.update(extra)
    summary.update({"stage": cfg.stage, "steps": r.num_steps, "trainable_params": n_params,
                    "train_examples": len(r.train_data),
                    "eval_examples": 0 if r.eval_data is None else len(r.eval_data),
                    "skipped_rows": dict(getattr(r.train_data.report, "skipped", {}) or {}),
                    "dropped_pairs": dict(getattr(r.train_data.report, "dropped_pairs", {}) or {})})
    if r.rt.is_main:
        write_json_atomic(r.rt.workdir / "summary.json", summary)
    return summary
