"""Tokenized datasets for the three stages: SFT demonstrations, preference groups, prompts.

`sft_dataset`, `preference_dataset` and `prompt_dataset` read rows (`load_records`), parse
them in the given or detected format (`formats`), tokenize, truncate and return a `Dataset`
that `batching.batches` turns into fixed-shape numpy batches.

Token layout of one sequence: [BOS] + prompt + response + [EOS].
  * BOS is prepended when `add_bos` and the tokenizer has one (GPT-2: `<|endoftext|>`),
    unless the text already starts with it (chat templates that write BOS themselves). It
    gives the first prompt/text token something to be predicted from.
  * EOS is appended after the response unless the response already ends with it (the
    default chat template ends every turn with EOS). It is a target token: the model
    learns to stop.

Truncation (per sequence; BOS counts as a prompt token and is always kept; prompts are always
cut from the LEFT, keeping their end, next to the response; responses from the RIGHT, and a
cut response loses its EOS). Truncated sequences are counted in `Dataset.report.truncated`.

SFT (`truncation_lengths`), the prompt first:
  1. the prompt is cut to `max_prompt_length` (when given);
  2. if prompt + response is still longer than `max_length`, the response is cut to what is
     left, but never below 1 token (so the model is not taught to stop mid-sentence);
  3. if the prompt alone leaves no room (no `max_prompt_length`), the prompt is cut so that
     exactly that 1 response token fits.
  Set `max_prompt_length` < `max_length` to keep responses from being squeezed out.

Preferences (reward model, DPO) and RM scoring (`response_first_lengths`,
`encode_prompt_response`), the response first: the two responses of a pair differ only in
their responses, so a long prompt must never squeeze them out (at 256 bytes the prompt-first
rule left 62% of the HH pairs with chosen == rejected):
  1. the response is kept whole, cut only when it alone is longer than `max_length`;
  2. the prompt fills what is left, capped at `max_prompt_length` (when given).
A pair whose chosen and rejected are still the same token ids is dropped and counted in
`report.dropped_pairs` (it carries no preference).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from rlhf_jax.data import formats
from rlhf_jax.data.records import LoadReport, Records, RowProblem, check_on_bad_row, load_records
from rlhf_jax.data.tokenizer import load_tokenizer

KINDS = ("sft", "preference", "prompt")


@dataclasses.dataclass(frozen=True)
class SFTExample:
    """One tokenized demonstration (before padding).

    Attributes:
      input_ids: int32[L], L <= max_length: [BOS] + prompt + response + [EOS].
      loss_mask: float32[L]; 1 where the token is a target (its prediction from position
        t-1 counts): response tokens incl. EOS, and earlier assistant turns of a chat. Always
        0 at t = 0, which nothing predicts.
      prompt: the prompt text (the train/held-out split key).
      row: 0-based index of the source row in the `Records`.
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    prompt: str
    row: int


@dataclasses.dataclass(frozen=True)
class PreferenceGroup:
    """All responses to one prompt and all preference pairs between them.

    Attributes:
      prompt: the prompt text (the split key).
      responses: K arrays int32[L_k]: [BOS] + prompt + response_k + [EOS] each.
      chosen, rejected: int32[P] indices into `responses`.
      margin: float32[P] per-pair margin (0 when the data has none).
      rows: 0-based indices of the source rows that gave the pairs.
      where: "file: row N" of the first of those rows, for messages.
      response_starts: int32[K], where response k's own tokens begin in `responses[k]`
        (after BOS and the kept prompt): DPO scores log π(response | prompt) from there.
      ref_logps: float32[K] or None: log π_ref(response_k | prompt) under a frozen reference,
        when DPO precomputes it once (`dpo.attach_reference_logps`).
    """

    prompt: str
    responses: tuple[np.ndarray, ...]
    chosen: np.ndarray
    rejected: np.ndarray
    margin: np.ndarray
    rows: tuple[int, ...]
    where: str
    response_starts: np.ndarray | None = None
    ref_logps: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class PromptExample:
    """One tokenized prompt for rollouts: input_ids int32[L], L <= max_prompt_length."""

    input_ids: np.ndarray
    prompt: str
    row: int


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Tokenized examples of one kind, plus what `batches` needs to pad them.

    Attributes:
      kind: "sft", "preference" or "prompt".
      examples: `SFTExample`s, `PreferenceGroup`s or `PromptExample`s.
      seq_len: T, the padded length of every batch row (max_length, or max_prompt_length
        for prompts), fixed so a jitted step compiles once.
      pad_id: the tokenizer's pad id.
      source: the path or hub name, for messages.
      format: the row format used.
      report: the `LoadReport` (rows read, kept, skipped by reason, truncated).
    """

    kind: str
    examples: tuple[Any, ...]
    seq_len: int
    pad_id: int
    source: str
    format: str
    report: LoadReport

    def __len__(self) -> int:
        return len(self.examples)

    def num_pairs(self) -> int:
        """Number of preference pairs (preference datasets only)."""
        return sum(len(g.chosen) for g in self.examples)


def truncation_lengths(prompt_len: int, response_len: int, max_length: int,
                       max_prompt_length: int | None = None) -> tuple[int, int]:
    """How many prompt tokens (kept from the END) and response tokens (from the START) fit,
    the prompt first (SFT).

    Implements the SFT truncation rule of the module docstring; needs response_len >= 1 and
    max_length >= 1, and then keeps at least one response token.
    """
    p = prompt_len if max_prompt_length is None else min(prompt_len, max_prompt_length)
    r = min(response_len, max(1, max_length - p))
    p = min(p, max_length - r)
    return p, r


def response_first_lengths(prompt_len: int, response_len: int, max_length: int,
                           max_prompt_length: int | None = None) -> tuple[int, int]:
    """How many prompt tokens (kept from the END) and response tokens (from the START) fit,
    the response first (preferences and RM scoring; module docstring).

    The response keeps min(response_len, max_length) tokens; the prompt gets the rest, at most
    `max_prompt_length`.
    """
    r = min(response_len, max_length)
    p = min(prompt_len, max_length - r)
    if max_prompt_length is not None:
        p = min(p, max_prompt_length)
    return p, r


class _Encoder:
    """Tokenizes texts without special tokens (BOS/EOS are placed by the dataset builders).

    Texts are encoded in one batched call per dataset (the Rust tokenizer parallelises it)
    and cached, since the same prompt appears once per response.
    """

    def __init__(self, tokenizer, add_bos: bool):
        self.tokenizer = tokenizer
        self.bos = tokenizer.bos_token_id if add_bos else None
        self.eos = tokenizer.eos_token_id
        self.cache: dict[str, list[int]] = {"": []}

    def prepare(self, texts: Sequence[str]) -> None:
        todo = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if todo:
            ids = self.tokenizer(todo, add_special_tokens=False)["input_ids"]
            self.cache.update(zip(todo, ids))

    def __call__(self, text: str) -> list[int]:
        if text not in self.cache:
            self.prepare([text])
        return self.cache[text]

    def prefix(self, first_ids: list[int]) -> list[int]:
        """[BOS], unless disabled, unknown, or the sequence already starts with it."""
        if self.bos is None or (first_ids and first_ids[0] == self.bos):
            return []
        return [self.bos]

    def with_eos(self, ids: list[int]) -> list[int]:
        return ids if ids and ids[-1] == self.eos else ids + [self.eos]


def _check_lengths(max_length: int | None, max_prompt_length: int | None, n_prefix: int) -> None:
    if max_length is not None and max_length < n_prefix + 1:
        raise ValueError(f"max_length must be at least {n_prefix + 1} (BOS + one response token), got {max_length}")
    if max_prompt_length is not None:
        upper = max_length - 1 if max_length is not None else None
        if max_prompt_length < max(n_prefix, 1) or (upper is not None and max_prompt_length > upper):
            raise ValueError(f"max_prompt_length must be in [{max(n_prefix, 1)}, max_length - 1 = {upper}], "
                             f"got {max_prompt_length}")


def _scored_sequence(enc: _Encoder, prompt_ids: list[int], response_ids: list[int], max_length: int,
                     max_prompt_length: int | None) -> tuple[list[int], int, bool]:
    """[BOS] + prompt + response + [EOS] cut by `response_first_lengths`: (ids, where the
    response starts, whether anything was cut)."""
    resp = enc.with_eos(response_ids)
    prefix = enc.prefix(prompt_ids or resp)
    p, r = response_first_lengths(len(prompt_ids), len(resp), max_length - len(prefix),
                                  None if max_prompt_length is None else max_prompt_length - len(prefix))
    ids = prefix + prompt_ids[len(prompt_ids) - p:] + resp[:r]
    return ids, len(prefix) + p, p < len(prompt_ids) or r < len(resp)


def encode_prompt_response(tokenizer: Any, texts: Sequence[tuple[str, str]], *, max_length: int,
                           max_prompt_length: int | None = None, add_bos: bool = True) -> list[np.ndarray]:
    """The token ids a reward model trained by `preference_dataset` scores, one per (prompt, response).

    Each is [BOS] + prompt + response + [EOS], truncated exactly as the preference data is
    (the response first, the prompt cut from the left; module docstring), so scoring text
    with an RM matches its training data.

    Args:
      tokenizer: anything `load_tokenizer` takes (normally the RM's own).
      texts: (prompt, response) strings.
      max_length, max_prompt_length, add_bos: as the RM's training data used them.

    Returns:
      int32 arrays of at most `max_length` tokens, in the order of `texts`.
    """
    enc = _Encoder(load_tokenizer(tokenizer), add_bos)
    _check_lengths(max_length, max_prompt_length, 0 if enc.bos is None else 1)
    texts = list(texts)
    enc.prepare([t for pair in texts for t in pair])
    return [np.asarray(_scored_sequence(enc, enc(prompt), enc(response), max_length, max_prompt_length)[0], np.int32)
            for prompt, response in texts]


def _parse(records: Records, parse, on_bad_row: str, report: LoadReport) -> list[tuple[int, Any]]:
    """Applies `parse(row)` to every row; bad rows raise or are counted (see `LoadReport`)."""
    out = []
    for i, row in enumerate(records.rows):
        try:
            out.append((i, parse(row)))
        except RowProblem as problem:
            report.bad_row(records, i, problem, on_bad_row)
    report.rows = len(records.rows)
    report.kept = len(out)
    return out


def _start(path, tokenizer, format, task, on_bad_row):
    check_on_bad_row(on_bad_row)
    tokenizer = load_tokenizer(tokenizer)
    records = load_records(path)
    fmt = formats.resolve_format(records.rows, task, format, records.source)
    return tokenizer, records, fmt, LoadReport(source=records.source, format=fmt)


def sft_dataset(path: Any, tokenizer: Any, *, format: str = "auto", max_length: int = 1024,
                max_prompt_length: int | None = None, on_bad_row: str = "error",
                add_bos: bool = True) -> Dataset:
    """Demonstrations for SFT, tokenized with per-token loss masks.

    Args:
      path: anything `load_records` takes (file, directory, hub name, rows).
      tokenizer: anything `load_tokenizer` takes ("byte", a folder, a tokenizer).
      format: "auto" or one of `formats.SFT_FORMATS`.
      max_length: T of every batch; longer examples are truncated (module docstring).
      max_prompt_length: optional cap on the prompt part, cut from the left.
      on_bad_row: "error" (one `BadRowError` naming file, row and field) or "skip" (counted
        in `report.skipped`).
      add_bos: prepend the tokenizer's BOS token when it has one.
    """
    tokenizer, records, fmt, report = _start(path, tokenizer, format, "sft", on_bad_row)
    parsed = _parse(records, lambda row: formats.sft_text(row, fmt, tokenizer), on_bad_row, report)
    enc = _Encoder(tokenizer, add_bos)
    _check_lengths(max_length, max_prompt_length, 0 if enc.bos is None else 1)
    enc.prepare([t for _, ex in parsed for t, _ in ex.context] + [ex.response for _, ex in parsed])
    examples = []
    for i, ex in parsed:
        ctx_ids: list[int] = []
        ctx_mask: list[float] = []
        for text, is_target in ex.context:
            ids = enc(text)
            ctx_ids += ids
            ctx_mask += [float(is_target)] * len(ids)
        resp = enc.with_eos(enc(ex.response))
        prefix = enc.prefix(ctx_ids or resp)
        p, r = truncation_lengths(len(ctx_ids), len(resp), max_length - len(prefix),
                                  None if max_prompt_length is None else max_prompt_length - len(prefix))
        report.truncated += p < len(ctx_ids) or r < len(resp)
        ids = prefix + ctx_ids[len(ctx_ids) - p:] + resp[:r]
        mask = [0.0] * len(prefix) + ctx_mask[len(ctx_ids) - p:] + [1.0] * r
        mask[0] = 0.0  # nothing predicts the first token
        examples.append(SFTExample(np.asarray(ids, np.int32), np.asarray(mask, np.float32), ex.prompt, i))
    report.log()
    return Dataset("sft", tuple(examples), max_length, tokenizer.pad_token_id, records.source, fmt, report)


def _group_rows(parsed: list[tuple[int, formats.PreferenceText]]) -> list[dict[str, Any]]:
    """Merges rows into comparison groups: same prompt AND a shared response text.

    A response that appears in several rows (e.g. one chosen answer compared with several
    rejected ones, each in its own row) becomes one slot, so it is run once per batch and
    its pairs are never spread over batches — the overfitting InstructGPT's grouping avoids.
    Rows with the same prompt but disjoint responses are independent comparison sets and
    stay separate groups (the real OpenAssistant file has 18 rows for "你好"); the
    train/held-out `split` still keeps all groups of one prompt on the same side.

    Returns groups, ordered by their first row: {"prompt", "index": {text: slot}, "pairs":
    [(chosen slot, rejected slot, margin)], "rows": [row indices]}.
    """
    parent = list(range(len(parsed)))

    def find(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    owner: dict[tuple[str, str], int] = {}  # (prompt, response text) -> first row holding it
    for k, (_, ex) in enumerate(parsed):
        for text in ex.responses:
            other = owner.setdefault((ex.prompt, text), k)
            parent[find(k)] = find(other)

    groups: dict[int, dict[str, Any]] = {}
    for k, (i, ex) in enumerate(parsed):
        g = groups.setdefault(find(k), {"prompt": ex.prompt, "index": {}, "pairs": [], "rows": []})
        slot = [g["index"].setdefault(text, len(g["index"])) for text in ex.responses]
        g["pairs"] += [(slot[a], slot[b], m) for a, b, m in ex.pairs]
        g["rows"].append(i)
    return sorted(groups.values(), key=lambda g: g["rows"][0])


def preference_dataset(path: Any, tokenizer: Any, *, format: str = "auto", max_length: int = 1024,
                       max_prompt_length: int | None = None, on_bad_row: str = "error",
                       max_responses: int | None = None, max_pairs: int | None = None,
                       add_bos: bool = True) -> Dataset:
    """Preference data in comparison groups (InstructGPT): one prompt, its responses, all pairs.

    A row is one comparison set (a pair, or a ranked list of K distinct responses giving
    K·(K−1)/2 pairs, i ranked above j); rows with the same prompt that share a response are
    merged (`_group_rows`). Each response is one batch row, run once, and all pairs of a
    group land in the same batch.

    Sequences are truncated the response first (module docstring); a pair whose chosen and
    rejected are then the same token ids is dropped, counted in `report.dropped_pairs` and
    logged.

    Args: as `sft_dataset`, plus
      max_responses, max_pairs: the batch limits N and P that `batches` will use. When
        given, a group larger than one batch is a bad row (named by its first row; raises,
        or is skipped and counted as "group_too_large"), so the problem shows up at load
        time rather than in the middle of training.
    """
    tokenizer, records, fmt, report = _start(path, tokenizer, format, "preference", on_bad_row)
    parsed = _parse(records, lambda row: formats.preference_text(row, fmt, tokenizer, report.note),
                    on_bad_row, report)

    groups = _group_rows(parsed)
    enc = _Encoder(tokenizer, add_bos)
    _check_lengths(max_length, max_prompt_length, 0 if enc.bos is None else 1)
    enc.prepare([g["prompt"] for g in groups] + [t for g in groups for t in g["index"]])
    field = {"explicit": "chosen", "implicit": "chosen", "ranked": "ranked", "alpaca_ranked": "output"}[fmt]
    examples = []
    for g in groups:
        prompt = g["prompt"]
        n_resp, n_pairs = len(g["index"]), len(g["pairs"])
        if (max_responses is not None and n_resp > max_responses) or (max_pairs is not None and n_pairs > max_pairs):
            problem = RowProblem("group_too_large", field,
                                 f"this prompt has {n_resp} responses and {n_pairs} pairs (over {len(g['rows'])} "
                                 f"rows), more than one batch holds (max_responses={max_responses}, "
                                 f"max_pairs={max_pairs}); raise the limits")
            for i in g["rows"]:
                report.bad_row(records, i, problem, on_bad_row)
            report.kept -= len(g["rows"])
            continue
        report.pairs += n_pairs
        prompt_ids = enc(prompt)
        seqs, starts = [], []
        for text in g["index"]:
            ids, start, cut = _scored_sequence(enc, prompt_ids, enc(text), max_length, max_prompt_length)
            report.truncated += cut
            seqs.append(ids)
            starts.append(start)
        pairs = [(c, r, m) for c, r, m in g["pairs"] if seqs[c] != seqs[r]]
        report.drop_pairs("identical_after_truncation", n_pairs - len(pairs))
        if not pairs:
            report.kept -= len(g["rows"])
            continue
        used = sorted({k for c, r, _ in pairs for k in (c, r)})  # responses still in a pair
        slot = {k: i for i, k in enumerate(used)}
        chosen, rejected, margin = zip(*((slot[c], slot[r], m) for c, r, m in pairs))
        examples.append(PreferenceGroup(prompt, tuple(np.asarray(seqs[k], np.int32) for k in used),
                                        np.asarray(chosen, np.int32), np.asarray(rejected, np.int32),
                                        np.asarray(margin, np.float32), tuple(g["rows"]),
                                        "%s: row %d" % records.location(g["rows"][0]),
                                        np.asarray([starts[k] for k in used], np.int32)))
    report.log()
    return Dataset("preference", tuple(examples), max_length, tokenizer.pad_token_id, records.source, fmt, report)


def prompt_dataset(path: Any, tokenizer: Any, *, format: str = "auto", max_prompt_length: int = 512,
                   on_bad_row: str = "error", add_bos: bool = True) -> Dataset:
    """Prompts for PPO rollouts, truncated from the left to `max_prompt_length` (= Tq).

    Args: as `sft_dataset`; formats are `formats.PROMPT_FORMATS` (a preference file works:
      its shared prompts are used, one per row).
    """
    tokenizer, records, fmt, report = _start(path, tokenizer, format, "prompt", on_bad_row)
    parsed = _parse(records, lambda row: formats.prompt_text(row, fmt, tokenizer), on_bad_row, report)
    enc = _Encoder(tokenizer, add_bos)
    _check_lengths(None, max_prompt_length, 0 if enc.bos is None else 1)
    enc.prepare([text for _, text in parsed])
    examples = []
    for i, text in parsed:
        ids = enc(text)
        prefix = enc.prefix(ids)
        keep = max_prompt_length - len(prefix)
        report.truncated += len(ids) > keep
        examples.append(PromptExample(np.asarray(prefix + ids[max(0, len(ids) - keep):], np.int32), text, i))
    report.log()
    return Dataset("prompt", tuple(examples), max_prompt_length, tokenizer.pad_token_id, records.source, fmt, report)


def split(dataset: Dataset, *, eval_fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Deterministic train / held-out split of a dataset by prompt.

    All examples with the same prompt go to the same side (for preferences a group already
    holds every pair of its prompt), so no prompt is seen in training and evaluation.
    round(eval_fraction · #prompts) prompts, chosen by a permutation seeded with `seed`,
    are held out — at least one and at most all but one when 0 < eval_fraction and there are
    2+ prompts. Both parts keep the original order.

    Returns:
      (train, held_out) datasets of the same kind.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    prompts = list(dict.fromkeys(ex.prompt for ex in dataset.examples))
    n_eval = int(round(eval_fraction * len(prompts)))
    if eval_fraction > 0 and len(prompts) >= 2:
        n_eval = min(max(n_eval, 1), len(prompts) - 1)
    order = np.random.default_rng(seed).permutation(len(prompts))
    held = {prompts[k] for k in order[:n_eval]}
    train = tuple(ex for ex in dataset.examples if ex.prompt not in held)
    held_out = tuple(ex for ex in dataset.examples if ex.prompt in held)
    return dataclasses.replace(dataset, examples=train), dataclasses.replace(dataset, examples=held_out)
