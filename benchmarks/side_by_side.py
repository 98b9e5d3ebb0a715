"""Ours (rlhf_jax) vs TRL / PyTorch on this CPU, side by side: SFT, RM and PPO steps and sampling.

Workloads (the same model, weights, data, batch and thread count on both sides):

  sft   one SFT step on the Alpaca sample (../shared/data/alpaca_en_demo.json), batch 8,
        <= 256 tokens: non-pad tokens/s. Theirs twice: TRL `SFTTrainer`, and a plain PyTorch
        loop (AdamW, clipping at 1.0, the masked next-token loss) on exactly our batches.
  rm    one reward-model step on HH pairs (../shared/data/hh_rlhf_harmless_dev.jsonl.gz),
        8 pairs (16 sequences), <= 256 tokens: pairs/s, vs TRL `RewardTrainer`.
  dpo   one DPO step (beta 0.1, the reference = the starting policy, its log-probs computed
        in every step on both sides) on the same HH pairs, 8 pairs, <= 256 tokens: pairs/s,
        vs TRL `DPOTrainer` (given the pairs as text decoded from our tokens; it tokenizes
        them before training).
  ppo   one PPO iteration: 16 prompts (<= 64 tokens), 64 new tokens (temperature 0.7),
        4 PPO epochs of one minibatch, 4 models (policy, reference, reward model, separate
        critic initialised from the RM): seconds per iteration split into generation,
        scoring and optimisation, vs TRL 1.12's `PPOTrainer` (`trl.experimental.ppo`; later
        TRL releases have no PPO trainer). TRL couples its minibatch to
        `gradient_accumulation_steps`; one minibatch of 16 is the setting both run the same.
  gen   sampling (temperature 1, no top-k/top-p, no early stop), 64 prompt tokens + 64 new
        tokens, batch 16 and batch 1: new tokens/s, vs transformers `generate`.

Models: GPT-2-shaped (d256, 4 layers, 4 heads, tied embeddings) and Llama-shaped (d256, 4
layers, 4 query / 2 key-value heads, MLP 1024, untied), vocabulary 50,258 (the GPT-2 BPE in
../shared/data/gpt2_tokenizer plus its added <pad>), random weights, float32. They are built
in transformers, saved, and read by our own loader, so both sides hold the same weights; the
reward model is the same trunk as a transformers sequence classifier with a random score head.

Our side is built through the project's entry points from its stage configs
(configs/sft.py, rm.py, ppo.py, pretrain.py): `rlhf_jax.train.loop.build` (SFT, RM, the
scaling table), `rlhf_jax.ppo.setup.build` + `rlhf_jax.ppo.trainer.rollout` + the compiled
update (PPO), `rlhf_jax.models.load_model` + `rlhf_jax.sampling.make_generate` (sampling).
`--ours-set key=value` (repeatable) sets a field of those configs, e.g.
`--ours-set model.dtype=bfloat16`; `--ours-set sft:data.max_length=512` only in one workload's
config (sft, rm, ppo, gen, scale). A field given without a workload goes to every config
that has it, and one that no config has is an error.

Method: every measurement runs in a fresh subprocess; the sides alternate (ours, theirs,
ours, theirs, ...) for `--repeats` rounds; each subprocess runs `--warmup` untimed steps
(our first step compiles), then `--steps` timed ones; a table cell is the median over all
timed steps of all rounds. Steps are timed end to end, batch fetch included, on both sides
(for the TRL trainers: from one `on_step_end` callback to the next). "first step" is the
first step's time (ours: mostly XLA compilation), reported apart; a timed step whose batch
has a shape not met before (packed RM and DPO batches vary in row count) first runs once
untimed, and those compilations are reported beside the first step ("+k shapes"). By default each side
computes on one thread (`--threads 1`): on this shared 2-core machine 2-thread runs varied
about 10x between identical calls (see BENCHMARKS.md, generation).

Model FLOPs (useful work, the same formula on both sides, from the real tokens of each row,
or of each sequence of a packed row):
a forward pass over a row of t real tokens costs 2*N*t + 4*L*d_attn*t^2 (N: the parameters
in matmuls, i.e. all but the input and position embeddings, with the LM head counted once
even when tied; L layers; d_attn = heads * head_dim; the attention term is QK^T and AV over
the full t x t square, as PaLM counts it). A training step costs 3x its forward. SFT and DPO:
the LM head counted only at the positions the loss reads (the response tokens, counted in
our batches; logits anywhere else are work no loss uses, which our side skips). RM: N
without the LM head (plus its 1-unit head). DPO: training plus the reference's forward.
PPO: generation = the policy's forward over prompt + response; scoring = forwards of the
reference, the reward model and the critic; optimisation = 4 epochs x training of policy +
critic. Sampling: the forward over prompt + new tokens (the prefill included). PPO and
sampling count the LM head at every token, prompts included (an upper bound of the work our
side does). MFU = model FLOP/s over the float32 matmul peak measured
in the same run, in a fresh subprocess on the same threads (the larger of a 2048^3 `jnp.dot`
and `torch.mm`). Pad tokens count for neither side.

Also a scaling table (ours only): the SFT step (`sft_loss`, on packed blocks of Tiny
Shakespeare so rows are full: configs/pretrain.py) as the sequence grows 256 -> 2048 at 2,048
tokens per step, and as the width grows 256 -> 1024; tokens/s and peak RSS of the
subprocess (`resource.getrusage`).

    pip install -e ".[bench]"      # trl==1.12.0 (with accelerate) and the CPU torch 2.13.0
    python benchmarks/side_by_side.py                  # everything (long: ~1 h on 2 cores)
    python benchmarks/side_by_side.py --quick          # a smoke run: GPT-2 shape, 1 round, short
    python benchmarks/side_by_side.py --workloads sft rm --models llama --ours-set model.dtype=bfloat16

The tables are printed and written into BENCHMARKS.md (section `side_by_side`) with the
command, machine, versions, load average before / after and the total duration;
`--no-write` only prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: E402  (before jax: the environment and the thread setting)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"
WORKLOADS = ("sft", "rm", "dpo", "ppo", "gen")
CONFIG_NAMES = ("sft", "rm", "dpo", "ppo", "gen", "scale")
MODELS = ("gpt2", "llama")
VOCAB = 50258
PEAK_N = 2048
RESULT = "SIDE_BY_SIDE_RESULT "


# --------------------------------------------------------------------------- FLOP formulas
@dataclasses.dataclass(frozen=True)
class Shape:
    """What the FLOP count needs of a model: matmul parameters of the trunk (everything but
    the input / position embeddings and the heads), the LM head's, layers and attention width."""

    trunk: int
    lm_head: int
    layers: int
    d_attn: int

    @property
    def lm(self) -> int:
        return self.trunk + self.lm_head


def forward_flops(n_params: int, shape: Shape, lengths) -> float:
    """Forward FLOPs over rows of `lengths` real tokens: sum of 2*N*t + 4*L*d_attn*t^2."""
    return float(sum(2.0 * n_params * t + 4.0 * shape.layers * shape.d_attn * t * t for t in lengths))


def train_flops(n_params: int, shape: Shape, lengths) -> float:
    """A training step (forward + backward) is three forwards."""
    return 3.0 * forward_flops(n_params, shape, lengths)


def lm_train_flops(shape: Shape, lengths, reads: float) -> float:
    """A language-model training step whose loss reads `reads` positions of rows of `lengths`
    real tokens: the trunk over every token, the LM head only where the loss reads it."""
    return 3.0 * (forward_flops(shape.trunk, shape, lengths) + 2.0 * shape.lm_head * reads)


def ppo_flops(shape: Shape, lengths, epochs: int) -> dict[str, float]:
    """Model FLOPs of one PPO iteration with a separate critic, by phase; `lengths` are the
    real prompt + response tokens of each rollout."""
    rm = shape.trunk + 1
    return {"generation": forward_flops(shape.lm, shape, lengths),
            "scoring": forward_flops(shape.lm, shape, lengths) + 2 * forward_flops(rm, shape, lengths),
            "optimisation": epochs * (train_flops(shape.lm, shape, lengths) + train_flops(rm, shape, lengths))}


# --------------------------------------------------------------------------- the models
def hf_config(arch: str, *, hidden: int = 256, layers: int = 4, max_positions: int = 1024):
    import transformers
    ids = dict(bos_token_id=50256, eos_token_id=50256, pad_token_id=50257)
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=hidden // 64,
                                       n_positions=max_positions, **ids)
    if arch == "llama":
        return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                                        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                                        intermediate_size=4 * hidden, max_position_embeddings=max_positions,
                                        tie_word_embeddings=False, **ids)
    raise ValueError(f"--models: unknown model {arch!r} ({', '.join(MODELS)})")


def model_shape(model) -> Shape:
    """The `Shape` of a transformers causal LM (counted from its parameters)."""
    base = model.base_model
    embeddings = {id(model.get_input_embeddings().weight)}
    if hasattr(base, "wpe"):
        embeddings.add(id(base.wpe.weight))
    trunk = sum(p.numel() for p in base.parameters() if id(p) not in embeddings)
    c = model.config
    d_attn = c.num_attention_heads * getattr(c, "head_dim", None) if getattr(c, "head_dim", None) else c.hidden_size
    return Shape(trunk=trunk, lm_head=c.vocab_size * c.hidden_size, layers=c.num_hidden_layers, d_attn=d_attn)


def build_models(arch: str, out: Path, seed: int = 0) -> Shape:
    """A random causal LM at out/lm and the same trunk as a reward model (sequence classifier,
    random score head) at out/rm, each with the GPT-2 tokenizer (+ <pad>)."""
    import torch
    import transformers

    from rlhf_jax.data import load_tokenizer

    torch.manual_seed(seed)
    tok = load_tokenizer(str(SHARED / "gpt2_tokenizer"))
    assert len(tok) == VOCAB, len(tok)
    config = hf_config(arch)
    lm = transformers.AutoModelForCausalLM.from_config(config)
    lm.save_pretrained(out / "lm")
    tok.save_pretrained(out / "lm")
    rm_config = hf_config(arch)
    rm_config.num_labels = 1
    rm = transformers.AutoModelForSequenceClassification.from_config(rm_config)
    rm.base_model.load_state_dict(lm.base_model.state_dict())
    rm.save_pretrained(out / "rm")
    tok.save_pretrained(out / "rm")
    return model_shape(lm)


# --------------------------------------------------------------------------- our configs
def parse_value(text: str):
    """A command-line value: a Python literal when it parses as one (1, 0.5, (1, 2), None),
    true/false as bools, anything else as a string."""
    import ast
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def split_overrides(items: list[str]) -> list[tuple[str | None, str, object]]:
    """`[workload:]dotted.key=value` strings -> (workload or None, key, value)."""
    out = []
    for item in items:
        if "=" not in item:
            raise ValueError(f"--ours-set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        where = None
        if ":" in key:
            where, key = key.split(":", 1)
            if where not in CONFIG_NAMES:
                raise ValueError(f"--ours-set {item!r}: {where!r} is not one of {CONFIG_NAMES}")
        out.append((where, key, parse_value(value)))
    return out


def _has(cfg, key: str) -> bool:
    node = cfg
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True


def apply_overrides(cfg, name: str, overrides) -> list[str]:
    """Sets the overrides meant for config `name` that it has; returns 'key=value' of those set."""
    done = []
    for where, key, value in overrides:
        if where not in (None, name) or not (_has(cfg, key) or where == name):
            continue
        parent, _, leaf = key.rpartition(".")
        node = cfg
        for part in parent.split(".") if parent else ():
            node = node[part]
        if leaf not in node:
            raise ValueError(f"--ours-set {name}:{key}: the {name} config has no field {key}")
        old = node[leaf]
        node[leaf] = float(value) if isinstance(old, float) and isinstance(value, int) else value
        done.append(f"{key}={value!r}")
    return done


def check_overrides(overrides, configs: dict) -> None:
    """Every unqualified override must name a field of at least one config."""
    for where, key, _ in overrides:
        if where is None and not any(_has(c, key) for c in configs.values()):
            raise ValueError(f"--ours-set {key}: no workload config has this field ({', '.join(configs)})")


def our_config(name: str, model_dir: Path | None, opts: dict):
    """The stage config of workload `name` as the benchmark sets it, before overrides."""
    from rlhf_jax.config_lib import load_config
    c = load_config(ROOT / "configs" / {"sft": "sft.py", "rm": "rm.py", "dpo": "dpo.py", "ppo": "ppo.py",
                                        "gen": "ppo.py", "scale": "pretrain.py"}[name])
    if model_dir is not None:
        c.model.init, c.model.path = "pretrained", str(model_dir / "lm")
    c.data.eval_fraction = 0.0
    c.optimizer.warmup_steps = 0  # the schedule does not change the cost; a few steps are run
    c.train.update(dict(num_steps=opts["warmup"] + opts["steps"], progress_bar=False, tensorboard=False,
                        eval_every=0, checkpoint_every=0, async_checkpointing=False))
    if name == "sft":
        c.data.path, c.data.max_length, c.train.batch_size = str(SHARED / "alpaca_en_demo.json"), 256, 8
    elif name == "rm":
        c.data.path, c.data.max_length = str(SHARED / "hh_rlhf_harmless_dev.jsonl.gz"), 256
        c.rm.max_responses, c.rm.max_pairs, c.rm.normalize = 16, 8, False
    elif name == "dpo":
        c.data.path, c.data.max_length = str(SHARED / "hh_rlhf_harmless_dev.jsonl.gz"), 256
        c.dpo.update(dict(max_responses=16, max_pairs=8, beta=0.1, precompute_reference=False, reference_path=""))
    elif name in ("ppo", "gen"):
        c.data.path = str(SHARED / "alpaca_en_demo.json")
        c.reward.rm_path = str(model_dir / "rm")
        c.ppo.update(dict(batch_size=16, num_minibatches=1, ppo_epochs=4, critic="separate",
                          num_updates=opts["warmup"] + opts["steps"], sample_every=0))
        c.data.max_prompt_length = 64
        c.sampling.max_new_tokens = opts["new_tokens"]
        if name == "gen":
            c.sampling.temperature = 1.0
    elif name == "scale":
        c.tokenizer = str(SHARED / "gpt2_tokenizer")
        d, t = opts["hidden"], opts["seq_len"]
        c.model.tiny.update(dict(model_type="llama", hidden_size=d, num_layers=4, num_heads=d // 64,
                                 num_kv_heads=d // 128, head_dim=64, mlp_dim=4 * d, max_position_embeddings=t,
                                 tie_embeddings=False))
        c.data.path, c.data.max_length = str(SHARED / "tinyshakespeare.txt"), t
        c.data.eval_fraction = 0.05
        c.train.batch_size = max(1, opts["tokens_per_step"] // t)
    return c


# --------------------------------------------------------------------------- workers
def _rss_mib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _set_torch_threads(threads: int) -> None:
    import torch
    if threads >= 1:
        torch.set_num_threads(threads)


def _their_batches(spec: dict, n: int) -> list[dict]:
    """The first `n` micro-batches our stage would train on (the same dataset, order and
    padding), read with the stage's own data functions but no model."""
    from rlhf_jax import data as data_lib
    from rlhf_jax.train import loop
    cfg = our_config(spec["workload"], Path(spec["model_dir"]), spec)  # the defaults, not --ours-set
    cfg.data.packing = False  # one sequence per row to hand over; the batches hold the same examples
    tok = data_lib.load_tokenizer(str(Path(spec["model_dir"]) / "lm"))
    stage = loop.STAGES[cfg.stage]
    train, _ = stage.build_data(cfg, tok)
    it = data_lib.batches(train, seed=cfg.seed, num_epochs=None, **stage.batch_kwargs(cfg))
    return [next(it) for _ in range(n)]


def _rows(mask) -> list[int]:
    import numpy as np
    m = np.asarray(mask)
    return [int(x) for x in m.reshape(-1, m.shape[-1]).sum(-1) if x > 0]


def _sequence_lengths(batch: dict) -> list[int]:
    """The real tokens of each sequence of one of our batches: of each row, or of each
    sequence of a packed row (so that attention is counted per sequence, t^2, not per row)."""
    import numpy as np
    if "segment_ids" not in batch:
        return _rows(batch["attention_mask"])
    seg = np.asarray(batch["segment_ids"])
    return [int(n) for row in seg.reshape(-1, seg.shape[-1]) for n in np.bincount(row)[1:] if n > 0]


def worker_ours_train(spec: dict) -> dict:
    """SFT / RM / scaling step through `rlhf_jax.train.loop.build`."""
    import jax
    from rlhf_jax.train import loop
    cfg = our_config(spec["workload"], Path(spec["model_dir"]) if spec.get("model_dir") else None, spec)
    applied = apply_overrides(cfg, spec["workload"], split_overrides(spec["overrides"]))
    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        r, _ = loop.build(cfg, workdir)
        build_s = time.perf_counter() - t0
        batches = r.stacked_batches(0)
        times, rows, units, reads, compiles, shapes = [], [], [], [], [], set()
        for i in range(spec["warmup"] + spec["steps"]):
            t0 = time.perf_counter()
            batch = next(batches)
            if i >= spec["warmup"] and batch["input_ids"].shape not in shapes:
                # Packed RM and DPO batches vary in row count: a count not met yet compiles a
                # program first. That step runs once untimed (and is reported apart) before the timed one.
                r.state, metrics = r.train_step(r.state, dict(zip(batch, r.rt.to_global(batch.values(),
                                                                                          stacked=True))))
                jax.block_until_ready(metrics)
                compiles.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
            shapes.add(batch["input_ids"].shape)
            r.state, metrics = r.train_step(r.state, dict(zip(batch, r.rt.to_global(batch.values(), stacked=True))))
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
            rows.append(_sequence_lengths(batch))
            read = next((batch[k] for k in ("loss_mask", "response_mask") if k in batch), None)
            reads.append(None if read is None else float((read[..., 1:] > 0).sum()))
            units.append(float(batch["pair_mask"].sum()) if "pair_mask" in batch else float(sum(rows[-1])))
        loss = float(jax.device_get(metrics["loss"]))
    return dict(times=times, rows=rows, units=units, reads=reads, build_s=build_s, loss=loss, applied=applied,
                more_compiles=compiles)


def worker_torch_sft(spec: dict) -> dict:
    """A plain PyTorch loop on exactly our SFT batches: AdamW, clipping, masked NLL."""
    import torch
    import transformers
    batches = _their_batches(spec, spec["warmup"] + spec["steps"])
    model = transformers.AutoModelForCausalLM.from_pretrained(Path(spec["model_dir"]) / "lm").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    times, rows = [], []
    for b in batches:
        t0 = time.perf_counter()
        ids = torch.from_numpy(b["input_ids"].astype("int64"))
        mask = torch.from_numpy(b["attention_mask"].astype("int64"))
        weight = torch.from_numpy(b["loss_mask"])[:, 1:]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                ids[:, 1:].reshape(-1), reduction="none")
        loss = (nll * weight.reshape(-1)).sum() / weight.sum().clamp(min=1.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        rows.append(_rows(b["attention_mask"]))
    return dict(times=times, rows=rows, units=[float(sum(r)) for r in rows], loss=float(loss))


class _StepTimer:
    """A transformers TrainerCallback: the time from one step's end to the next's."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_train_begin(self, *a, **k):
                timer.ends = [time.perf_counter()]

            def on_step_end(self, *a, **k):
                timer.ends.append(time.perf_counter())

        self.callback, self.ends = Callback(), []

    @property
    def times(self) -> list[float]:
        return [b - a for a, b in zip(self.ends, self.ends[1:])]


def _recording(collator, rows: list):
    """Wraps a data collator to record the real tokens of each row of each batch."""
    def collate(examples):
        out = collator(examples)
        rows.append(_rows(out["attention_mask"].numpy()))
        return out
    return collate


def _trainer_args(spec: dict, out: str) -> dict:
    return dict(output_dir=out, max_steps=spec["warmup"] + spec["steps"], learning_rate=1e-3, weight_decay=0.0,
                adam_epsilon=1e-8, max_grad_norm=1.0, logging_strategy="no", save_strategy="no", report_to="none",
                use_cpu=True, dataloader_num_workers=0, train_sampling_strategy="sequential", disable_tqdm=True,
                seed=0)


def worker_trl_sft(spec: dict) -> dict:
    """TRL SFTTrainer on our SFT examples (pre-tokenized: input_ids, labels), in our order."""
    import datasets
    import numpy as np
    import transformers
    from trl import SFTConfig, SFTTrainer
    rows_in = []
    for b in _their_batches(spec, spec["warmup"] + spec["steps"]):
        for ids, m, lm in zip(b["input_ids"], b["attention_mask"], b["loss_mask"]):
            real = m.astype(bool)
            rows_in.append({"input_ids": ids[real].tolist(),
                            "labels": np.where(lm[real] > 0, ids[real], -100).tolist()})
    model = transformers.AutoModelForCausalLM.from_pretrained(Path(spec["model_dir"]) / "lm")
    tok = transformers.AutoTokenizer.from_pretrained(Path(spec["model_dir"]) / "lm")
    timer, rows = _StepTimer(), []
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(**_trainer_args(spec, out), per_device_train_batch_size=8, max_length=256)
        trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows_in),
                             processing_class=tok, callbacks=[timer.callback])
        trainer.data_collator = _recording(trainer.data_collator, rows)
        result = trainer.train()
    return dict(times=timer.times, rows=rows, units=[float(sum(r)) for r in rows], loss=float(result.training_loss))


def worker_trl_rm(spec: dict) -> dict:
    """TRL RewardTrainer on our HH pairs (pre-tokenized chosen_ids / rejected_ids), in our order."""
    import datasets
    import transformers
    from trl import RewardConfig, RewardTrainer
    pairs = []
    for b in _their_batches(spec, spec["warmup"] + spec["steps"]):
        ids, mask = b["input_ids"], b["attention_mask"].astype(bool)
        for c, r, on in zip(b["chosen_idx"], b["rejected_idx"], b["pair_mask"]):
            if on:
                pairs.append({"chosen_ids": ids[c][mask[c]].tolist(), "rejected_ids": ids[r][mask[r]].tolist()})
    pairs = pairs[:8 * (spec["warmup"] + spec["steps"])]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(Path(spec["model_dir"]) / "rm")
    tok = transformers.AutoTokenizer.from_pretrained(Path(spec["model_dir"]) / "rm")
    timer, rows = _StepTimer(), []
    with tempfile.TemporaryDirectory() as out:
        args = RewardConfig(**{**_trainer_args(spec, out), "learning_rate": 3e-4}, per_device_train_batch_size=8,
                            max_length=256)
        trainer = RewardTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(pairs),
                                processing_class=tok, callbacks=[timer.callback])
        trainer.data_collator = _recording(trainer.data_collator, rows)
        result = trainer.train()
    return dict(times=timer.times, rows=rows, units=[len(r) / 2.0 for r in rows], loss=float(result.training_loss))


def worker_trl_dpo(spec: dict) -> dict:
    """TRL DPOTrainer on our HH pairs (as text: prompt, chosen and rejected decoded from our
    tokens, the EOS kept), in our order; its reference is a copy of the starting model."""
    import datasets
    import transformers
    from trl import DPOConfig, DPOTrainer
    tok = transformers.AutoTokenizer.from_pretrained(Path(spec["model_dir"]) / "lm")
    pairs = []
    for b in _their_batches(spec, spec["warmup"] + spec["steps"]):
        ids, real, response = b["input_ids"], b["attention_mask"] > 0, b["response_mask"] > 0
        text = lambda n, part: tok.decode(ids[n][part[n]].tolist())
        for c, r, on in zip(b["chosen_idx"], b["rejected_idx"], b["pair_mask"]):
            if on:
                pairs.append({"prompt": text(c, real & ~response), "chosen": text(c, response),
                              "rejected": text(r, response)})
    pairs = pairs[:8 * (spec["warmup"] + spec["steps"])]
    model = transformers.AutoModelForCausalLM.from_pretrained(Path(spec["model_dir"]) / "lm")
    timer, rows = _StepTimer(), []
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(**{**_trainer_args(spec, out), "learning_rate": 1e-4}, per_device_train_batch_size=8,
                         max_length=256, beta=0.1)
        trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(pairs),
                             processing_class=tok, callbacks=[timer.callback])
        trainer.data_collator = _recording(trainer.data_collator, rows)
        result = trainer.train()
    return dict(times=timer.times, rows=rows, units=[len(r) / 2.0 for r in rows], loss=float(result.training_loss))


def worker_ours_ppo(spec: dict) -> dict:
    """PPO iterations through `ppo.setup.build` and `ppo.trainer.rollout`, generation and
    scoring timed by blocking on their results."""
    import jax
    from rlhf_jax import data as data_lib
    from rlhf_jax.ppo import setup as ppo_setup
    from rlhf_jax.ppo import trainer as ppo_trainer
    cfg = our_config("ppo", Path(spec["model_dir"]), spec)
    applied = apply_overrides(cfg, "ppo", split_overrides(spec["overrides"]))
    phase = {}

    def timed(name, fn):
        def call(*a):
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn(*a))
            phase[name] = time.perf_counter() - t0
            return out
        return call

    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        s = ppo_setup.build(cfg, workdir)
        build_s = time.perf_counter() - t0
        s.generate, s.score = timed("generation", s.generate), timed("score", s.score)
        prompts = data_lib.batches(s.prompts, batch_size=int(cfg.ppo.batch_size), seed=cfg.seed, num_epochs=None)
        out = []
        for it in range(spec["warmup"] + spec["steps"]):
            t0 = time.perf_counter()
            batch = next(prompts)
            ro = ppo_trainer.rollout(s, batch, it, want_text=False)[0]
            t1 = time.perf_counter()
            s.state, metrics = s.update(s.state, ro, None)
            jax.block_until_ready(metrics)
            t2 = time.perf_counter()
            lengths = (batch["attention_mask"].sum(-1) + jax.device_get(ro.response_mask).sum(-1)).tolist()
            out.append(dict(generation=phase["generation"], scoring=t1 - t0 - phase["generation"],
                            optimisation=t2 - t1, total=t2 - t0, lengths=[int(x) for x in lengths]))
    return dict(iterations=out, build_s=build_s, applied=applied)


def worker_trl_ppo(spec: dict) -> dict:
    """TRL 1.12 PPOTrainer on our prompts; its phases timed by wrapping `batch_generation` and
    `forward` (the first call with gradients starts the optimisation) of its module."""
    import datasets
    import torch
    import transformers
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo
    from rlhf_jax import data as data_lib
    cfg = our_config("ppo", Path(spec["model_dir"]), spec)
    n_iter = spec["warmup"] + spec["steps"]
    tok_ours = data_lib.load_tokenizer(str(Path(spec["model_dir"]) / "lm"))
    prompts = data_lib.prompt_dataset(cfg.data.path, tok_ours, format=cfg.data.format,
                                      max_prompt_length=cfg.data.max_prompt_length, on_bad_row=cfg.data.on_bad_row)
    it = data_lib.batches(prompts, batch_size=16, seed=cfg.seed, num_epochs=None)
    rows = []
    for _ in range(n_iter):
        b = next(it)
        rows += [{"input_ids": ids[m.astype(bool)].tolist()} for ids, m in zip(b["input_ids"], b["attention_mask"])]
    lm_dir, rm_dir = Path(spec["model_dir"]) / "lm", Path(spec["model_dir"]) / "rm"
    tok = transformers.AutoTokenizer.from_pretrained(lm_dir, padding_side="left")
    policy = transformers.AutoModelForCausalLM.from_pretrained(lm_dir)
    ref = transformers.AutoModelForCausalLM.from_pretrained(lm_dir)
    reward = transformers.AutoModelForSequenceClassification.from_pretrained(rm_dir)
    value = transformers.AutoModelForSequenceClassification.from_pretrained(rm_dir)
    marks: list[dict] = []
    gen, fwd = trl_ppo.batch_generation, trl_ppo.forward

    def batch_generation(*a, **k):
        marks.append({"start": time.perf_counter()})
        out = gen(*a, **k)
        marks[-1]["generated"] = time.perf_counter()
        return out

    def forward(*a, **k):
        if torch.is_grad_enabled() and marks and "optimise" not in marks[-1]:
            marks[-1]["optimise"] = time.perf_counter()
        return fwd(*a, **k)

    trl_ppo.batch_generation, trl_ppo.forward = batch_generation, forward
    timer = _StepTimer()
    with tempfile.TemporaryDirectory() as out:
        args = PPOConfig(**{**_trainer_args(spec, out), "learning_rate": float(cfg.optimizer.lr)},
                         per_device_train_batch_size=16, gradient_accumulation_steps=1, num_mini_batches=1,
                         num_ppo_epochs=4, response_length=spec["new_tokens"], local_rollout_forward_batch_size=16,
                         total_episodes=16 * n_iter, stop_token="eos", temperature=float(cfg.sampling.temperature),
                         num_sample_generations=0, missing_eos_penalty=1.0)
        trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                             value_model=value, train_dataset=datasets.Dataset.from_list(rows),
                             callbacks=[timer.callback])
        trainer.train()
    iters = []
    for m, end in zip(marks, timer.ends[1:]):
        iters.append(dict(generation=m["generated"] - m["start"], scoring=m["optimise"] - m["generated"],
                          optimisation=end - m["optimise"], total=end - m["start"]))
    return dict(iterations=iters)


def _gen_prompts(batch: int, prompt_len: int, seed: int = 0):
    import numpy as np
    rng = np.random.default_rng(seed + batch)
    ids = rng.integers(0, 50256, size=(batch, prompt_len)).astype(np.int32)
    return ids, np.ones_like(ids)


def worker_ours_gen(spec: dict) -> dict:
    """Sampling through `load_model` + `make_generate` (no stop tokens: every row runs to the end)."""
    import jax
    import numpy as np
    from rlhf_jax import sharding
    from rlhf_jax.models import ModelDef, load_model
    from rlhf_jax.sampling import SamplingConfig, make_generate
    cfg = our_config("gen", Path(spec["model_dir"]), spec)
    applied = apply_overrides(cfg, "gen", split_overrides(spec["overrides"]))
    mesh = sharding.mesh_from_config(cfg.mesh)
    model, tok = load_model(cfg.model, tokenizer=cfg.tokenizer, mesh=mesh)
    model_def, params, rest = ModelDef.split(model)
    s = cfg.sampling
    generate = make_generate(model_def, mesh, SamplingConfig(
        max_new_tokens=int(s.max_new_tokens), temperature=float(s.temperature), top_k=int(s.top_k),
        top_p=float(s.top_p), stop_token_ids=(), pad_token_id=int(tok.pad_token_id)))
    ids, mask = _gen_prompts(spec["batch"], spec["prompt_len"])
    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        t0 = time.perf_counter()
        out = generate({**params, **rest}, ids, mask, jax.random.key(i))
        tokens = np.asarray(out.tokens)  # on the host: the timing includes the result
        times.append(time.perf_counter() - t0)
    return dict(times=times, new_tokens=int(tokens.size), applied=applied)


def worker_hf_gen(spec: dict) -> dict:
    """transformers `generate`, sampling at temperature 1 with top-k / top-p off, no EOS."""
    import torch
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(Path(spec["model_dir"]) / "lm").eval()
    model.generation_config.eos_token_id = None
    ids, mask = (torch.from_numpy(a.astype("int64")) for a in _gen_prompts(spec["batch"], spec["prompt_len"]))
    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        torch.manual_seed(i)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=spec["new_tokens"],
                                 min_new_tokens=spec["new_tokens"], do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, pad_token_id=50257)
        times.append(time.perf_counter() - t0)
    return dict(times=times, new_tokens=int(out[:, ids.shape[1]:].numel()))


def worker_peak(spec: dict) -> dict:
    """float32 matmul FLOP/s of a n^3 product: jnp.dot (jitted) and torch.mm, the fastest of 10
    (a peak: on this shared machine a median of 5 once read 100 GFLOP/s where the next three
    runs read 176-197)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    n = spec["n"]
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    dot = jax.jit(jnp.dot)
    x = jnp.asarray(a)
    jax.block_until_ready(dot(x, x))
    t_jax = []
    for _ in range(10):
        t0 = time.perf_counter()
        jax.block_until_ready(dot(x, x))
        t_jax.append(time.perf_counter() - t0)
    y = torch.from_numpy(a)
    torch.mm(y, y)
    t_torch = []
    for _ in range(10):
        t0 = time.perf_counter()
        torch.mm(y, y)
        t_torch.append(time.perf_counter() - t0)
    flops = 2.0 * n ** 3
    return dict(jax=flops / min(t_jax), torch=flops / min(t_torch))


WORKERS = {("sft", "ours"): worker_ours_train, ("sft", "trl"): worker_trl_sft, ("sft", "torch"): worker_torch_sft,
           ("rm", "ours"): worker_ours_train, ("rm", "trl"): worker_trl_rm,
           ("dpo", "ours"): worker_ours_train, ("dpo", "trl"): worker_trl_dpo,
           ("ppo", "ours"): worker_ours_ppo, ("ppo", "trl"): worker_trl_ppo,
           ("gen", "ours"): worker_ours_gen, ("gen", "hf"): worker_hf_gen,
           ("scale", "ours"): worker_ours_train, ("peak", "both"): worker_peak}
SIDES = {"sft": ("ours", "trl", "torch"), "rm": ("ours", "trl"), "dpo": ("ours", "trl"), "ppo": ("ours", "trl"),
         "gen": ("ours", "hf")}
SIDE_NAMES = {"ours": "ours", "trl": "TRL", "torch": "PyTorch loop", "hf": "transformers"}


def run_worker(spec: dict, threads: int) -> dict:
    """Runs one measurement in a fresh Python process; its result dict (or the error)."""
    return _common.run_in_fresh_process(__file__, ["--threads", str(threads)], spec, RESULT,
                                        f"{spec['workload']}/{spec['side']}", TRL_EXPERIMENTAL_SILENCE="1")


def worker_main(spec: dict, threads: int) -> None:
    if spec["side"] != "ours":
        _set_torch_threads(threads)
    result = WORKERS[(spec["workload"], spec["side"])](spec)
    result["rss_mib"] = _rss_mib()
    print(RESULT + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- tables
def fmt(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "-"


def _median(xs) -> float | None:
    xs = list(xs)
    return statistics.median(xs) if xs else None


def summarize_steps(results: list[dict], warmup: int) -> dict:
    """Rate (units/s) and model-FLOP inputs from the timed steps of several subprocesses."""
    times, units, rows, reads, first = [], [], [], [], []
    for r in results:
        first.append(r["times"][0])
        times += r["times"][warmup:]
        units += r["units"][warmup:] if "units" in r else [float(r["new_tokens"])] * len(r["times"][warmup:])
        rows += r["rows"][warmup:] if "rows" in r else []
        reads += r["reads"][warmup:] if "reads" in r else []
    step = statistics.median(times)
    more = [c for r in results for c in r.get("more_compiles", [])]  # untimed first steps of new shapes
    return dict(step_s=step, rate=statistics.median(u / t for u, t in zip(units, times)), first_s=_median(first),
                rows=rows, reads=reads, n=len(times), rss_mib=max(r["rss_mib"] for r in results), more_compiles=more)


def training_table(name: str, unit: str, arch_rows: list[dict], sides: tuple[str, ...]) -> str:
    """One markdown table: per model, each side's rate, ratio, model FLOP/s, MFU, first step."""
    theirs = sides[1:]
    head = (["model", f"ours {unit}"] + [f"{SIDE_NAMES[s]} {unit}" for s in theirs]
            + [f"ours / {SIDE_NAMES[s]}" for s in theirs]
            + ["ours GFLOP/s (MFU)"] + [f"{SIDE_NAMES[s]} GFLOP/s (MFU)" for s in theirs]
            + ["ours first step s"] + [f"{SIDE_NAMES[s]} first step s" for s in theirs]
            + ["peak RSS MiB ours / theirs"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for r in arch_rows:
        s = r["sides"]
        cells = [r["model"]] + [fmt(s[x]["rate"], 1 if s[x]["rate"] < 100 else 0) for x in sides]
        cells += [ratio(s["ours"]["rate"], s[x]["rate"]) for x in theirs]
        cells += [f"{fmt(s[x]['flops'] / 1e9, 2)} ({s[x]['flops'] / r['peak']:.1%})" for x in sides]
        cells += [fmt(s[x]["first_s"], 2) + (f" (+{len(s[x]['more_compiles'])} shapes, {sum(s[x]['more_compiles']):.1f} s)"
                                             if s[x].get("more_compiles") else "") for x in sides]
        cells += [" / ".join(fmt(s[x]["rss_mib"]) for x in sides)]
        lines.append("| " + " | ".join(cells) + " |")
    return f"**{name}**\n\n" + "\n".join(lines)


def ppo_table(arch_rows: list[dict]) -> str:
    phases = ("generation", "scoring", "optimisation", "total")
    head = ["model", "phase", "ours s", "TRL s", "ours / TRL speed", "model GFLOP", "ours GFLOP/s (MFU)",
            "TRL GFLOP/s (MFU)"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in arch_rows:
        for ph in phases:
            o, t, f = r["ours"][ph], r["trl"][ph], r["flops"][ph]
            lines.append(f"| {r['model']} | {ph} | {o:.2f} | {t:.2f} | {ratio(t, o)} | {f / 1e9:,.1f} "
                         f"| {f / o / 1e9:,.2f} ({f / o / r['peak']:.1%}) "
                         f"| {f / t / 1e9:,.2f} ({f / t / r['peak']:.1%}) |")
        lines.append(f"| {r['model']} | first iteration (ours: compile) | {r['ours']['first']:.2f} "
                     f"| {r['trl']['first']:.2f} | | | | |")
    return "**PPO iteration (seconds, lower is better)**\n\n" + "\n".join(lines)


def scaling_table(rows: list[dict]) -> str:
    lines = ["| model | seq len | batch | tokens/s | GFLOP/s (MFU) | first step s | peak RSS MiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| llama d={r['hidden']} L=4 | {r['seq_len']} | {r['batch']} | {fmt(r['rate'])} "
                     f"| {r['flops'] / 1e9:,.2f} ({r['flops'] / r['peak']:.1%}) | {fmt(r['first_s'], 1)} "
                     f"| {fmt(r['rss_mib'])} |")
    return "**Scaling (ours): the SFT step on full packed rows, 2,048 tokens per step**\n\n" + "\n".join(lines)


# --------------------------------------------------------------------------- the run
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS) + ["scale"],
                   choices=list(WORKLOADS) + ["scale"])
    p.add_argument("--models", nargs="+", choices=list(MODELS), help="default: both (--quick: gpt2)")
    p.add_argument("--repeats", type=int, default=2, help="rounds of alternating subprocesses per cell")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per subprocess (the first compiles)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per subprocess (PPO: iterations, at most 2)")
    p.add_argument("--gen-batch", type=int, nargs="+", default=[16, 1])
    p.add_argument("--new-tokens", type=int, default=64, help="PPO and sampling: new tokens per row")
    p.add_argument("--prompt-len", type=int, default=64, help="sampling: prompt tokens per row")
    p.add_argument("--scale", nargs="+", default=["256x256", "256x512", "256x1024", "256x2048", "512x256",
                                                  "1024x256"], help="scaling points WIDTHxSEQLEN")
    p.add_argument("--ours-set", action="append", default=[], metavar="[WORKLOAD:]KEY=VALUE",
                   help="a field of our stage config (repeatable); see the module docstring")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: GPT-2 shape unless --models, 1 round, 1 timed step, PPO/sampling with 16 new "
                        "tokens, 2 small scaling points")
    p.add_argument("--threads", type=int, default=1,
                   help="compute threads per side (1: torch.set_num_threads(1) and XLA without "
                        "multi-threaded Eigen; 0: each library's default)")
    p.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--no-write", action="store_true", help="print the tables only")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.steps, args.new_tokens = 1, 1, 16
        args.scale = ["256x256", "256x512"]
    args.models = args.models or (["gpt2"] if args.quick else list(MODELS))
    return args


def machine(load: tuple[float, float], peak: dict, threads: int) -> str:
    import importlib.metadata as md
    versions = ", ".join(f"{p} {md.version(p)}" for p in ("jax", "flax", "optax", "torch", "transformers", "trl",
                                                          "accelerate"))
    return (f"{_common.cpu_description()}; {versions}; {threads or 'default'} thread(s) per side, "
            f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; float32 matmul peak ({PEAK_N}^3, same threads): "
            f"jnp.dot {peak['jax'] / 1e9:.1f} GFLOP/s, torch.mm {peak['torch'] / 1e9:.1f} GFLOP/s; "
            f"1-minute load average {load[0]:.1f} before / {load[1]:.1f} after the run")


def mean_reads(reads: list) -> float:
    """Mean LM-head positions a step's loss reads; an RM step's entries are None (it reads one
    score per response, no LM head): 0."""
    return statistics.mean([r for r in reads if r is not None] or [0.0])


def run_training(args, wl: str, arch: str, model_dir: Path, shape: Shape, peak: float, base: dict) -> dict:
    results = {side: [] for side in SIDES[wl]}
    for _ in range(args.repeats):
        for side in SIDES[wl]:
            results[side].append(run_worker(dict(base, workload=wl, side=side), args.threads))
    summaries = {side: summarize_steps(rs, args.warmup) for side, rs in results.items()}
    # The positions a loss reads (SFT: response tokens, DPO: each response's tokens): counted
    # in our batches, the same examples in the same order as theirs.
    reads_per_step = mean_reads(summaries["ours"]["reads"])
    sides = {}
    for side, s in summaries.items():
        steps, lengths = len(s["rows"]), [t for row in s["rows"] for t in row]
        if wl == "rm":
            work = train_flops(shape.trunk + 1, shape, lengths)
        else:
            work = lm_train_flops(shape, lengths, reads_per_step * steps)
            if wl == "dpo":  # and the reference's forward pass over the same sequences
                work *= 4.0 / 3.0
        s["flops"] = work / steps / s["step_s"]
        sides[side] = s
        print(f"  {wl} {arch} {side}: {s['rate']:,.1f}/s, step {s['step_s']:.3f} s, first {s['first_s']:.2f} s, "
              f"{s['flops'] / 1e9:.2f} GFLOP/s, RSS {s['rss_mib']:.0f} MiB"
              + (f"  [ours-set: {', '.join(applied)}]" if (applied := results[side][0].get("applied")) else ""),
              flush=True)
    return dict(model=model_label(arch, shape), sides=sides, peak=peak)


def run_ppo(args, arch: str, model_dir: Path, shape: Shape, peak: float, base: dict) -> dict:
    results = {"ours": [], "trl": []}
    for _ in range(args.repeats):
        for side in results:
            results[side].append(run_worker(dict(base, workload="ppo", side=side), args.threads))
    out = dict(model=model_label(arch, shape), peak=peak)
    lengths = results["ours"][0]["iterations"][-1]["lengths"]
    out["flops"] = ppo_flops(shape, lengths, epochs=4)
    out["flops"]["total"] = sum(out["flops"].values())
    for side, rs in results.items():
        iters = [it for r in rs for it in r["iterations"][args.warmup:]]
        out[side] = {ph: statistics.median(it[ph] for it in iters)
                     for ph in ("generation", "scoring", "optimisation", "total")}
        out[side]["first"] = statistics.median(r["iterations"][0]["total"] for r in rs)
        applied = rs[0].get("applied")
        print(f"  ppo {arch} {side}: " + ", ".join(f"{k} {v:.2f} s" for k, v in out[side].items())
              + (f"  [ours-set: {', '.join(applied)}]" if applied else ""), flush=True)
    return out


def run_gen(args, arch: str, model_dir: Path, shape: Shape, peak: float, base: dict) -> list[dict]:
    rows = []
    for batch in args.gen_batch:
        spec = dict(base, workload="gen", batch=batch, prompt_len=args.prompt_len)
        results = {"ours": [], "hf": []}
        for _ in range(args.repeats):
            for side in results:
                results[side].append(run_worker(dict(spec, side=side), args.threads))
        lengths = [args.prompt_len + args.new_tokens] * batch
        sides = {}
        for side, rs in results.items():
            s = summarize_steps(rs, args.warmup)
            s["flops"] = forward_flops(shape.lm, shape, lengths) / s["step_s"]
            sides[side] = s
            print(f"  gen {arch} batch {batch} {side}: {s['rate']:,.0f} tok/s, first {s['first_s']:.2f} s", flush=True)
        rows.append(dict(model=f"{model_label(arch, shape)}, batch {batch}", sides=sides, peak=peak))
    return rows


def run_scale(args, peak: float, base: dict) -> list[dict]:
    rows = []
    for point in args.scale:
        hidden, seq_len = (int(x) for x in point.split("x"))
        spec = dict(base, workload="scale", side="ours", hidden=hidden, seq_len=seq_len, tokens_per_step=2048,
                    model_dir=None)
        r = run_worker(spec, args.threads)
        s = summarize_steps([r], args.warmup)
        shape = scale_shape(hidden, seq_len)
        flops = train_flops(shape.lm, shape, [t for row in s["rows"] for t in row]) / len(s["rows"]) / s["step_s"]
        rows.append(dict(hidden=hidden, seq_len=seq_len, batch=max(1, 2048 // seq_len), rate=s["rate"], flops=flops,
                         peak=peak, first_s=s["first_s"], rss_mib=s["rss_mib"]))
        print(f"  scale d={hidden} T={seq_len}: {s['rate']:,.0f} tok/s, RSS {s['rss_mib']:.0f} MiB", flush=True)
    return rows


def scale_shape(hidden: int, seq_len: int) -> Shape:
    """The Shape of the scaling table's Llama model (configs/pretrain.py's tiny fields as set above)."""
    heads, kv, hd, mlp = hidden // 64, hidden // 128, 64, 4 * hidden
    per_layer = hidden * (heads * hd) * 2 + hidden * (kv * hd) * 2 + 3 * hidden * mlp + 2 * hidden
    return Shape(trunk=4 * per_layer + hidden, lm_head=VOCAB * hidden, layers=4, d_attn=heads * hd)


def model_label(arch: str, shape: Shape) -> str:
    kind = "GPT-2 d256 L4 h4" if arch == "gpt2" else "Llama d256 L4 h4/2"
    return f"{kind} ({shape.lm / 1e6:.1f}M matmul params)"


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker), args.threads)
        return
    overrides = split_overrides(args.ours_set)
    opts = dict(warmup=args.warmup, steps=args.steps, new_tokens=args.new_tokens, hidden=256, seq_len=256,
                tokens_per_step=2048)
    check_overrides(overrides, {n: our_config(n, Path("."), opts) for n in CONFIG_NAMES})
    load_before, start = os.getloadavg()[0], time.perf_counter()
    peak = run_worker(dict(workload="peak", side="both", n=PEAK_N), args.threads)
    peak_flops = max(peak["jax"], peak["torch"])
    print(f"float32 matmul peak: jnp.dot {peak['jax'] / 1e9:.1f}, torch.mm {peak['torch'] / 1e9:.1f} GFLOP/s",
          flush=True)
    base = dict(warmup=args.warmup, steps=args.steps, new_tokens=args.new_tokens, overrides=args.ours_set)
    sections = {"sft": [], "rm": [], "dpo": [], "ppo": [], "gen": []}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.models:
            model_dir = Path(tmp) / arch
            shape = build_models(arch, model_dir)
            spec = dict(base, model_dir=str(model_dir))
            for wl in args.workloads:
                if wl in ("sft", "rm", "dpo"):
                    sections[wl].append(run_training(args, wl, arch, model_dir, shape, peak_flops, spec))
                elif wl == "ppo":
                    ppo_spec = dict(spec, steps=min(args.steps, 2))
                    sections["ppo"].append(run_ppo(args, arch, model_dir, shape, peak_flops, ppo_spec))
                elif wl == "gen":
                    sections["gen"] += run_gen(args, arch, model_dir, shape, peak_flops, spec)
    scale = run_scale(args, peak_flops, base) if "scale" in args.workloads else []
    tables = {}
    if sections["sft"]:
        tables["sft"] = training_table("SFT step (non-pad tokens/s)", "tok/s", sections["sft"], SIDES["sft"])
    if sections["rm"]:
        tables["rm"] = training_table("RM step (pairs/s)", "pairs/s", sections["rm"], SIDES["rm"])
    if sections["dpo"]:
        tables["dpo"] = training_table("DPO step (pairs/s)", "pairs/s", sections["dpo"], SIDES["dpo"])
    if sections["ppo"]:
        tables["ppo"] = ppo_table(sections["ppo"])
    if sections["gen"]:
        tables["gen"] = training_table("Sampling (new tokens/s)", "tok/s", sections["gen"], SIDES["gen"])
    if scale:
        tables["scale"] = scaling_table(scale)
    elapsed = time.perf_counter() - start
    load = (load_before, os.getloadavg()[0])
    print("\n\n".join(tables.values()))
    print(f"{elapsed:.0f} s in all; {machine(load, peak, args.threads)}")
    if not args.no_write:
        command = _common.command_line(__file__, argv)
        write_tables(Path(args.output), tables, command, f"{machine(load, peak, args.threads)}. The whole run took "
                     f"{elapsed:.0f} s")
        print(f"wrote {args.output}")


INTRO = "\n".join([
    "## Side by side: rlhf_jax vs TRL / PyTorch",
    "",
    "Each cell: the median over timed steps of fresh subprocesses, the sides alternating, warm-up "
    "steps excluded; first step (ours: XLA compilation) apart. Same models (random weights, float32, "
    "vocabulary 50,258), data, batches and threads on both sides. Model FLOPs: a forward over a "
    "sequence of t real tokens is 2·N·t + 4·L·d_attn·t² (N: matmul parameters, the LM head counted once), "
    "training 3× that; in the SFT and DPO tables the LM head only at the positions the loss reads "
    "(the PPO and sampling tables count it at every token); MFU against the float32 matmul peak "
    "measured in the run. Method and workloads: "
    "the docstring of `benchmarks/side_by_side.py`. Each table below says which run measured it: a run "
    "of some workloads rewrites only their tables.",
])


def write_tables(path: Path, tables: dict[str, str], command: str, machine_line: str) -> None:
    """Writes the section's introduction and each measured table, with its command and machine,
    into BENCHMARKS.md; the tables of workloads this run did not measure are kept."""
    _common.write_section(path, "side_by_side", INTRO)
    for key, table in tables.items():
        _common.write_section(path, f"side_by_side/{key}", "\n".join(
            [table, "", _common.provenance(command, machine_line)]))


if __name__ == "__main__":
    main()
