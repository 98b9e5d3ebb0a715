"""`ChatSession`: a conversation with a policy, turn after turn, on a KV cache kept between turns.

    from rlhf_jax.chat import ChatSession
    chat = ChatSession("runs/quickstart/round_1/ppo/model", system="Be brief.", temperature=0.7)
    reply = chat.send("Hello!", on_text=lambda delta: print(delta, end="", flush=True))
    two = chat.send_two("Tell me about cats.")   # two sampled answers to one turn
    chat.choose(1)                               # the conversation goes on with the second
    save_comparison(store, two, choice=1, labeler="alice", meta=chat.meta())

The whole conversation is rendered with the chat template (`template.render`) before every
answer; the engine reuses the cached keys and values of the part it saw before, so a turn
costs its new tokens, not the history. When the rendered conversation plus `max_new_tokens`
would not fit the context window, the oldest whole turns (a user message and the answers
after it) are dropped until it fits; the system message is always kept, and the reply says
how many turns were dropped (`Reply.notice`). Dropped turns stay dropped for the rest of the
conversation (`messages` keeps them for the transcript), so the cached prefix is stable again
from the next turn on.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any, Callable, Mapping, Sequence

import jax

from rlhf_jax.chat.engine import CacheState, ChatModel, Generated
from rlhf_jax.chat.template import check_template, encode, render, stop_token_ids, template_messages
from rlhf_jax.feedback.store import ComparisonStore

__all__ = ["ChatSession", "ContextError", "Reply", "TwoAnswers", "add_choice", "comparison_item", "save_comparison"]

CHOICES = (0, 1, "tie", "skip")


class ContextError(ValueError):
    """The newest message alone (with the system message and max_new_tokens) does not fit."""


@dataclasses.dataclass(frozen=True)
class Reply:
    """One answer of the conversation. `notice` says what changed (turns dropped, a system
    message merged into the first user turn), or is None."""

    text: str
    generated: Generated
    dropped_turns: int
    notice: str | None


@dataclasses.dataclass(frozen=True)
class TwoAnswers:
    """Two sampled answers to one turn, awaiting `ChatSession.choose`.

    `context` is the conversation the model answered (after dropped turns), the prompt a
    stored comparison keeps.
    """

    context: tuple[dict, ...]
    answers: tuple[Generated, Generated]
    dropped_turns: int
    notice: str | None

    @property
    def texts(self) -> list[str]:
        return [a.text for a in self.answers]


class ChatSession:
    """One conversation with a policy (see the module docstring).

    Args:
      model: a `ChatModel` (shared by many sessions), or what `ChatModel` takes (a model
        directory, a .gguf file, a (model, tokenizer) pair); `model_kwargs` go to `ChatModel`.
      system: the system message, or None.
      temperature: 0 = greedy. top_k, top_p: as in `sampling.SamplingConfig`.
      max_new_tokens: the longest answer; this much room is kept free in the context window.
      template: "auto" (the tokenizer's chat template) or "plain" (`chat.template`).
      seed: answers are sampled with fold_in(key(seed), answer number).
      prefix_cache: False re-runs the whole conversation every turn (for comparison).
    """

    def __init__(self, model: Any, *, system: str | None = None, temperature: float = 0.7, top_k: int = 0,
                 top_p: float = 1.0, max_new_tokens: int = 256, template: str = "auto", seed: int = 0,
                 prefix_cache: bool = True, policy_name: str | None = None, **model_kwargs):
        self.model = model if isinstance(model, ChatModel) else ChatModel(model, **model_kwargs)
        self.policy_name = policy_name or (str(model) if isinstance(model, str) or hasattr(model, "__fspath__")
                                           else None)
        self.tokenizer = self.model.tokenizer
        self.template = check_template(template)
        self.temperature, self.top_k, self.top_p, self.max_new_tokens = 0.7, 0, 1.0, 256  # checked just below
        self.set_sampling(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens)
        self.stop_ids = stop_token_ids(self.tokenizer, self.template)
        self.seed = int(seed)
        self.prefix_cache = bool(prefix_cache)
        self._key = jax.random.key(self.seed)
        self._answers = 0
        self.messages: list[dict[str, str]] = []
        self.first_turn = 0  # turns before this one were dropped from the context
        self.pending: TwoAnswers | None = None
        self._state = CacheState()
        if system:
            self.messages.append({"role": "system", "content": str(system)})

    # ---------------------------------------------------------------- settings
    def set_sampling(self, *, temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                     max_new_tokens: int | None = None) -> None:
        """Changes the sampling settings (None keeps one); ValueError names a bad value."""
        temperature = self.temperature if temperature is None else float(temperature)
        top_k = self.top_k if top_k is None else int(top_k)
        top_p = self.top_p if top_p is None else float(top_p)
        max_new = self.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if not temperature >= 0:
            raise ValueError(f"temperature: must be >= 0 (0 = greedy), got {temperature}")
        if top_k < 0 or not 0 < top_p <= 1:
            raise ValueError(f"top_k must be >= 0 and top_p in (0, 1], got top_k={top_k}, top_p={top_p}")
        if not 1 <= max_new < self.model.max_context:
            raise ValueError(f"max_new_tokens: must be in [1, {self.model.max_context - 1}] (the context window "
                             f"is {self.model.max_context} tokens), got {max_new}")
        self.temperature, self.top_k, self.top_p, self.max_new_tokens = temperature, top_k, top_p, max_new

    @property
    def system(self) -> str | None:
        return self.messages[0]["content"] if self.messages and self.messages[0]["role"] == "system" else None

    def set_system(self, text: str | None) -> None:
        """Sets (or with None/'' removes) the system message; the turns so far stay."""
        if self.system is not None:
            self.messages.pop(0)
        if text:
            self.messages.insert(0, {"role": "system", "content": str(text)})

    def reset(self) -> None:
        """A new conversation with the same system message and settings."""
        self.messages = [m for m in self.messages[:1] if m["role"] == "system"]
        self.first_turn = 0
        self.pending = None

    def drop_cache(self) -> None:
        """Frees the conversation's KV cache; the next turn prefills the whole context again."""
        self._state = CacheState()

    def meta(self) -> dict[str, Any]:
        """What a stored comparison records about how its answers were produced."""
        return {"source": "chat", "policy": self.policy_name, "template": self.template,
                "temperature": self._two_temperature(), "top_k": self.top_k, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens, "max_context": self.model.max_context}

    # ---------------------------------------------------------------- context
    def _split(self, messages: Sequence[dict]) -> tuple[list[dict], list[list[dict]]]:
        """(system messages, turns): each turn starts at a user message."""
        system = [m for m in messages[:1] if m["role"] == "system"]
        turns: list[list[dict]] = []
        for m in messages[len(system):]:
            if m["role"] == "user" or not turns:
                turns.append([])
            turns[-1].append(m)
        return system, turns

    def context(self) -> list[dict[str, str]]:
        """The messages the model sees now: the system message and the turns not dropped."""
        system, turns = self._split(self.messages)
        return system + [m for turn in turns[self.first_turn:] for m in turn]

    def _fit(self, messages: list[dict]) -> tuple[list[dict], list[int], int, str | None]:
        """(context messages as the template takes them, their ids, first kept turn, note)."""
        system, turns = self._split(messages)
        first = self.first_turn
        while True:
            kept = system + [m for turn in turns[first:] for m in turn]
            fitted, note = template_messages(self.tokenizer, kept, self.template)
            ids = encode(self.tokenizer, render(self.tokenizer, fitted, template=self.template))
            if len(ids) + self.max_new_tokens <= self.model.max_context:
                return fitted, ids, first, note
            if first >= len(turns) - 1:
                raise ContextError(
                    f"the message does not fit: {len(ids)} prompt tokens (system message and this message, every "
                    f"earlier turn dropped) + max_new_tokens {self.max_new_tokens} > the context window of "
                    f"{self.model.max_context} tokens; shorten it, lower max_new_tokens or raise the context")
            first += 1

    def _prepare(self, text: str) -> tuple[list[dict], list[dict], list[int], int, str | None]:
        if self.pending is not None:
            raise ValueError("pick one of the two answers first (choose 0 or 1)")
        if not isinstance(text, str) or not text.strip():
            raise ValueError("the message is empty")
        messages = self.messages + [{"role": "user", "content": text}]
        fitted, ids, first, note = self._fit(messages)
        dropped = first - self.first_turn
        notes = [note] if note else []
        if dropped:
            notes.insert(0, f"dropped the {dropped} oldest turn{'s' if dropped > 1 else ''} to fit the context "
                            f"window of {self.model.max_context} tokens ({first} dropped so far"
                            f"{'; the system message is kept' if self.system else ''})")
        return messages, fitted, ids, first, "; ".join(notes) or None

    def _generate(self, ids: list[int], temperature: float, on_text) -> Generated:
        key = jax.random.fold_in(self._key, self._answers)
        self._answers += 1
        # The engine donates the cache to its programs: if generation fails half way, the
        # next turn starts from an empty cache instead of a consumed one.
        state, self._state = self._state, CacheState()
        answer, self._state = self.model.generate(
            state, ids, max_new_tokens=self.max_new_tokens, temperature=temperature, top_k=self.top_k,
            top_p=self.top_p, stop_ids=self.stop_ids, key=key, prefix_cache=self.prefix_cache, on_text=on_text)
        return answer

    def _two_temperature(self) -> float:
        # Two greedy answers would be the same text: a two-answer turn samples at T = 1 then.
        return self.temperature if self.temperature > 0 else 1.0

    # ---------------------------------------------------------------- turns
    def send(self, text: str, on_text: Callable[[str], None] | None = None) -> Reply:
        """Adds a user message and the model's answer; `on_text(delta)` streams the answer."""
        messages, _, ids, first, notice = self._prepare(text)
        answer = self._generate(ids, self.temperature, on_text)
        self.messages = messages + [{"role": "assistant", "content": answer.text}]
        dropped, self.first_turn = first - self.first_turn, first
        return Reply(text=answer.text, generated=answer, dropped_turns=dropped, notice=notice)

    def send_two(self, text: str, on_text: Callable[[int, str], None] | None = None) -> TwoAnswers:
        """Adds a user message and samples two answers to it (`on_text(answer index, delta)`);
        the conversation goes on after `choose`."""
        messages, fitted, ids, first, notice = self._prepare(text)
        temperature = self._two_temperature()
        answers = tuple(self._generate(ids, temperature, None if on_text is None else
                                       (lambda delta, i=i: on_text(i, delta))) for i in range(2))
        self.messages = messages
        dropped, self.first_turn = first - self.first_turn, first
        self.pending = TwoAnswers(context=tuple(fitted), answers=answers, dropped_turns=dropped, notice=notice)
        return self.pending

    def choose(self, index: int) -> str:
        """Continues the conversation with answer `index` (0 or 1) of the pending pair; returns it."""
        if self.pending is None:
            raise ValueError("no two answers are waiting for a choice")
        if index not in (0, 1):
            raise ValueError(f"choice: expected 0 or 1, got {index!r}")
        text = self.pending.texts[index]
        self.messages.append({"role": "assistant", "content": text})
        self.pending = None
        return text

    def transcript(self) -> dict[str, Any]:
        """The conversation as a `messages` row (what SFT reads), with the policy and the time."""
        time = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
        return {"messages": [dict(m) for m in self.messages], "policy": self.policy_name, "time": time}


def comparison_item(two: TwoAnswers, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A two-answer turn as a store item: the conversation the model answered as its `messages`
    prompt, the two answers as its responses."""
    return {"prompt": [dict(m) for m in two.context], "responses": two.texts,
            "meta": dict(meta or {}, dropped_turns=two.dropped_turns)}


def add_choice(store: ComparisonStore, item_id: str, *, choice: int | str, labeler: str) -> dict[str, Any]:
    """Stores a judgement of a two-answer item (0 or 1: that answer is better; "tie"; "skip")."""
    if choice not in CHOICES:
        raise ValueError(f"choice: expected one of {CHOICES}, got {choice!r}")
    if choice in (0, 1):
        return store.add_label(item_id, labeler, "choice", [choice])
    return store.add_label(item_id, labeler, choice)


def save_comparison(store: ComparisonStore, two: TwoAnswers, *, choice: int | str, labeler: str,
                    meta: Mapping[str, Any] | None = None) -> tuple[str, dict]:
    """Stores a two-answer turn and its judgement (`comparison_item`, `add_choice`); returns
    (item id, label)."""
    if choice not in CHOICES:
        raise ValueError(f"choice: expected one of {CHOICES}, got {choice!r}")
    (item_id,) = store.add_items([comparison_item(two, meta)])
    return item_id, add_choice(store, item_id, choice=choice, labeler=labeler)
