"""The LM head's log-probs and their gradient alone: `sft.selected_token_logprobs` with the
vocabulary walked in slices (`vocab_chunk_size`, the CPU default 2048) against whole
[chunk, V] logit rows rematerialised in the backward pass (`vocab_chunk_size=0`, the default
off CPU), at the shapes of the side-by-side benchmark (d 256, vocabulary 50,258, float32):

  ppo  16 rollouts x 64 response positions, all read (the PPO update's policy loss)
  sft  8 rows x 255 positions, the last 60% read (a padded Alpaca batch's response tokens)

Each cell: value and gradient (w.r.t. the hidden states and the head) of sum(log p), jitted,
the fastest of `--repeats` calls after one that compiles, every setting in a fresh process.

    python benchmarks/lm_head.py            # prints the table and writes it to BENCHMARKS.md
"""

from __future__ import annotations

import _common  # noqa: F401  (sets XLA_FLAGS before JAX starts)

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULT = "LM_HEAD_RESULT "
SHAPES = {"ppo": (16, 64, 1.0), "sft": (8, 255, 0.6)}  # rows, positions, fraction read
D, V = 256, 50258


class _Head:
    """What `selected_token_logprobs` reads of a model: its unembedding [D, V]."""

    def __init__(self, w_DV):
        self.w_DV = w_DV

    def unembedding(self):
        return self.w_DV


def worker(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp

    from rlhf_jax import sft

    rows, t, frac = SHAPES[spec["shape"]]
    k = jax.random.split(jax.random.key(0), 3)
    h_BTD = jax.random.normal(k[0], (rows, t, D))
    w_DV = jax.random.normal(k[1], (D, V)) * 0.05
    tgt_BT = jax.random.randint(k[2], (rows, t), 0, V)
    weight_BT = jnp.broadcast_to(jnp.arange(t) >= round(t * (1 - frac)), (rows, t)).astype(jnp.float32)

    def loss(h, w):
        return sft.selected_token_logprobs(_Head(w), h, tgt_BT, weight_BT, chunk_size=spec["chunk"],
                                           vocab_chunk_size=spec["vocab"]).logp.sum()

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    t0 = time.perf_counter()
    value, _ = jax.block_until_ready(step(h_BTD, w_DV))
    first = time.perf_counter() - t0
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        jax.block_until_ready(step(h_BTD, w_DV))
        times.append(time.perf_counter() - t0)
    return dict(seconds=min(times), first=first, read=int(weight_BT.sum()), value=float(value))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunk", type=int, default=512, help="positions per chunk (chunk_size)")
    p.add_argument("--vocab", type=int, nargs="+", default=[0, 2048], help="vocab_chunk_size settings; 0: whole rows")
    p.add_argument("--threads", type=int, default=1, help="1: XLA's single-threaded CPU runtime (as side_by_side.py)")
    p.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(RESULT + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    command = _common.command_line(__file__)
    start = time.perf_counter()
    lines = ["| shape | positions read | " + " | ".join(f"vocab_chunk_size={v} s" for v in args.vocab)
             + " | speed-up of the last over the first |",
             "|---|---:|" + "---:|" * len(args.vocab) + "---:|"]
    for shape in SHAPES:
        cells = [_common.run_in_fresh_process(__file__, ["--threads", str(args.threads)],
                                              dict(shape=shape, chunk=args.chunk, vocab=v, repeats=args.repeats),
                                              RESULT, f"{shape}/vocab={v}") for v in args.vocab]
        values = [c["value"] for c in cells]
        if max(values) - min(values) > 1e-4 * abs(values[0]):
            raise SystemExit(f"{shape}: the settings disagree on sum(log p): {values}")
        lines.append(f"| {shape} | {cells[0]['read']:,} | " + " | ".join(f"{c['seconds']:.3f}" for c in cells)
                     + f" | {cells[0]['seconds'] / cells[-1]['seconds']:.2f}× |")
        print(lines[-1], flush=True)
    import jax
    machine = (f"{_common.cpu_description()}; jax {jax.__version__}; {args.threads} thread(s), "
               f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    body = ("**LM head: log-probs and their gradient (seconds, lower is better)**\n\n"
            f"d {D}, vocabulary {V:,}, float32, chunks of {args.chunk} positions; value and gradient of "
            "sum(log p) w.r.t. the hidden states and the head, fastest of "
            f"{args.repeats} calls, each setting in a fresh process. Method: the docstring of "
            "`benchmarks/lm_head.py`.\n\n" + "\n".join(lines) + "\n\n"
            + _common.provenance(command, machine, time.perf_counter() - start))
    print("\n" + body)
    if not args.no_write:
        _common.write_section(Path(args.output), "lm_head", body)


if __name__ == "__main__":
    main()
