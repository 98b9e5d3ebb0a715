"""Sampling comparisons from a policy into a `ComparisonStore`: the "collect" step of RLHF.

Each prompt becomes one item `{"prompt", "responses": [K texts], "meta"}` with id
`r{round}-{n:06d}-{hash}`. Batch j is sampled with `rollout_key(seed, j)`, so a collection is
a pure function of its settings; a re-run skips items already in the store (it resumes) and
refuses items collected with other settings (a new round was meant). Single-process.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any, Sequence

import jax
from jax.sharding import Mesh

from rlhf_jax import data as data_lib
from rlhf_jax import sharding as sharding_lib
from rlhf_jax.feedback.store import ComparisonStore
from rlhf_jax.models import ModelDef, cached_program, load_model, load_tokenizer_of, model_mesh, to_host
from rlhf_jax.models.load import resolve
from rlhf_jax.sampling import SamplingConfig, make_generate, response_text, rollout_key

__all__ = ["SETTINGS_KEYS", "collect_comparisons", "generate_texts", "item_id"]

# Meta fields that define a collection: an item already in the store must match them all,
# or the re-run is a different collection sharing its ids.
SETTINGS_KEYS = ("policy", "seed", "temperature", "top_k", "top_p", "max_new_tokens", "num_responses",
                 "max_prompt_length")
# Fields collect_comparisons writes itself; a caller's meta may not set them.
_RESERVED = set(SETTINGS_KEYS) | {"stopped", "num_tokens", "prompt_index", "prompt_truncated"}


def item_id(round_: Any, index: int, prompt: str) -> str:
    """The store id of the item for prompt number `index` of a collection round.

    The prompt's digest keeps two different prompt lists collected in one round from
    sharing ids; the index keeps a prompt that appears twice in one list apart.
    """
    digest = hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:10]
    return f"r{round_}-{index:06d}-{digest}"


def _prompt_rows(prompts: Any) -> Any:
    # A list of strings is taken verbatim (format "prompt", no chat template); anything
    # else goes to prompt_dataset as is (a path, a list of row dicts, ...), whose loader
    # names a missing file.
    if isinstance(prompts, (list, tuple)) and all(isinstance(p, str) for p in prompts):
        if not prompts:
            raise ValueError("prompts: the list is empty")
        return [{"prompt": p} for p in prompts]
    return prompts


def _seen_prompts(dataset: data_lib.Dataset, tokenizer) -> list[tuple[str, bool]]:
    """(text the policy saw, truncated?) per prompt of a `prompt_dataset`.

    A prompt longer than the dataset's `max_prompt_length` tokens was cut from the left;
    its item then shows the kept tail (decoded with its special tokens, e.g. chat markers),
    since that is what the responses continue and what the reward model should score.
    """
    texts = [ex.prompt for ex in dataset.examples]
    all_ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    bos = tokenizer.bos_token_id
    out = []
    for text, ids, ex in zip(texts, all_ids, dataset.examples):
        # prompt_dataset's layout: [BOS] (unless the text starts with it) + the last tokens.
        n_prefix = 0 if bos is None or (ids and ids[0] == bos) else 1
        kept = ex.input_ids[n_prefix:].tolist()
        if len(kept) >= len(ids):
            out.append((text, False))
        else:
            out.append((tokenizer.decode(kept, skip_special_tokens=False, clean_up_tokenization_spaces=False), True))
    return out


def _check_args(num_responses, batch_size, user_meta: dict) -> None:
    if int(num_responses) < 2:
        raise ValueError(f"num_responses: need at least 2 responses to compare, got {num_responses}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    clash = sorted(set(user_meta) & (_RESERVED - {"policy"}))
    if clash:
        raise ValueError(f"meta: fields {clash} are written by collect_comparisons; pass them as arguments")
    if jax.process_count() > 1:
        raise NotImplementedError("collect_comparisons runs in one process; collect on one host")


def _policy_source(policy: Any, user_meta: dict) -> str | None:
    """The resolved directory a policy was loaded from (None for a pair: meta["policy"])."""
    src = resolve(policy)
    if src.kind == "pair":
        return user_meta.pop("policy", None)
    if "policy" in user_meta:
        raise ValueError("meta: 'policy' is the model directory's path; only set it for a (model, tokenizer) pair")
    return src.path


def _generator(policy: Any, mesh: Mesh | None, sampling: SamplingConfig):
    """(jitted generate, params, mesh) for the policy, the program shared across checkpoints."""
    model, _ = load_model(policy, heads=("lm",), mesh=mesh)
    mesh = mesh if mesh is not None else model_mesh(model)
    model_def, _, params = ModelDef.split(model, None)  # nothing trainable: every variable in one dict
    generate = cached_program("generate", model_def, mesh, sampling, lambda: make_generate(model_def, mesh, sampling))
    return generate, params, mesh


def _prompts_per_batch(mesh: Mesh, k: int, wanted: int) -> int:
    """Prompts per sampler call, K rows each: `wanted` rounded down (memory) to a multiple
    whose rows the mesh's batch shards divide, but at least one such multiple."""
    shards = sharding_lib.batch_shards(mesh)
    step = shards // math.gcd(shards, k)
    return max(step, wanted // step * step)


def _rows(prompts: list[int], per_batch: int, k: int) -> list[int]:
    """Each prompt K times in a row; a short last batch is filled with copies of its last
    prompt, so every call has the same shape (no recompilation)."""
    return [n for n in prompts + [prompts[-1]] * (per_batch - len(prompts)) for _ in range(k)]


def collect_comparisons(store: ComparisonStore, policy: Any, prompts: Any, *, num_responses: int = 2,
                        max_new_tokens: int = 32, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                        seed: int = 0, batch_size: int = 32, max_prompt_length: int = 64,
                        meta: Mapping[str, Any] | None = None, mesh: Mesh | None = None,
                        extra_stop_token_ids: Sequence[int] = ()) -> list[str]:
    """Samples `num_responses` responses per prompt from `policy` into `store`; returns the
    ids of every prompt's item, in prompt order (new ones and those already there).

    `policy`: a model directory or a `(model, tokenizer)` pair. `prompts`: anything
    `data.prompt_dataset` reads, or a list of prompt strings used verbatim. `batch_size`:
    sequences per sampler call, rounded to whole groups of K that the mesh's batch shards
    divide. `meta`: extra JSON fields of every item (e.g. {"round": 2}, which also goes
    into the ids). `extra_stop_token_ids`: tokens besides EOS that end a response (e.g. a
    newline; the stop token is not part of the text). Each item's meta also records the
    settings, `prompt_index`, `prompt_truncated`, and per response `stopped` and `num_tokens`.
    """
    user_meta = dict(meta or {})
    _check_args(num_responses, batch_size, user_meta)
    k = int(num_responses)
    # The tokenizer tells which items are missing; the model is loaded only if some are.
    tokenizer = load_tokenizer_of(policy)
    settings = {"policy": _policy_source(policy, user_meta), "seed": int(seed), "temperature": float(temperature),
                "top_k": int(top_k), "top_p": float(top_p), "max_new_tokens": int(max_new_tokens),
                "num_responses": k, "max_prompt_length": int(max_prompt_length)}
    stops = sorted({int(i) for i in extra_stop_token_ids})
    if stops:  # recorded only when set: items collected before the option existed still match
        settings["extra_stop_token_ids"] = stops
    dataset = data_lib.prompt_dataset(_prompt_rows(prompts), tokenizer, max_prompt_length=int(max_prompt_length))
    seen = _seen_prompts(dataset, tokenizer)
    ids = [item_id(user_meta.get("round", 0), n, text) for n, (text, _) in enumerate(seen)]
    existing = {item["id"]: item for item in store.items()}
    for i in ids:
        if i in existing:
            _check_same_collection(existing[i], settings, store)
    if all(i in existing for i in ids):
        return ids

    sampling = SamplingConfig.for_tokenizer(tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
                                            top_k=top_k, top_p=top_p, extra_stop_token_ids=stops)
    generate, params, mesh = _generator(policy, mesh, sampling)
    per_batch = _prompts_per_batch(mesh, k, min(int(batch_size) // k, len(ids)))
    for j, start in enumerate(range(0, len(ids), per_batch)):
        group = [n for n in range(start, min(start + per_batch, len(ids))) if ids[n] not in existing]
        if not group:
            continue
        full = list(range(start, min(start + per_batch, len(ids))))
        rows = _rows(full, per_batch, k)
        texts, lengths, stopped = _sample_rows(generate, params, dataset, tokenizer, rows, rollout_key(int(seed), j))
        store.add_items([_item(ids[n], seen[n], full.index(n), k, texts, lengths, stopped,
                               {**user_meta, **settings, "prompt_index": n}) for n in group])
    return ids


def _item(item_id_: str, seen: tuple[str, bool], g: int, k: int, texts, lengths, stopped, meta: dict) -> dict:
    """The store item of the prompt in slot `g` of a sampled batch of K rows per prompt."""
    r = slice(g * k, (g + 1) * k)
    return {"id": item_id_, "prompt": seen[0], "responses": texts[r],
            "meta": {**meta, "prompt_truncated": seen[1], "stopped": [bool(s) for s in stopped[r]],
                     "num_tokens": [int(m) for m in lengths[r]]}}


def _sample_rows(generate, params, dataset: data_lib.Dataset, tokenizer, rows: list[int], key):
    """One sampler call on the prompts `rows` of `dataset`: (texts, lengths, stopped)."""
    prompt_ids, prompt_mask = data_lib.left_pad([dataset.examples[n].input_ids for n in rows],
                                                dataset.seq_len, dataset.pad_id)
    samples = generate(params, prompt_ids, prompt_mask, key)
    tokens, lengths, stopped = (to_host(x) for x in (samples.tokens, samples.lengths, samples.stopped))
    texts = [response_text(tokenizer, t, m, st) for t, m, st in zip(tokens, lengths, stopped)]
    return texts, lengths, stopped


def generate_texts(policy: Any, prompts: Any, *, max_new_tokens: int = 32, temperature: float = 0.7,
                   top_k: int = 0, top_p: float = 1.0, seed: int = 0, batch_size: int = 64,
                   max_prompt_length: int = 64, mesh: Mesh | None = None, num_samples: int = 1,
                   extra_stop_token_ids: Sequence[int] = ()) -> list[str]:
    """`num_samples` sampled responses per prompt (decoded, special tokens dropped), prompt-major,
    e.g. to evaluate a policy with a gold scorer or for best-of-n. `policy` and `prompts` are
    as for `collect_comparisons`; `batch_size` counts sequences per sampler call."""
    n_per = int(num_samples)
    if n_per < 1:
        raise ValueError(f"num_samples: must be >= 1, got {num_samples}")
    tokenizer = load_tokenizer_of(policy)
    dataset = data_lib.prompt_dataset(_prompt_rows(prompts), tokenizer, max_prompt_length=int(max_prompt_length))
    sampling = SamplingConfig.for_tokenizer(tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
                                            top_k=top_k, top_p=top_p, extra_stop_token_ids=extra_stop_token_ids)
    generate, params, mesh = _generator(policy, mesh, sampling)
    per_batch = _prompts_per_batch(mesh, n_per, int(batch_size) // n_per)
    n = len(dataset)
    texts: list[str] = []
    for j, start in enumerate(range(0, n, per_batch)):
        prompts_j = list(range(start, min(start + per_batch, n)))
        rows = _rows(prompts_j, per_batch, n_per)
        out, _, _ = _sample_rows(generate, params, dataset, tokenizer, rows, rollout_key(int(seed), j))
        texts += out[:len(prompts_j) * n_per]
    return texts


def _check_same_collection(item: Mapping[str, Any], settings: Mapping[str, Any], store: ComparisonStore) -> None:
    old = item.get("meta", {})
    for key, value in settings.items():
        if old.get(key) != value:
            raise ValueError(
                f"item {item['id']!r} is already in {store.path} from a collection with {key}={old.get(key)!r}, "
                f"this one has {key}={value!r}; pass a new meta['round'] to collect a new set of comparisons")
