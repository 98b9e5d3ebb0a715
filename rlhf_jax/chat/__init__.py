"""Chat with a policy: the inference side of RLHF, and the source of new comparisons.

- `template`: rendering a conversation (the tokenizer's chat template, or plain text), its
  end-of-turn tokens, and a chat comparison as the text the RM/DPO/PPO readers take.
- `engine`: `ChatModel`, a policy with compiled prefill/decode programs over a KV cache that
  is kept between turns.
- `session`: `ChatSession`, one conversation (streaming, two-answer turns, oldest turns
  dropped when the context window is full), and storing its comparisons.
- `service`: many conversations at once over one model, for the chat page
  (`python -m rlhf_jax.feedback.server --chat --model PATH --store DIR`).
- `cli`: `python -m rlhf_jax.chat --model PATH`, chat in the terminal; `options`: the
  command-line options it shares with the chat page.

The names below are imported on first use, so that `options` (which the labeling server
reads) does not pull in JAX.
"""

import importlib

_EXPORTS = {
    "CacheState": "engine", "ChatModel": "engine", "Generated": "engine",
    "ChatSession": "session", "ContextError": "session", "Reply": "session", "TwoAnswers": "session",
    "add_choice": "session", "comparison_item": "session", "save_comparison": "session",
    "ChatService": "service",
    "TEMPLATES": "template", "comparison_renderer": "template", "comparison_texts": "template",
    "render": "template", "stop_token_ids": "template",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rlhf_jax.chat' has no attribute {name!r}")
    return getattr(importlib.import_module(f"rlhf_jax.chat.{_EXPORTS[name]}"), name)
