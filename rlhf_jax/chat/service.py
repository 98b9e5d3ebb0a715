"""Many conversations over one policy, for the chat page: the part of the chat server that
knows nothing about HTTP.

Each conversation is a `ChatSession` on the shared `ChatModel` (answers are generated one at a
time; other users wait for the model, not for each other's turns to finish typing). A turn
shows two sampled answers when asked, or at random with probability `two_prob`; the item
(the conversation so far as its `messages` prompt, the two answers) is stored as soon as the
answers exist, so a closed tab leaves it in the store for the labeling page, and `choose`
adds the label (choice or tie, with the labeler id and the time) and continues the
conversation with the chosen answer (the first one on a tie).

Conversations live in memory: the `max_conversations` most recent are kept, and only the
`max_cached` most recent keep their KV cache (device memory); an evicted cache is rebuilt by
the next turn's prefill. A server restart forgets conversations, never stored comparisons.
"""

from __future__ import annotations

import collections
import random
import threading
import uuid
from typing import Any, Callable

from rlhf_jax.chat.engine import ChatModel
from rlhf_jax.chat.session import ChatSession, add_choice, comparison_item
from rlhf_jax.feedback.store import ComparisonStore

__all__ = ["ChatService", "ConversationBusy", "UnknownConversation"]


class UnknownConversation(ValueError):
    """A conversation id this server does not hold (never made, evicted, or a restart)."""


class ConversationBusy(ValueError):
    """A second request on a conversation whose turn is still being answered."""


class ChatService:
    """Conversations with one policy and the store their comparisons go to.

    Args:
      model: the shared `ChatModel`.
      store: where two-answer turns are stored.
      two_prob: probability that a turn shows two answers without being asked.
      system, temperature, top_k, top_p, max_new_tokens, template: every conversation's
        settings (`ChatSession`).
      seed: seeds the two-answer draw and each conversation's sampling.
    """

    def __init__(self, model: ChatModel, store: ComparisonStore, *, two_prob: float = 0.25, system: str | None = None,
                 temperature: float = 0.7, top_k: int = 0, top_p: float = 1.0, max_new_tokens: int = 256,
                 template: str = "auto", seed: int = 0, policy_name: str | None = None, max_conversations: int = 256,
                 max_cached: int = 4):
        if not 0.0 <= float(two_prob) <= 1.0:
            raise ValueError(f"two_prob: must be in [0, 1], got {two_prob}")
        if int(max_conversations) < 1 or int(max_cached) < 1:
            raise ValueError("max_conversations and max_cached must be >= 1")
        self.model = model
        self.store = store
        self.two_prob = float(two_prob)
        self.policy_name = policy_name
        self.settings = dict(system=system, temperature=temperature, top_k=top_k, top_p=top_p,
                             max_new_tokens=max_new_tokens, template=template)
        ChatSession(model, **self.settings)  # checks the settings now, not at the first turn
        self.max_conversations = int(max_conversations)
        self.max_cached = int(max_cached)
        self._seed = int(seed)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._sessions: collections.OrderedDict[str, ChatSession] = collections.OrderedDict()
        self._busy: set[str] = set()
        self._pending: dict[str, str] = {}  # conversation -> item id of its unanswered two-answer turn

    def config(self) -> dict[str, Any]:
        """What the page shows and needs."""
        return {"two_prob": self.two_prob, "policy": self.policy_name, "max_context": self.model.max_context,
                **{k: self.settings[k] for k in ("temperature", "top_k", "top_p", "max_new_tokens", "template")}}

    def messages(self, conversation: str) -> list[dict[str, str]]:
        """A copy of a conversation's messages so far."""
        with self._lock:
            if conversation not in self._sessions:
                raise UnknownConversation(f"conversation: {conversation!r:.40} is not open on this server")
            return [dict(m) for m in self._sessions[conversation].messages]

    def _claim(self, conversation: str | None) -> tuple[str, ChatSession]:
        with self._lock:
            if conversation is None:
                conversation = uuid.uuid4().hex
                session = ChatSession(self.model, seed=self._rng.randrange(1 << 31), policy_name=self.policy_name,
                                      **self.settings)
                self._sessions[conversation] = session
            elif conversation not in self._sessions:
                raise UnknownConversation(f"conversation: {conversation!r:.40} is not open on this server (it "
                                          "restarted, or the conversation is old); start a new one")
            if conversation in self._busy:
                raise ConversationBusy("conversation: the previous message is still being answered")
            self._busy.add(conversation)
            self._sessions.move_to_end(conversation)
            while len(self._sessions) > self.max_conversations:
                old, _ = self._sessions.popitem(last=False)
                self._busy.discard(old)
                self._pending.pop(old, None)
            # Only the most recent conversations keep their KV cache (device memory).
            for i, (cid, s) in enumerate(reversed(self._sessions.items())):
                if i >= self.max_cached and cid not in self._busy:
                    s.drop_cache()
            return conversation, self._sessions[conversation]

    def _release(self, conversation: str) -> None:
        with self._lock:
            self._busy.discard(conversation)

    def turn(self, conversation: str | None, text: str, *, two: bool | None = None,
             on_event: Callable[[dict], None] = lambda event: None) -> dict[str, Any]:
        """Answers a user message. Events, in order: {"conversation", "two"}, then
        {"delta"} (one answer) or {"answer": 0|1, "delta"} (two answers); returns the last
        event: {"done": True, "text"} or {"done": True, "answers", "item_id"}, each with
        "notice" (turns dropped, or None). `two` None draws it with `two_prob`."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("text: the message is empty")
        conversation, session = self._claim(conversation)
        try:
            if session.pending is not None:
                raise ValueError("choose one of the two answers first")
            with self._lock:
                two = bool(two) if two is not None else self._rng.random() < self.two_prob
            on_event({"conversation": conversation, "two": two})
            if not two:
                reply = session.send(text, on_text=lambda delta: on_event({"delta": delta}))
                return {"done": True, "text": reply.text, "notice": reply.notice}
            pair = session.send_two(text, on_text=lambda i, delta: on_event({"answer": i, "delta": delta}))
            meta = dict(session.meta(), conversation=conversation, turn=sum(m["role"] == "user" for m in
                                                                              session.messages))
            (item_id,) = self.store.add_items([comparison_item(pair, meta)])
            self._pending[conversation] = item_id
            return {"done": True, "answers": pair.texts, "item_id": item_id, "notice": pair.notice}
        finally:
            self._release(conversation)

    def choose(self, conversation: str, item_id: str, choice: int | str, labeler: str) -> dict[str, Any]:
        """Records the labeler's judgement of the pending two answers (0, 1 or "tie") and goes on
        with the chosen answer; returns the stored label."""
        conversation, session = self._claim(conversation)
        try:
            if session.pending is None or self._pending.get(conversation) != item_id:
                raise ValueError(f"item_id: {item_id!r:.40} is not the pending two-answer turn of this conversation")
            if choice not in (0, 1, "tie"):
                raise ValueError(f"choice: expected 0, 1 or 'tie', got {choice!r:.20}")
            label = add_choice(self.store, item_id, choice=choice, labeler=labeler)
            session.choose(0 if choice == "tie" else choice)
            del self._pending[conversation]
            return label
        finally:
            self._release(conversation)
