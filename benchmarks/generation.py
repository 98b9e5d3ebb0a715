"""New tokens per second: our compiled sampler vs transformers `generate` (PyTorch), same model.

A random Llama-shaped model is built with transformers, saved, and loaded with
`rlhf_jax.models.load_pretrained`, so both sides run the same weights. Both decode greedily
(or, with `--temperature T > 0`, sample from softmax(logits / T), no top-k/top-p) with the same batch, prompt length and number of new tokens, with no early stop (no stop id
on our side, no EOS on theirs), so both produce exactly batch * new_tokens tokens per call.
Each side is warmed up (our first call compiles), then timed over several rounds that
alternate between the two; the table reports the median. By default each side computes on
one thread (`--threads`), which keeps timings stable on a shared machine.

    python benchmarks/generation.py                      # defaults: < 3 minutes on 2 cores
    python benchmarks/generation.py --batch 1 8 --new-tokens 128 --hidden 512 --layers 8
    python benchmarks/generation.py --batch 1 16 --vocab 50258 --temperature 0.7   # GPT-2 vocabulary, sampling

The table is printed and written into BENCHMARKS.md (between this benchmark's markers, so
other sections are kept) with the command and the machine. `--no-write` only prints.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: E402  (before jax: the environment and the thread setting)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhf_jax import sharding  # noqa: E402
from rlhf_jax.models import load_pretrained  # noqa: E402
from rlhf_jax.models import ModelDef, count  # noqa: E402
from rlhf_jax.sampling import SamplingConfig, make_generate  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32], help="batch sizes, one table row each")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0: greedy (the rows of both sides can be compared); > 0: sampling at this "
                        "temperature on both sides (different random streams: no comparison)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="1: one compute thread on each side (torch.set_num_threads(1), XLA without "
                        "multi-threaded Eigen); 0: each library's default. On a shared 2-core machine "
                        "2-thread OpenMP runs vary ~10x between identical calls when another process "
                        "holds a core, while 1-thread runs are stable.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--no-write", action="store_true", help="print the table only")
    return p.parse_args(argv)


def build_model(args, path: Path):
    """A random transformers Llama model saved at `path` (and returned, in eval mode)."""
    torch.manual_seed(args.seed)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, intermediate_size=4 * args.hidden,
        max_position_embeddings=max(512, args.prompt_len + args.new_tokens), tie_word_embeddings=False,
        # A wider init than 0.02 spreads the logits, so greedy argmaxes are not near-ties and
        # the two implementations can be checked for identical tokens.
        initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path)
    # No early stop on the reference side: every call makes exactly new_tokens tokens.
    model.generation_config.eos_token_id = None
    return model


def time_interleaved(fns, repeats: int) -> list[float]:
    """Median wall time of each of `fns` over `repeats` rounds, after one warm-up call each.

    The rounds alternate between the functions, so a load change on a shared machine hits
    both sides alike instead of only the one timed second.
    """
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


def bench_one(args, batch: int, hf_model, model_def, params, mesh):
    rng = np.random.default_rng(args.seed + batch)
    ids = rng.integers(3, args.vocab, size=(batch, args.prompt_len)).astype(np.int32)
    mask = np.ones_like(ids)
    n = args.new_tokens

    config = SamplingConfig(max_new_tokens=n, temperature=args.temperature, stop_token_ids=(), pad_token_id=0)
    sample = dict(do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0) if args.temperature else dict(
        do_sample=False)
    generate = make_generate(model_def, mesh, config)
    key = jax.random.key(0)
    ours_out = {}

    def ours():
        out = generate(params, ids, mask, key)
        ours_out["tokens"] = np.asarray(out.tokens)  # device -> host: the timing includes the result

    ids_t, mask_t = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))
    hf_out = {}

    def theirs():
        with torch.inference_mode():
            out = hf_model.generate(input_ids=ids_t, attention_mask=mask_t, max_new_tokens=n, **sample,
                                    pad_token_id=0)
        hf_out["tokens"] = out[:, args.prompt_len:].numpy()

    t_ours, t_hf = time_interleaved([ours, theirs], args.repeats)
    assert hf_out["tokens"].shape == (batch, n), hf_out["tokens"].shape
    same = (float(np.mean(np.all(ours_out["tokens"] == hf_out["tokens"], axis=1))) if not args.temperature
            else float("nan"))
    return dict(batch=batch, ours=batch * n / t_ours, hf=batch * n / t_hf, same=same)


def machine(load: tuple[float, ...]) -> str:
    return (f"{_common.cpu_description()}; jax {jax.__version__} ({jax.default_backend()}), "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, transformers {transformers.__version__}; "
            f"1-minute load average {load[0]:.1f} before / {load[1]:.1f} after the run")


def _fraction(x: float) -> str:
    return "n/a" if np.isnan(x) else f"{x:.0%}"


def table(args, n_params: int, rows) -> str:
    lines = ["| model | params | batch | prompt len | new tokens | ours tok/s | transformers tok/s | speedup "
             "| identical rows |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    name = f"llama d={args.hidden} L={args.layers} h={args.heads}/{args.kv_heads} V={args.vocab}"
    for r in rows:
        lines.append(f"| {name} | {n_params / 1e6:.2f}M | {r['batch']} | {args.prompt_len} | {args.new_tokens} "
                     f"| {r['ours']:,.0f} | {r['hf']:,.0f} | {r['ours'] / r['hf']:.1f}× | {_fraction(r['same'])} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.threads == 1:
        torch.set_num_threads(1)
    elif args.threads > 1:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]  # the machine may be shared: the load is part of the result
    start = time.perf_counter()
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    with tempfile.TemporaryDirectory() as tmp:
        hf_model = build_model(args, Path(tmp) / "model")
        model = load_pretrained(Path(tmp) / "model", mesh=mesh)
    model_def, params, rest = ModelDef.split(model)
    params = {**params, **rest}
    n_params = count(params)
    rows = []
    for batch in args.batch:
        rows.append(bench_one(args, batch, hf_model, model_def, params, mesh))
        r = rows[-1]
        print(f"batch {batch}: ours {r['ours']:,.0f} tok/s, transformers {r['hf']:,.0f} tok/s, "
              f"identical rows {_fraction(r['same'])}", flush=True)
    md = table(args, n_params, rows)
    print(md)
    elapsed = time.perf_counter() - start
    load = (load_before, os.getloadavg()[0])
    print(f"{elapsed:.0f} s in all; {machine(load)}")
    if not args.no_write:
        command = _common.command_line(__file__, argv)
        body = "\n".join([
            "## Generation: compiled sampler vs transformers `generate`",
            "",
            ("Greedy decoding" if not args.temperature else f"Sampling at temperature {args.temperature:g} "
             "(no top-k/top-p; the two sides draw from different random streams, so rows are not compared)")
            + " of a random Llama-shaped model (the same weights on both sides, no early "
            "stop), new tokens per second, median of "
            f"{args.repeats} timed calls (alternating between the two sides) after a warm-up (our first call "
            "compiles; compilation is not in the timing). Ours: "
            "`rlhf_jax.sampling.make_generate` (prefill + `lax.while_loop` with a KV cache, one XLA "
            "program). Theirs: `transformers` `model.generate` in PyTorch (eager, default attention). "
            "\"identical rows\": fraction of rows whose tokens are the same on both sides. "
            + ("Each side computes on one thread (`--threads 1`): on this shared machine 2-thread "
               "PyTorch runs varied about 10x between identical calls whenever another process held a core."
               if args.threads == 1 else f"Threads: `--threads {args.threads}`."),
            "",
            _common.provenance(command, machine(load), elapsed),
            "",
            md,
        ])
        _common.write_section(Path(args.output), "generation", body)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
