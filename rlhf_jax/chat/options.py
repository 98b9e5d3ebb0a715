"""The command-line options of a chat (terminal and page), without importing JAX."""

from __future__ import annotations

import argparse
from typing import Any

from rlhf_jax.chat.template import TEMPLATES


def add_chat_args(parser: argparse.ArgumentParser) -> None:
    """--model, --tokenizer, --context, --template and the sampling options."""
    parser.add_argument("--model", default=None,
                        help="the policy: a Hugging Face directory (a stage's workdir/model) or a .gguf file")
    parser.add_argument("--tokenizer", default="", help="a tokenizer folder ('' = the model's own)")
    parser.add_argument("--context", type=int, default=0,
                        help="context window in tokens (0 = the model's max_position_embeddings, at most 2048); "
                             "the oldest turns are dropped to stay inside it")
    parser.add_argument("--template", choices=TEMPLATES, default="auto",
                        help="auto: the tokenizer's chat template; plain: the messages as written, concatenated "
                             "(for a policy trained on prompt/completion text)")
    parser.add_argument("--system", default=None, help="the system message")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="the longest answer")
    parser.add_argument("--seed", type=int, default=0)


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`ChatModel` keyword arguments (besides the model) from the parsed options."""
    return {"tokenizer": args.tokenizer, "max_context": args.context}


def session_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`ChatSession` / `ChatService` settings from the parsed options."""
    return {"system": args.system, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
            "max_new_tokens": args.max_new_tokens, "template": args.template}
