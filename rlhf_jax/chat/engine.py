"""A policy loaded once for chat: compiled prefill and decode over a KV cache kept between turns.

Shape suffixes: T new tokens of one prefill call, S cache slots, C tokens of one decode call.

A conversation's `CacheState` holds its KV cache and the token ids whose keys and values the
cache holds (slots 0..n-1, all real: `cache.index == cache.lengths_B[0] == n`). A new turn
renders the whole conversation again, keeps the cache for the longest common prefix of the
old and new ids (normally everything up to the new user message) and prefills only the rest.
Rolling back to a shorter prefix (a template that rewrites earlier text, the other answer of
a two-answer turn, turns dropped from the front) is the same operation with a smaller start:
slots past it are masked out and written over.

Every program has a fixed shape, so a conversation compiles a handful of programs once:
prefill pads its new tokens on the right to a power-of-two bucket (16 ... `prefill_chunk`;
longer inputs go in `prefill_chunk` pieces), decode runs up to C tokens per call in a
`while_loop` that exits at an end-of-turn token (the streaming granularity), and the
temperature is an argument, so `/temp` does not recompile (greedy and sampling are two
programs). Attention reads every slot of the cache, so the cache grows with the
conversation instead of starting at the full window: S is a power of two from 256 (capped
at the window plus one prefill bucket), and a conversation that needs more slots moves to
the next size (its slots copied; one more set of programs to compile). Tokens are drawn with
the compiled sampler's `sample_token`; token t of a call uses `fold_in(key, t)`, as
`sampling.generate` does.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from rlhf_jax import sharding as sharding_lib
from rlhf_jax.models import KVCache, ModelDef, cached_program, load_model, model_mesh
from rlhf_jax.sampling import SamplingConfig, sample_token

MIN_BUCKET = 16
MIN_SLOTS = 256
# How often each chat program was traced, i.e. compiled for new shapes (a test checks that
# later turns compile nothing).
TRACES: collections.Counter[str] = collections.Counter()


def _counted(name: str, fn: Callable) -> Callable:
    def traced(*args):
        TRACES[name] += 1  # runs only while tracing
        return fn(*args)
    return traced


def _bucket(n: int, largest: int, smallest: int = MIN_BUCKET) -> int:
    size = smallest
    while size < n:
        size *= 2
    return min(size, largest)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclasses.dataclass
class CacheState:
    """One conversation's KV cache and the ids it holds (None: nothing cached yet)."""

    cache: KVCache | None = None
    ids: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Generated:
    """One answer.

    Attributes:
      tokens: the sampled ids, the end-of-turn token included when `stopped`.
      text: the answer's text (without the end-of-turn token and special tokens).
      stopped: it ended with an end-of-turn token (False: it hit max_new_tokens).
      prompt_tokens: tokens of the rendered conversation it answered.
      prefilled_tokens: how many of them were run through the model for this answer (the
        rest came from the cache).
      first_token_s: seconds from the call to the first token on the host.
      seconds: seconds for the whole answer.
    """

    tokens: tuple[int, ...]
    text: str
    stopped: bool
    prompt_tokens: int
    prefilled_tokens: int
    first_token_s: float
    seconds: float


class TextStream:
    """Decodes a growing list of answer tokens into text deltas (whole characters only)."""

    def __init__(self, tokenizer, stop_ids: Sequence[int]):
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids)
        self.tokens: list[int] = []
        self.text = ""

    def content(self) -> str:
        ids = self.tokens[:-1] if self.tokens and self.tokens[-1] in self.stop_ids else self.tokens
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def feed(self, new: Sequence[int], final: bool = False) -> str:
        self.tokens.extend(int(t) for t in new)
        text = self.content()
        if not final and text.endswith("\ufffd"):
            return ""  # a character split across tokens: wait for the rest of its bytes
        delta, self.text = text[len(self.text):], text
        return delta


def _prefill(model_def: ModelDef, config: SamplingConfig, params, cache: KVCache, ids_1T, start, n_real, key,
             temperature):
    """Keeps cache slots [0, start), writes the n_real real tokens of ids_1T (right-padded) after
    them and samples the token after the last one. Returns (token [], cache)."""
    model = model_def.merge(params)
    s, t = cache.max_length, ids_1T.shape[1]
    keep_1S = (jnp.arange(s) < start)[None]
    cache = cache.replace(mask_BS=jnp.where(keep_1S, cache.mask_BS, 0), lengths_B=jnp.full((1,), start, jnp.int32),
                          index=jnp.asarray(start, jnp.int32))
    mask_1T = (jnp.arange(t) < n_real).astype(jnp.int32)[None]
    h_1TD, cache = model.hidden(ids_1T, mask_1T, cache=cache)
    # The padding slots after the real tokens are free again: the next call writes from there.
    cache = cache.replace(index=jnp.asarray(start + n_real, jnp.int32))
    h_11D = jax.lax.dynamic_slice_in_dim(h_1TD, n_real - 1, 1, axis=1)
    tok_1, _ = sample_token(model.logits(h_11D)[:, 0] / temperature, jax.random.fold_in(key, 0), config)
    return tok_1[0], cache


def _decode(model_def: ModelDef, config: SamplingConfig, chunk: int, stop_ids: tuple[int, ...], params,
            cache: KVCache, tok, t0, limit, key, temperature):
    """Feeds `tok` (answer token t0 - 1) and samples up to min(chunk, limit) more, stopping after
    an end-of-turn token. Returns (tokens [C], how many are real, the last one, stopped, cache)."""
    model = model_def.merge(params)
    stop = jnp.asarray(stop_ids, jnp.int32)

    def cond(state):
        n, _, _, _, stopped = state
        return (n < chunk) & (n < limit) & ~stopped

    def body(state):
        n, cache, toks_C, prev, _ = state
        h_11D, cache = model.hidden(prev.reshape(1, 1), jnp.ones((1, 1), jnp.int32), cache=cache)
        new_1, _ = sample_token(model.logits(h_11D)[:, 0] / temperature, jax.random.fold_in(key, t0 + n), config)
        new = new_1[0]
        return n + 1, cache, toks_C.at[n].set(new), new, jnp.any(new == stop)

    state = (jnp.int32(0), cache, jnp.zeros((chunk,), jnp.int32), jnp.asarray(tok, jnp.int32), jnp.bool_(False))
    n, cache, toks_C, last, stopped = jax.lax.while_loop(cond, body, state)
    return toks_C, n, last, stopped, cache


def _grow(cache: KVCache, slots: int) -> KVCache:
    """The same cache with `slots` slots (the new ones empty)."""
    extra = slots - cache.max_length
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, extra), (0, 0)))  # noqa: E731
    return cache.replace(k=tuple(pad(x) for x in cache.k), v=tuple(pad(x) for x in cache.v),
                         mask_BS=jnp.pad(cache.mask_BS, ((0, 0), (0, extra))))


class ChatModel:
    """A policy and its tokenizer, with the compiled chat programs; safe to share between
    threads (one answer is generated at a time).

    Args:
      model: an HF directory (a stage's `workdir/model`), a `.gguf` file, a model config or a
        `(Transformer, tokenizer)` pair (`models.load_model`).
      tokenizer: '' for the model's own.
      max_context: the context window in tokens (prompt + answer); 0 = the model's
        max_position_embeddings, at most 2048.
      prefill_chunk: the largest prefill program (tokens); longer inputs take several calls.
      decode_chunk: tokens per decode call, i.e. how often text is streamed.
      mesh: where the parameters live (default: one device; a pair keeps its own).
    """

    def __init__(self, model: Any, *, tokenizer: Any = "", max_context: int = 0, prefill_chunk: int = 256,
                 decode_chunk: int = 8, mesh=None):
        if isinstance(model, (tuple, list)):
            model, tok = load_model(model, heads=("lm",), tokenizer=tokenizer)
        else:
            mesh = mesh if mesh is not None else sharding_lib.make_mesh(devices=jax.devices()[:1])
            model, tok = load_model(model, heads=("lm",), tokenizer=tokenizer, mesh=mesh)
        self.tokenizer = tok
        self.cfg = model.cfg
        self.mesh = model_mesh(model)
        self.model_def, _, self.params = ModelDef.split(model, None)
        limit = int(self.cfg.max_position_embeddings)
        self.max_context = int(max_context) or min(limit, 2048)
        if not 2 <= self.max_context <= limit:
            raise ValueError(f"max_context: must be in [2, {limit}] (the model's max_position_embeddings), "
                             f"got {max_context}")
        if int(prefill_chunk) < MIN_BUCKET or int(decode_chunk) < 1:
            raise ValueError(f"prefill_chunk must be >= {MIN_BUCKET} and decode_chunk >= 1, got {prefill_chunk}, "
                             f"{decode_chunk}")
        self.prefill_chunk = int(prefill_chunk)
        self.decode_chunk = int(decode_chunk)
        # A prefill writes a whole bucket from the first free slot, so the cache has room for one more.
        self.capacity = self.max_context + self.prefill_chunk
        self._grow = jax.jit(_grow, static_argnums=1)
        self.lock = threading.Lock()

    def new_state(self) -> CacheState:
        return CacheState()

    def _cache_with(self, cache: KVCache | None, needed: int) -> KVCache:
        """`cache` (or a new one) with at least `needed` slots, grown to the next size if short."""
        slots = _bucket(needed, self.capacity, MIN_SLOTS)
        if cache is None:
            return jax.device_put(KVCache.create(self.cfg, 1, slots), NamedSharding(self.mesh, P()))
        return self._grow(cache, slots) if cache.max_length < slots else cache

    def _programs(self, config: SamplingConfig, stop_ids: tuple[int, ...]):
        # Shared by every ChatModel of the same architecture (`cached_program`); nothing of
        # this instance is captured, so a cached program keeps no parameters alive.
        md, chunk = self.model_def, self.decode_chunk
        prefill = cached_program(
            "chat_prefill", md, self.mesh, config,
            lambda: jax.jit(_counted("chat_prefill", lambda *a: _prefill(md, config, *a)), donate_argnums=(1,)))
        decode = cached_program(
            "chat_decode", md, self.mesh, (config, chunk, stop_ids),
            lambda: jax.jit(_counted("chat_decode", lambda *a: _decode(md, config, chunk, stop_ids, *a)),
                            donate_argnums=(1,)))
        return prefill, decode

    def generate(self, state: CacheState, prompt_ids: Sequence[int], *, max_new_tokens: int, temperature: float,
                 top_k: int = 0, top_p: float = 1.0, stop_ids: Sequence[int] = (), key: jax.Array,
                 prefix_cache: bool = True, on_text: Callable[[str], None] | None = None
                 ) -> tuple[Generated, CacheState]:
        """Answers the rendered conversation `prompt_ids` from `state`; returns (answer, new state).

        `on_text(delta)` is called with the answer's text as it is produced. With
        `prefix_cache=False` the whole conversation is prefilled again (the benchmark's baseline).
        """
        prompt_ids = [int(i) for i in prompt_ids]
        if not prompt_ids:
            raise ValueError("prompt_ids: empty")
        if len(prompt_ids) + int(max_new_tokens) > self.max_context:
            raise ValueError(f"{len(prompt_ids)} prompt tokens + max_new_tokens {max_new_tokens} exceed the "
                             f"context window of {self.max_context} tokens")
        greedy = float(temperature) == 0
        config = SamplingConfig(max_new_tokens=1, temperature=0.0 if greedy else 1.0, top_k=int(top_k),
                                top_p=float(top_p))
        stop_ids = tuple(sorted({int(i) for i in stop_ids}))
        temp = jnp.float32(1.0 if greedy else temperature)
        prefill, decode = self._programs(config, stop_ids)
        stream = TextStream(self.tokenizer, stop_ids)
        with self.lock:
            t_start = time.perf_counter()
            # The last prompt token is always run, for the logits of the answer's first token.
            start = min(common_prefix(state.ids, prompt_ids), len(prompt_ids) - 1) if prefix_cache else 0
            pieces = [(pos, prompt_ids[pos:pos + self.prefill_chunk])
                      for pos in range(start, len(prompt_ids), self.prefill_chunk)]
            widths = [_bucket(len(piece), self.prefill_chunk) for _, piece in pieces]
            needed = max(len(prompt_ids) + int(max_new_tokens), pieces[-1][0] + widths[-1])
            cache = self._cache_with(state.cache if prefix_cache else None, needed)
            for (pos, piece), width in zip(pieces, widths):
                ids_1T = np.zeros((1, width), np.int32)
                ids_1T[0, :len(piece)] = piece
                tok, cache = prefill(self.params, cache, ids_1T, np.int32(pos), np.int32(len(piece)), key, temp)
            tokens = [int(tok)]
            first_token_s = time.perf_counter() - t_start
            stopped = tokens[-1] in stop_ids
            if on_text is not None:
                delta = stream.feed(tokens, final=stopped or max_new_tokens == 1)
                if delta:
                    on_text(delta)
            while not stopped and len(tokens) < max_new_tokens:
                toks_C, n, tok, stopped_dev, cache = decode(self.params, cache, tok, np.int32(len(tokens)),
                                                            np.int32(max_new_tokens - len(tokens)), key, temp)
                toks_C, n, stopped = jax.device_get((toks_C, n, stopped_dev))
                new = toks_C[:int(n)].tolist()
                tokens += new
                stopped = bool(stopped)
                if on_text is not None:
                    delta = stream.feed(new, final=stopped or len(tokens) >= max_new_tokens)
                    if delta:
                        on_text(delta)
            seconds = time.perf_counter() - t_start
        if on_text is None:
            stream.feed(tokens, final=True)
        # The last sampled token was never fed back, so the cache holds the rest.
        new_state = CacheState(cache, prompt_ids + tokens[:-1])
        answer = Generated(tokens=tuple(tokens), text=stream.content(), stopped=stopped,
                           prompt_tokens=len(prompt_ids), prefilled_tokens=len(prompt_ids) - start,
                           first_token_s=first_token_s, seconds=seconds)
        return answer, new_state
