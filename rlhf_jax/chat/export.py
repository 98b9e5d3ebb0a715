"""Exporting a comparison store whose items include chat comparisons (conversation prompts)."""

from __future__ import annotations

import os
from typing import Any

from rlhf_jax.chat.template import comparison_renderer
from rlhf_jax.data.tokenizer import load_tokenizer
from rlhf_jax.feedback.store import ComparisonStore
from rlhf_jax.models.load import load_tokenizer_of

__all__ = ["export_store"]


def export_store(store: ComparisonStore, out: str | os.PathLike[str], *, model: Any = None, tokenizer: Any = "",
                 format: str = "pairs") -> dict[str, int]:
    """`store.export_preferences(out)` with chat comparisons rendered by a chat template: the
    tokenizer's, or else `model`'s, or else that of the one policy the chat comparisons recorded
    in their meta. A store without conversations needs none of them. Returns the counts."""
    render = None
    chats = [item for item in store.items() if not isinstance(item["prompt"], str)]
    if chats:
        if tokenizer:
            tok = load_tokenizer(tokenizer)
        else:
            if not model:
                policies = sorted({str(item["meta"].get("policy")) for item in chats})
                if len(policies) != 1 or policies[0] == "None":
                    raise ValueError(f"model: the chat comparisons in {store.path} come from {len(policies)} "
                                     f"policies {policies[:3]}; name the model whose chat template renders them")
                model = policies[0]
            tok = load_tokenizer_of(model)
        render = comparison_renderer(tok)
    return store.export_preferences(out, format=format, render=render)
