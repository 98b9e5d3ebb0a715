"""Row formats, as users know them from TRL and LLaMA-Factory, turned into text examples.

Each task has a few formats, detected from the columns (`detect_format`) or named:

SFT (`sft_text`):
  text              {"text"}                          loss on every token
  prompt_completion {"prompt", "completion"}          loss on the completion
  messages          {"messages": [{role, content}]}   loss on every assistant turn
  alpaca            {"instruction", "input"?, "output", "history"?, "system"?}   loss on output
Preferences (`preference_text`):
  explicit          {"prompt", "chosen", "rejected", "margin"?}
  implicit          {"chosen", "rejected", "margin"?}  full dialogues (Anthropic HH)
  ranked            {"prompt", "ranked": [best, ..., worst]}
  alpaca_ranked     {"instruction", "input", "output": [best, ...], "history"?}  (OpenAssistant)
Prompts for PPO (`prompt_text`):
  prompt {"prompt"}; messages (a final assistant turn is dropped); alpaca; implicit (the
  shared prompt of a chosen/rejected pair).

Plain-text formats (text, prompt_completion, explicit, implicit, ranked, prompt) are used as
written: the sequence is prompt + response, concatenated without a separator. Chat formats
(messages, alpaca*) are rendered with the tokenizer's chat template; an alpaca row becomes the
conversation [system?, history turns..., user: instruction + "\n\n" + input].

Chat SFT: the assistant spans are found by rendering the conversation turn by turn (the text
before turn i with a generation prompt, then with turn i). When the template renders every
turn as an extension of the previous text (prefix-stable, like the default template and
ChatML), every assistant turn is a target. Templates that rewrite earlier turns (e.g. ones
that strip reasoning from past turns) fall back to training on the LAST assistant turn only.

Ranked lists: identical responses within one list are merged (the first, best-ranked copy
is kept; the merge is counted in the report) because a pair of identical texts carries no
preference; a list with fewer than 2 distinct responses is a bad row.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Sequence

from rlhf_jax.data.records import RowProblem

SFT_FORMATS = ("text", "prompt_completion", "messages", "alpaca")
PREFERENCE_FORMATS = ("explicit", "implicit", "ranked", "alpaca_ranked")
PROMPT_FORMATS = ("prompt", "messages", "alpaca", "implicit")

# (format, columns that must all be present), tried in order: the first match wins.
_DETECT = {
    "sft": (("messages", {"messages"}), ("prompt_completion", {"prompt", "completion"}),
            ("alpaca", {"instruction", "output"}), ("text", {"text"})),
    "preference": (("ranked", {"ranked"}), ("alpaca_ranked", {"instruction", "output"}),
                   ("explicit", {"prompt", "chosen", "rejected"}), ("implicit", {"chosen", "rejected"})),
    "prompt": (("messages", {"messages"}), ("prompt", {"prompt"}), ("alpaca", {"instruction"}),
               ("implicit", {"chosen", "rejected"})),
}
_FORMATS = {"sft": SFT_FORMATS, "preference": PREFERENCE_FORMATS, "prompt": PROMPT_FORMATS}

HH_ASSISTANT = "\n\nAssistant:"


@dataclasses.dataclass(frozen=True)
class SFTText:
    """One demonstration as text.

    Attributes:
      context: (text, is_target) segments before the final response; targets here are
        earlier assistant turns of a conversation.
      response: the final target text (the EOS is appended at tokenization unless the chat
        template already ends the turn with it).
    """

    context: tuple[tuple[str, bool], ...]
    response: str

    @property
    def prompt(self) -> str:
        return "".join(text for text, _ in self.context)


@dataclasses.dataclass(frozen=True)
class PreferenceText:
    """One prompt with responses and the preferences between them.

    Attributes:
      prompt: the shared prompt text.
      responses: distinct response texts (continuations of the prompt).
      pairs: (chosen index, rejected index, margin) into `responses`.
    """

    prompt: str
    responses: tuple[str, ...]
    pairs: tuple[tuple[int, int, float], ...]


def resolve_format(rows: Sequence[dict[str, Any]], task: str, format: str, source: str) -> str:
    """Returns `format` if valid for `task`, or the format detected from the columns.

    Detection looks at the union of non-null columns over all rows, so one row with a
    missing field does not change the format (it is reported as a bad row instead).
    """
    allowed = _FORMATS[task]
    if format != "auto":
        if format not in allowed:
            raise ValueError(f"format {format!r} is not a {task} format; use 'auto' or one of {allowed}")
        return format
    columns: set[str] = set()
    for row in rows:
        columns.update(k for k, v in row.items() if v is not None)
    for name, needed in _DETECT[task]:
        if needed <= columns:
            return name
    expected = "; ".join(f"{name}: {sorted(needed)}" for name, needed in _DETECT[task])
    raise ValueError(
        f"{source}: cannot detect the {task} format from the columns {sorted(columns)}. Expected "
        f"columns for one of ({expected}), or pass format= explicitly."
    )


# ----------------------------------------------------------------------------- field checks


def _str(row: dict[str, Any], field: str, *, empty_reason: str | None = None) -> str:
    """row[field] as a string; `empty_reason` makes an empty/whitespace string a bad row."""
    value = row.get(field)
    if value is None:
        raise RowProblem("missing_field", field, "missing")
    if not isinstance(value, str):
        raise RowProblem("wrong_type", field, f"expected a string, got {type(value).__name__}")
    if empty_reason and not value.strip():
        raise RowProblem(empty_reason, field, "is empty")
    return value


def _optional_str(row: dict[str, Any], field: str) -> str:
    value = row.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowProblem("wrong_type", field, f"expected a string, got {type(value).__name__}")
    return value


def _margin(row: dict[str, Any]) -> float:
    value = row.get("margin")
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RowProblem("wrong_type", "margin", f"expected a finite number, got {value!r}")
    return float(value)


def _messages(row: dict[str, Any], field: str = "messages") -> list[dict[str, str]]:
    value = row.get(field)
    if value is None:
        raise RowProblem("missing_field", field, "missing")
    if not isinstance(value, list) or not value:
        raise RowProblem("wrong_type", field, f"expected a non-empty list of {{role, content}}, got {value!r:.60}")
    out = []
    for k, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RowProblem("wrong_type", field, f"message {k} is not {{'role': str, 'content': str}}: {m!r:.60}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _alpaca_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """[system?, history turns..., user: instruction (+ "\\n\\n" + input)] of an alpaca row."""
    instruction = _str(row, "instruction", empty_reason="empty_prompt")
    extra = _optional_str(row, "input")
    messages = []
    system = _optional_str(row, "system")
    if system:
        messages.append({"role": "system", "content": system})
    history = row.get("history") or []
    if not isinstance(history, list):
        raise RowProblem("wrong_type", "history", f"expected a list of [user, assistant], got {history!r:.60}")
    for turn in history:
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise RowProblem("wrong_type", "history", f"expected [user, assistant] strings, got {turn!r:.60}")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    messages.append({"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction})
    return messages


# ----------------------------------------------------------------------------- chat rendering


def _render(tokenizer, messages: list[dict[str, str]], generation_prompt: bool, field: str = "messages") -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except ImportError:
        raise  # a missing package (jinja2) is the installation's fault, not the row's
    except Exception as e:  # noqa: BLE001 — a template may raise anything (e.g. roles must alternate)
        raise RowProblem("bad_messages", field, f"the chat template cannot render it: {e}") from None


def _chat_sft(tokenizer, messages: list[dict[str, str]], field: str) -> SFTText:
    if messages[-1]["role"] != "assistant":
        raise RowProblem("bad_messages", field, "the last message must be an assistant turn")
    if not messages[-1]["content"].strip():
        raise RowProblem("empty_response", field, "the last assistant turn is empty")
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True, field)
        after = _render(tokenizer, messages[: i + 1], False, field)
        if not (before.startswith(done) and after.startswith(before)):
            segments = []  # not prefix-stable: train on the last turn only
            break
        segments += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    if not segments:
        before = _render(tokenizer, messages[:-1], True, field)
        after = _render(tokenizer, messages, False, field)
        if not after.startswith(before):
            raise RowProblem("bad_messages", field, "the chat template does not render the conversation "
                             "as (text before the last assistant turn) + (that turn)")
        segments = [(before, False), (after[len(before):], True)]
    context = tuple(s for s in segments[:-1] if s[0])
    return SFTText(context=context, response=segments[-1][0])


def _chat_prompt_and_responses(tokenizer, messages, responses: Sequence[str], field: str) -> tuple[str, list[str]]:
    """The rendered prompt (with generation prompt) and each response's rendered continuation."""
    prompt = _render(tokenizer, messages, True, field)
    out = []
    for r in responses:
        full = _render(tokenizer, messages + [{"role": "assistant", "content": r}], False, field)
        if not full.startswith(prompt):
            raise RowProblem("bad_messages", field, "the chat template does not render prompt + response as "
                             "an extension of the prompt")
        out.append(full[len(prompt):])
    return prompt, out


# ----------------------------------------------------------------------------- SFT


def sft_text(row: dict[str, Any], format: str, tokenizer) -> SFTText:
    """Parses one SFT row; raises `RowProblem` for a bad row."""
    if format == "text":
        return SFTText(context=(), response=_str(row, "text", empty_reason="empty_response"))
    if format == "prompt_completion":
        prompt = _str(row, "prompt")
        completion = _str(row, "completion", empty_reason="empty_response")
        return SFTText(context=((prompt, False),) if prompt else (), response=completion)
    if format == "messages":
        return _chat_sft(tokenizer, _messages(row), "messages")
    if format == "alpaca":
        messages = _alpaca_messages(row)
        output = _str(row, "output", empty_reason="empty_response")
        return _chat_sft(tokenizer, messages + [{"role": "assistant", "content": output}], "output")
    raise ValueError(f"unknown SFT format {format!r}")


# ----------------------------------------------------------------------------- preferences


def split_implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Splits two full dialogues (Anthropic HH) into (prompt, chosen response, rejected response).

    The prompt is the shared text up to and including the last `\\n\\nAssistant:` that lies
    wholly inside the common prefix of the two dialogues; the responses are what follows
    (they usually start with a space). For well-formed pairs this is the last
    `\\n\\nAssistant:` of each dialogue. Using the common prefix also handles the few real
    rows where one side has extra turns (the prompt then ends at the last shared turn).
    """
    shared = len(os.path.commonprefix([chosen, rejected]))
    cut = chosen.rfind(HH_ASSISTANT, 0, shared)
    if cut < 0:
        raise RowProblem("no_shared_prompt", "chosen",
                         f"chosen and rejected share no prefix ending in {HH_ASSISTANT!r}")
    end = cut + len(HH_ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]


def _pair(prompt: str, chosen: str, rejected: str, margin: float) -> PreferenceText:
    if not chosen.strip():
        raise RowProblem("empty_response", "chosen", "the chosen response is empty")
    if not rejected.strip():
        raise RowProblem("empty_response", "rejected", "the rejected response is empty")
    if chosen == rejected:
        raise RowProblem("identical_responses", "rejected", "chosen and rejected are identical")
    return PreferenceText(prompt=prompt, responses=(chosen, rejected), pairs=((0, 1, margin),))


def _ranked(prompt: str, ranked: list[str], field: str, note: Callable[[str], None]) -> PreferenceText:
    distinct: list[str] = []
    for k, r in enumerate(ranked):
        if not r.strip():
            raise RowProblem("empty_response", field, f"response {k} (0-based, best first) is empty")
        if r in distinct:
            note("duplicate_ranked_responses_merged")
        else:
            distinct.append(r)
    if len(distinct) < 2:
        raise RowProblem("too_few_responses", field,
                         f"needs at least 2 distinct ranked responses, got {len(distinct)} (of {len(ranked)})")
    k = len(distinct)
    pairs = tuple((i, j, 0.0) for i in range(k) for j in range(i + 1, k))
    return PreferenceText(prompt=prompt, responses=tuple(distinct), pairs=pairs)


def _str_list(row: dict[str, Any], field: str) -> list[str]:
    value = row.get(field)
    if value is None:
        raise RowProblem("missing_field", field, "missing")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RowProblem("wrong_type", field, f"expected a list of strings, got {value!r:.60}")
    if len(value) < 2:
        raise RowProblem("too_few_responses", field, f"needs at least 2 ranked responses, got {len(value)}")
    return value


def preference_text(row: dict[str, Any], format: str, tokenizer, note: Callable[[str], None]) -> PreferenceText:
    """Parses one preference row; raises `RowProblem` for a bad row. `note(key)` counts quirks."""
    if format == "explicit":
        prompt = _str(row, "prompt")
        return _pair(prompt, _str(row, "chosen"), _str(row, "rejected"), _margin(row))
    if format == "implicit":
        chosen, rejected = _str(row, "chosen"), _str(row, "rejected")
        margin = _margin(row)
        if chosen == rejected:
            raise RowProblem("identical_responses", "rejected", "chosen and rejected are identical")
        prompt, c, r = split_implicit_prompt(chosen, rejected)
        return _pair(prompt, c, r, margin)
    if format == "ranked":
        return _ranked(_str(row, "prompt"), _str_list(row, "ranked"), "ranked", note)
    if format == "alpaca_ranked":
        messages = _alpaca_messages(row)
        outputs = _str_list(row, "output")
        parsed = _ranked("", outputs, "output", note)  # validates and merges duplicates first
        prompt, responses = _chat_prompt_and_responses(tokenizer, messages, parsed.responses, "output")
        return dataclasses.replace(parsed, prompt=prompt, responses=tuple(responses))
    raise ValueError(f"unknown preference format {format!r}")


# ----------------------------------------------------------------------------- prompts


def prompt_text(row: dict[str, Any], format: str, tokenizer) -> str:
    """Parses one prompt row (for PPO rollouts); raises `RowProblem` for a bad row."""
    if format == "prompt":
        return _str(row, "prompt", empty_reason="empty_prompt")
    if format == "messages":
        messages = _messages(row)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise RowProblem("empty_prompt", "messages", "no message before the final assistant turn")
        return _render(tokenizer, messages, True)
    if format == "alpaca":
        return _render(tokenizer, _alpaca_messages(row), True)
    if format == "implicit":
        chosen, rejected = _str(row, "chosen"), _str(row, "rejected")
        if chosen == rejected:
            # Both are the same dialogue: the prompt is everything up to its last turn.
            cut = chosen.rfind(HH_ASSISTANT)
            if cut < 0:
                raise RowProblem("no_shared_prompt", "chosen", f"no {HH_ASSISTANT!r} turn")
            return chosen[: cut + len(HH_ASSISTANT)]
        return split_implicit_prompt(chosen, rejected)[0]
    raise ValueError(f"unknown prompt format {format!r}")
