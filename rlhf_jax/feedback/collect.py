"""Sampling comparisons from a policy into a `ComparisonStore`: the "collect" step of RLHF.

    ids = collect_comparisons(store, "runs/sft/model", "prompts.jsonl", num_responses=4,
                              meta={"round": 1})

For every prompt the policy samples K responses (InstructGPT shows labelers K = 4..9
responses per prompt); each prompt becomes one store item
`{"prompt", "responses": [K texts], "meta"}` that people (`server`) or simulated labelers
(`labelers.label_store`) then rank.

Batches: each prompt is repeated K times in the batch, so one call of the compiled sampler
(`sampling.make_generate`) yields every response of a group. All batches have the same
shape, so the program compiles once; the last batch is filled up with copies of its last
prompt, whose samples are dropped. Batch j is sampled with `rollout_key(seed, j)`, so a
collection is a pure function of (policy, prompts, seed, batch_size and the sampling
settings), and a batch that is skipped (already in the store) does not shift the
randomness of the ones after it.

Item ids and re-runs: an item's id is `"r{round}-{n:06d}-{hash}"`, with n the prompt's
position in the prompt list and hash a digest of the prompt text, `round` from
`meta["round"]` (0 when absent). Items are added with one atomic `add_items` call per batch,
so a collection killed midway leaves whole batches behind. Running the same collection
again skips every prompt whose item is already in the store (it resumes, and never
duplicates); it raises a ValueError instead if that item was collected with different
settings (another policy, seed, temperature, ...), which means a new round was meant: pass
another `meta["round"]`.

This module needs JAX and the models; the rest of `rlhf_jax.feedback` does not, which is
why it is not imported by the package `__init__`.
"""

from __future__ import annotations

import collections
import hashlib
import math
import os
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from rlhf_jax import data as data_lib
from rlhf_jax import sharding as sharding_lib
from rlhf_jax.feedback.store import ComparisonStore
from rlhf_jax.models import Transformer, load_pretrained
from rlhf_jax.models.checkpoints import to_host
from rlhf_jax.params import ModelDef
from rlhf_jax.sampling import SamplingConfig, make_generate, rollout_key

__all__ = ["SETTINGS_KEYS", "cached_program", "collect_comparisons", "item_id", "load_model",
           "model_mesh"]

# Meta fields that define a collection: an item already in the store must match them all,
# or the re-run is a different collection sharing its ids (see the module docstring).
SETTINGS_KEYS = ("policy", "seed", "temperature", "top_k", "top_p", "max_new_tokens", "num_responses",
                 "max_prompt_length")
# Fields collect_comparisons writes itself; a caller's meta may not set them.
_RESERVED = set(SETTINGS_KEYS) | {"stopped", "num_tokens", "prompt_index", "prompt_truncated"}


def model_mesh(model: nnx.Module) -> Mesh:
    """The mesh a model's parameters live on (a one-device mesh for unsharded arrays)."""
    leaf = jax.tree.leaves(nnx.state(model))[0]
    if isinstance(leaf.sharding, NamedSharding):
        return leaf.sharding.mesh
    return sharding_lib.make_mesh(devices=sorted(leaf.sharding.device_set, key=lambda d: d.id))


def load_model(spec: Any, heads: tuple[str, ...], mesh: Mesh | None = None):
    """(model, tokenizer, source) from a model directory or a `(model, tokenizer)` pair.

    A directory is a Hugging Face model dir with its tokenizer (what a stage leaves in
    `workdir/model`), loaded with `heads` onto `mesh` (default: all devices). `source` is
    the resolved directory path, or None for a pair. A pair's model must have `heads`.
    """
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        model = load_pretrained(path, heads=heads, mesh=mesh)
        return model, data_lib.load_tokenizer(str(path)), str(path.resolve())
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        model, tokenizer = spec
        if not isinstance(model, Transformer):
            raise TypeError(f"expected (Transformer, tokenizer), got ({type(model).__name__}, ...)")
        missing = set(heads) - set(model.heads)
        if missing:
            raise ValueError(f"the model has heads {model.heads}, this needs {sorted(missing)}")
        return model, data_lib.load_tokenizer(tokenizer), None
    raise TypeError(f"expected a model directory or a (model, tokenizer) pair, got {type(spec).__name__}")


def _structure_key(model_def: ModelDef) -> tuple:
    # Everything a compiled program depends on besides its inputs: the graph (it holds the
    # ModelConfig) and each variable's type, shape, dtype and metadata (logical axes).
    return model_def.graphdef, tuple(
        (path, type(var).__name__, tuple(var.get_value().shape), str(var.get_value().dtype),
         repr(sorted(var.get_metadata().items()))) for path, var in model_def.variables)


_PROGRAMS: collections.OrderedDict[tuple, Callable] = collections.OrderedDict()
_MAX_PROGRAMS = 8


def cached_program(name: str, model_def: ModelDef, mesh: Mesh, settings: Hashable,
                   build: Callable[[], Callable]) -> Callable:
    """`build()` (a jitted function of params and inputs), memoised by model structure.

    Each load of a checkpoint gives a new `ModelDef`, and a jit keyed on it would compile
    again; the program only depends on the architecture, so collection rounds with a new
    policy checkpoint (or several labelers on one RM) of the same shape share one
    compilation. A few programs are kept, least recently used dropped first.
    """
    key = (name, _structure_key(model_def), mesh, settings)
    if key in _PROGRAMS:
        _PROGRAMS.move_to_end(key)
        return _PROGRAMS[key]
    fn = _PROGRAMS[key] = build()
    while len(_PROGRAMS) > _MAX_PROGRAMS:
        _PROGRAMS.popitem(last=False)
    return fn


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


def collect_comparisons(store: ComparisonStore, policy: Any, prompts: Any, *, num_responses: int = 2,
                        max_new_tokens: int = 32, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                        seed: int = 0, batch_size: int = 32, max_prompt_length: int = 64,
                        meta: Mapping[str, Any] | None = None, mesh: Mesh | None = None) -> list[str]:
    """Samples `num_responses` responses per prompt from `policy` and adds them to `store`.

    Args:
      store: where the items go (one `add_items` call per batch of prompts).
      policy: a model directory (an SFT/PPO stage's `workdir/model`: weights + tokenizer),
        loaded with its LM head, or a `(model, tokenizer)` pair.
      prompts: anything `data.prompt_dataset` reads (a file or directory of prompt,
        messages, alpaca or preference rows; chat rows get the tokenizer's template), or a
        list of prompt strings used verbatim.
      num_responses: K >= 2 responses per prompt.
      max_new_tokens, temperature, top_k, top_p: the sampler's `SamplingConfig`; sampling
        stops at the tokenizer's EOS.
      seed: base key; batch j uses `rollout_key(seed, j)`.
      batch_size: sequences per sampler call, rounded down to whole groups of K whose
        number the mesh's batch shards divide (at least the smallest such number; no more
        groups than prompts when possible). Changing it changes which key a prompt gets,
        hence the samples.
      max_prompt_length: prompts are cut from the left to this many tokens (BOS included).
      meta: extra JSON fields for every item's meta, e.g. {"round": 2}; "round" also goes
        into the item ids. Keys this function writes itself may not be given.
      mesh: where to load / run the policy (default: a directory loads onto all devices, a
        pair runs where its parameters are).

    Returns:
      the ids of the items of all prompts, in prompt order: new ones and those already in
      the store from an earlier run of the same collection (skipped, not re-sampled).

    Each item's meta holds the caller's meta and: policy (resolved directory, or
    meta["policy"] / None for a pair), seed, temperature, top_k, top_p, max_new_tokens,
    num_responses, max_prompt_length, prompt_index, prompt_truncated, and per response
    `stopped` (it ended with EOS rather than at max_new_tokens) and `num_tokens`.
    Responses are decoded without special tokens (EOS dropped). Single-process only.
    """
    if int(num_responses) < 2:
        raise ValueError(f"num_responses: need at least 2 responses to compare, got {num_responses}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    user_meta = dict(meta or {})
    clash = sorted(set(user_meta) & (_RESERVED - {"policy"}))
    if clash:
        raise ValueError(f"meta: fields {clash} are written by collect_comparisons; pass them as arguments")
    if jax.process_count() > 1:
        raise NotImplementedError("collect_comparisons runs in one process; collect on one host")
    k = int(num_responses)

    rows = _prompt_rows(prompts)
    # The tokenizer is enough to find which items are missing; the model is only loaded
    # (and the sampler only compiled) when some batch has to be sampled.
    model, tokenizer, source = _policy_parts(policy)
    if source is not None and "policy" in user_meta:
        raise ValueError("meta: 'policy' is the model directory's path; only set it for a (model, tokenizer) pair")
    dataset = data_lib.prompt_dataset(rows, tokenizer, max_prompt_length=int(max_prompt_length))
    seen = _seen_prompts(dataset, tokenizer)

    round_ = user_meta.get("round", 0)
    settings = {"policy": source if source is not None else user_meta.pop("policy", None), "seed": int(seed),
                "temperature": float(temperature), "top_k": int(top_k), "top_p": float(top_p),
                "max_new_tokens": int(max_new_tokens), "num_responses": k,
                "max_prompt_length": int(max_prompt_length)}
    ids = [item_id(round_, n, text) for n, (text, _) in enumerate(seen)]
    existing = {item["id"]: item for item in store.items()}
    for i in ids:
        if i in existing:
            _check_same_collection(existing[i], settings, store)
    if all(i in existing for i in ids):
        return ids

    if model is None:
        model = load_pretrained(source, heads=("lm",), mesh=mesh)
    mesh = mesh if mesh is not None else model_mesh(model)
    # K rows per prompt; the batch axes of the mesh must divide the rows, i.e. the prompts
    # per batch must be a multiple of `step`. Round down (memory), but take at least one step.
    shards = sharding_lib.batch_shards(mesh)
    step = shards // math.gcd(shards, k)
    per_batch = max(step, min(int(batch_size) // k, len(ids)) // step * step)

    sampling = SamplingConfig(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_k=int(top_k),
                              top_p=float(top_p), stop_token_ids=(int(tokenizer.eos_token_id),),
                              pad_token_id=int(tokenizer.pad_token_id))
    model_def, _, params = ModelDef.split(model, None)  # nothing trainable: every variable in one dict
    generate = cached_program("generate", model_def, mesh, sampling, lambda: make_generate(model_def, mesh, sampling))

    for j, start in enumerate(range(0, len(ids), per_batch)):
        group = list(range(start, min(start + per_batch, len(ids))))
        if all(ids[n] in existing for n in group):
            continue
        # Fill the last batch with copies of its last prompt: same shape, no recompilation.
        row_prompts = [n for n in group + [group[-1]] * (per_batch - len(group)) for _ in range(k)]
        all_texts, lengths, stopped = _sample_rows(generate, params, dataset, tokenizer, row_prompts,
                                                   rollout_key(int(seed), j))
        items = []
        for g, n in enumerate(group):
            if ids[n] in existing:
                continue
            r = slice(g * k, (g + 1) * k)
            texts = all_texts[r]
            items.append({"id": ids[n], "prompt": seen[n][0], "responses": texts,
                          "meta": {**user_meta, **settings, "prompt_index": n, "prompt_truncated": seen[n][1],
                                   "stopped": [bool(s) for s in stopped[r]],
                                   "num_tokens": [int(m) for m in lengths[r]]}})
        store.add_items(items)
    return ids


def _sample_rows(generate, params, dataset: data_lib.Dataset, tokenizer, rows: list[int], key):
    """One sampler call on the prompts `rows` of `dataset`: (texts, lengths, stopped)."""
    prompt_ids, prompt_mask = data_lib.left_pad([dataset.examples[n].input_ids for n in rows],
                                                dataset.seq_len, dataset.pad_id)
    samples = generate(params, prompt_ids, prompt_mask, key)
    tokens, lengths, stopped = (to_host(x) for x in (samples.tokens, samples.lengths, samples.stopped))
    texts = [tokenizer.decode(t[:m], skip_special_tokens=True) for t, m in zip(tokens, lengths)]
    return texts, lengths, stopped


def generate_texts(policy: Any, prompts: Any, *, max_new_tokens: int = 32, temperature: float = 0.7,
                   top_k: int = 0, top_p: float = 1.0, seed: int = 0, batch_size: int = 64,
                   max_prompt_length: int = 64, mesh: Mesh | None = None) -> list[str]:
    """One sampled response per prompt (decoded, special tokens dropped), e.g. to evaluate a
    policy with a gold scorer. `policy` and `prompts` are as for `collect_comparisons`."""
    model, tokenizer, _ = load_model(policy, ("lm",), mesh)
    dataset = data_lib.prompt_dataset(_prompt_rows(prompts), tokenizer, max_prompt_length=int(max_prompt_length))
    mesh = mesh if mesh is not None else model_mesh(model)
    shards = sharding_lib.batch_shards(mesh)
    per_batch = max(shards, int(batch_size) // shards * shards)
    sampling = SamplingConfig(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_k=int(top_k),
                              top_p=float(top_p), stop_token_ids=(int(tokenizer.eos_token_id),),
                              pad_token_id=int(tokenizer.pad_token_id))
    model_def, _, params = ModelDef.split(model, None)
    generate = cached_program("generate", model_def, mesh, sampling, lambda: make_generate(model_def, mesh, sampling))
    n = len(dataset)
    texts: list[str] = []
    for j, start in enumerate(range(0, n, per_batch)):
        rows = list(range(start, min(start + per_batch, n)))
        out, _, _ = _sample_rows(generate, params, dataset, tokenizer, rows + [rows[-1]] * (per_batch - len(rows)),
                                 rollout_key(int(seed), j))
        texts += out[:len(rows)]
    return texts


def _policy_parts(policy: Any):
    """(model or None, tokenizer, resolved directory or None) without loading a directory's weights."""
    if isinstance(policy, (str, os.PathLike)):
        path = Path(policy)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"policy: {path} has no config.json (expected a stage's workdir/model)")
        return None, data_lib.load_tokenizer(str(path)), str(path.resolve())
    model, tokenizer, _ = load_model(policy, ("lm",))
    return model, tokenizer, None


def _check_same_collection(item: Mapping[str, Any], settings: Mapping[str, Any], store: ComparisonStore) -> None:
    old = item.get("meta", {})
    for key, value in settings.items():
        if old.get(key) != value:
            raise ValueError(
                f"item {item['id']!r} is already in {store.path} from a collection with {key}={old.get(key)!r}, "
                f"this one has {key}={value!r}; pass a new meta['round'] to collect a new set of comparisons")
