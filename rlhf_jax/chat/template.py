"""Turning a conversation into the text and token ids a policy reads, and back into comparisons.

A conversation is a list of `{"role": "system" | "user" | "assistant", "content": str}`.
Two ways to render it (`TEMPLATES`):

- "auto": the tokenizer's chat template. `data.load_tokenizer` gives every tokenizer one: a
  tokenizer that ships without (GPT-2, the byte tokenizer of tiny models) gets the project's
  default `<|role|>\\n{content}<eos>`, the one SFT on chat data (`messages`, alpaca rows)
  trains. A template that refuses a system message (some require strictly alternating
  user/assistant turns) gets it merged into the first user message instead.
- "plain": the contents as written, concatenated, each assistant turn ended by EOS: the
  layout of prompt/completion and explicit-preference data ([BOS] + prompt + response + [EOS]),
  for a policy trained on plain text (the quickstart's "Describe the cat:" -> " kind warm").

`comparison_texts` renders one chat comparison the way the reward-model, DPO and PPO readers
take an explicit preference row: the prompt text (with the generation prompt) and each
answer's rendered continuation, so the reader sees exactly the tokens the policy saw.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

TEMPLATES = ("auto", "plain")
ROLES = ("system", "user", "assistant")
_SENTINEL = "\u2063chat-sentinel\u2063"  # an answer text no tokenizer merges with what follows


def check_template(template: str) -> str:
    if template not in TEMPLATES:
        raise ValueError(f"template: {template!r} is not one of {TEMPLATES}")
    return template


def check_messages(messages: Any, where: str = "messages") -> list[dict[str, str]]:
    """A copy of a conversation as plain {role, content} dicts, or ValueError naming the message."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of {{'role', 'content'}} messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or set(m) != {"role", "content"}:
            raise ValueError(f"{where}[{i}]: expected {{'role': ..., 'content': ...}}, got {m!r:.80}")
        if m["role"] not in ROLES or not isinstance(m["content"], str):
            raise ValueError(f"{where}[{i}]: role must be one of {ROLES} and content a string, got {m!r:.80}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _apply(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def template_messages(tokenizer, messages: Sequence[Mapping[str, str]], template: str = "auto"
                      ) -> tuple[list[dict[str, str]], str | None]:
    """(messages as the template takes them, a note when they had to change).

    The only change: a system message the chat template refuses is merged into the first user
    message ("{system}\\n\\n{user}"). Raises ValueError when the template refuses the
    conversation anyway.
    """
    messages = [dict(m) for m in messages]
    if template == "plain":
        return messages, None
    try:
        _apply(tokenizer, messages, True)
        return messages, None
    except ImportError:
        raise  # jinja2 missing: the installation's fault, not the conversation's
    except Exception as e:  # noqa: BLE001 -- a template may raise anything (raise_exception(...))
        error = e
    if messages and messages[0]["role"] == "system" and len(messages) > 1 and messages[1]["role"] == "user":
        merged = [{"role": "user", "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}] + messages[2:]
        try:
            _apply(tokenizer, merged, True)
            return merged, "the chat template takes no system message: it is sent as part of the first user message"
        except Exception:  # noqa: BLE001
            pass
    raise ValueError(f"the chat template cannot render this conversation ({error}); try template 'plain'")


def render(tokenizer, messages: Sequence[Mapping[str, str]], *, template: str = "auto",
           add_generation_prompt: bool = True) -> str:
    """The conversation as text; with `add_generation_prompt`, ready for the assistant's answer."""
    if check_template(template) == "plain":
        eos = tokenizer.eos_token or ""
        return "".join(m["content"] + (eos if m["role"] == "assistant" else "") for m in messages)
    return _apply(tokenizer, list(messages), add_generation_prompt)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered conversation: [BOS] (unless the text starts with it) + the text's
    tokens, the layout every dataset of this project trains on (`data.examples`)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


def stop_token_ids(tokenizer, template: str = "auto") -> tuple[int, ...]:
    """The ids that end an answer: EOS, and the special token the chat template writes right
    after an assistant message (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3, ...)."""
    stop = {int(tokenizer.eos_token_id)}
    if template == "auto":
        try:
            text = _apply(tokenizer, [{"role": "user", "content": "hi"},
                                      {"role": "assistant", "content": _SENTINEL}], False)
        except Exception:  # noqa: BLE001 -- e.g. a template that wants a system message: EOS only
            text = ""
        if _SENTINEL in text:
            tail = tokenizer(text.split(_SENTINEL, 1)[1], add_special_tokens=False)["input_ids"]
            if tail and tail[0] in set(tokenizer.all_special_ids):
                stop.add(int(tail[0]))
    return tuple(sorted(stop))


def comparison_texts(tokenizer, messages: Sequence[Mapping[str, str]], responses: Sequence[str],
                     template: str = "auto") -> tuple[str, list[str]]:
    """(prompt text, each response as rendered after it) for an explicit preference row.

    "auto": the prompt with the generation prompt, each response the text the template adds
    for that assistant turn (its end-of-turn marker included). "plain": the responses as
    written (the readers append EOS).
    """
    prompt = render(tokenizer, messages, template=template, add_generation_prompt=True)
    if template == "plain":
        return prompt, list(responses)
    out = []
    for r in responses:
        full = render(tokenizer, list(messages) + [{"role": "assistant", "content": r}], template=template,
                      add_generation_prompt=False)
        if not full.startswith(prompt):
            raise ValueError("the chat template does not render prompt + answer as an extension of the prompt, "
                             "so the answer cannot be scored on its own; export with template 'plain'")
        out.append(full[len(prompt):])
    return prompt, out


def comparison_renderer(tokenizer) -> Callable[[Mapping[str, Any]], tuple[str, list[str]]]:
    """`render` for `ComparisonStore.export_preferences`: an item with a conversation prompt ->
    (prompt text, response texts), with the template the chat recorded in the item's meta."""
    def render_item(item: Mapping[str, Any]) -> tuple[str, list[str]]:
        template = check_template(item.get("meta", {}).get("template", "auto"))
        return comparison_texts(tokenizer, item["prompt"], item["responses"], template)

    return render_item
