"""Fixed-shape, left-padded numpy batches and a resumable, multi-host batch iterator.

Left padding puts every row's last real token at T−1; shapes never change, so a jitted step
compiles once. Batches: SFT `input_ids`, `attention_mask` [B, T] and `loss_mask` [B, T] (a
loss reads logits[:, :-1] against input_ids[:, 1:] weighted by loss_mask[:, 1:]); preference
`input_ids`, `attention_mask` [N, T] (one row per response) with `chosen_idx`,
`rejected_idx`, `margin`, `pair_mask` [P] (indices into the *global* batch; whole prompt
groups are packed, InstructGPT-style), with `pair_weighting` also `pair_weight` [P] (RM and
DPO), and for DPO (`response_mask=True`) also `response_mask` [N, T] (1 on each row's response
tokens) and, when the groups carry precomputed reference log-probs, `ref_logps` [N]; prompt `input_ids`,
`attention_mask` [B, Tq] and `index` [B] (−1 for a padding row). Padding rows are all pad with
masks 0. Packed batches (`pack=True`) put several SFT examples, or several responses of a
preference batch, in one right-padded row with `segment_ids` (`packed_sft_batch`,
`packed_preference_batch`).

Epoch e's order is a permutation from `default_rng([seed, e])`, steps count globally, and
`start_step=s` resumes exactly at step s. Process i of n yields rows [i·B/n, (i+1)·B/n) of
every global batch. `drop_last` drops an epoch's last batch only when it is partial: for SFT
and prompts fewer than B examples, for preferences a batch the smallest group would still
have fitted in (a full last batch is kept).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from rlhf_jax.data.examples import Dataset


def left_pad(seqs: Sequence[np.ndarray | None], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token sequences into (input_ids int32[B, length], attention_mask int32[B, length]).

    A None entry gives an all-padding row. Sequences longer than `length` are an error (the
    datasets truncate to their seq_len, so this means a mismatched length was passed).
    """
    ids = np.full((len(seqs), length), pad_id, np.int32)
    mask = np.zeros((len(seqs), length), np.int32)
    for b, seq in enumerate(seqs):
        if seq is None:
            continue
        if len(seq) > length:
            raise ValueError(f"sequence of {len(seq)} tokens does not fit in length {length}")
        ids[b, length - len(seq):] = seq
        mask[b, length - len(seq):] = 1
    return ids, mask


def sft_batch(dataset: Dataset, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """SFT batch of the examples at `indices` (−1 = padding row); arrays [len(indices), T]."""
    T = dataset.seq_len
    exs = [dataset.examples[i] if i >= 0 else None for i in indices]
    ids, mask = left_pad([None if e is None else e.input_ids for e in exs], T, dataset.pad_id)
    loss = np.zeros((len(exs), T), np.float32)
    for b, e in enumerate(exs):
        if e is not None:
            loss[b, T - len(e.loss_mask):] = e.loss_mask
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss}


def packed_sft_batch(dataset: Dataset, rows: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
    """SFT batch of packed rows: row r holds the examples `rows[r]` back to back (right-padded;
    an empty row is all padding), arrays [len(rows), T]. Besides the `sft_batch` keys it has
    `segment_ids` int32[R, T] (1, 2, … per example of the row, 0 on padding): the model attends
    within an example only and restarts positions at each (`Transformer.hidden`). A first token
    is never a target, so no example is predicted from the one before it."""
    T = dataset.seq_len
    ids = np.full((len(rows), T), dataset.pad_id, np.int32)
    segments = np.zeros((len(rows), T), np.int32)
    loss = np.zeros((len(rows), T), np.float32)
    for r, row in enumerate(rows):
        at = 0
        for k, i in enumerate(row, start=1):
            e = dataset.examples[i]
            n = len(e.input_ids)
            if at + n > T:
                raise ValueError(f"examples {list(row)} hold more than the {T} tokens of a packed row")
            ids[r, at:at + n], segments[r, at:at + n], loss[r, at:at + n] = e.input_ids, k, e.loss_mask
            loss[r, at] = 0.0
            at += n
    return {"input_ids": ids, "attention_mask": (segments > 0).astype(np.int32), "loss_mask": loss,
            "segment_ids": segments}


def pack_rows(lengths: Sequence[int], order: Sequence[int], row_length: int, window: int = 64) -> list[list[int]]:
    """First-fit packing of examples (taken in `order`) into rows of `row_length` tokens.

    Each example goes to the first of the last `window` opened rows with room for it, else opens
    a new row; rows are returned in the order they were opened. The window keeps it linear in
    the number of examples while short examples still fill the gaps long ones leave."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = int(lengths[i])
        for r in range(max(0, len(rows) - window), len(rows)):
            if free[r] >= n:
                rows[r].append(int(i))
                free[r] -= n
                break
        else:
            rows.append([int(i)])
            free.append(row_length - n)
    return rows


def prompt_batch(dataset: Dataset, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """Prompt batch of the examples at `indices` (−1 = padding row); arrays [len(indices), Tq]."""
    seqs = [dataset.examples[i].input_ids if i >= 0 else None for i in indices]
    ids, mask = left_pad(seqs, dataset.seq_len, dataset.pad_id)
    return {"input_ids": ids, "attention_mask": mask, "index": np.asarray(indices, np.int32)}


PAIR_WEIGHTINGS = ("per_pair", "per_prompt")


def _response_starts(group) -> np.ndarray:
    """Where each response's own tokens begin in the group's prompt+response sequences."""
    if group.response_starts is None:
        raise ValueError(f"{group.where}: this group has no response_starts (build it with "
                         "preference_dataset) so its response tokens are unknown")
    return group.response_starts


def _optional_fields(dataset: Dataset, groups: Sequence[int], max_responses: int, max_pairs: int,
                     response_mask: bool, pair_weighting: str | None) -> dict[str, np.ndarray]:
    """The optional keys of `preference_batch` for the groups packed in this order.

    response_mask [N, T] (DPO): 1 on the response tokens of each (left-padded) row.
    pair_weight [P] (RM and DPO): 1 per pair ("per_pair") or 1/(pairs of its group)
    ("per_prompt", InstructGPT: each comparison set counts once however many responses were
    ranked, so a K=4 ranking's 6 pairs weigh as much as one K=2 pair); 0 on padding slots.
    ref_logps [N] (DPO): the groups' precomputed reference log-probs (0 on padding rows), when
    every group has them.
    """
    exs = [dataset.examples[g] for g in groups]
    out: dict[str, np.ndarray] = {}
    if response_mask:
        T, mask, row = dataset.seq_len, np.zeros((max_responses, dataset.seq_len), np.float32), 0
        for group in exs:
            for seq, start in zip(group.responses, _response_starts(group)):
                mask[row, T - len(seq) + int(start):] = 1.0
                row += 1
        out["response_mask"] = mask
    if pair_weighting is not None:
        if pair_weighting not in PAIR_WEIGHTINGS:
            raise ValueError(f"pair_weighting={pair_weighting!r} is not one of {PAIR_WEIGHTINGS}")
        w = [np.full(len(g.chosen), 1.0 if pair_weighting == "per_pair" else 1.0 / len(g.chosen)) for g in exs]
        weight = np.concatenate(w) if w else np.zeros(0)
        out["pair_weight"] = np.concatenate([weight, np.zeros(max_pairs - len(weight))]).astype(np.float32)
    if exs and all(g.ref_logps is not None for g in exs):
        ref = np.concatenate([g.ref_logps for g in exs]).astype(np.float32)
        out["ref_logps"] = np.concatenate([ref, np.zeros(max_responses - len(ref), np.float32)])
    return out


def _pair_fields(dataset: Dataset, groups: Sequence[int], max_responses: int,
                 max_pairs: int) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """The responses of the groups at `groups` in order, and their pairs' `chosen_idx`,
    `rejected_idx`, `margin` and `pair_mask` [max_pairs] (indices into those responses)."""
    seqs: list[np.ndarray] = []
    chosen = np.zeros(max_pairs, np.int32)
    rejected = np.zeros(max_pairs, np.int32)
    margin = np.zeros(max_pairs, np.float32)
    pair_mask = np.zeros(max_pairs, np.float32)
    p = 0
    for g in groups:
        group = dataset.examples[g]
        _check_group_fits(group, max_responses, max_pairs)
        n = len(group.chosen)
        if len(seqs) + len(group.responses) > max_responses or p + n > max_pairs:
            raise ValueError(f"groups {list(groups)} do not fit in one batch of {max_responses} responses / "
                             f"{max_pairs} pairs")
        chosen[p:p + n] = group.chosen + len(seqs)
        rejected[p:p + n] = group.rejected + len(seqs)
        margin[p:p + n] = group.margin
        pair_mask[p:p + n] = 1.0
        p += n
        seqs += list(group.responses)
    return seqs, {"chosen_idx": chosen, "rejected_idx": rejected, "margin": margin, "pair_mask": pair_mask}


def preference_batch(dataset: Dataset, groups: Sequence[int], max_responses: int, max_pairs: int, *,
                     response_mask: bool = False, pair_weighting: str | None = None) -> dict[str, np.ndarray]:
    """Packs the preference groups at `groups` into one batch of N=max_responses response
    rows and P=max_pairs pair slots (see the module docstring for the keys; the optional
    keys only when asked for)."""
    seqs, pairs = _pair_fields(dataset, groups, max_responses, max_pairs)
    ids, mask = left_pad(seqs + [None] * (max_responses - len(seqs)), dataset.seq_len, dataset.pad_id)
    return {"input_ids": ids, "attention_mask": mask, **pairs,
            **_optional_fields(dataset, groups, max_responses, max_pairs, response_mask, pair_weighting)}


def pack_responses(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """First-fit-decreasing packing of one batch's responses into rows of `row_length` tokens
    (lists of response indices, longest first)."""
    order = sorted(range(len(lengths)), key=lambda i: -int(lengths[i]))
    return pack_rows(lengths, order, row_length, window=len(order))


def pad_rows(batch: dict[str, np.ndarray], num_rows: int, pad_id: int) -> dict[str, np.ndarray]:
    """A packed preference batch with all-padding rows appended up to `num_rows`: every [R, T]
    array grows (input_ids with `pad_id`, response_idx with −1, the others with 0); the [N]
    and [P] arrays stay as they are."""
    extra = ((0, num_rows - batch["input_ids"].shape[0]), (0, 0))
    fill = {"input_ids": pad_id, "response_idx": -1}
    return {k: np.pad(v, extra, constant_values=fill.get(k, 0)) if v.ndim == 2 else v for k, v in batch.items()}


def packed_preference_batch(dataset: Dataset, groups: Sequence[int], max_responses: int, max_pairs: int, *,
                            num_rows: int | None = None, response_mask: bool = False,
                            pair_weighting: str | None = None) -> dict[str, np.ndarray]:
    """The preference groups at `groups` with their responses packed several to a row
    (`pack_responses`) in `num_rows` right-padded rows of T tokens (default: as many as they
    need): `input_ids`, `attention_mask`, `segment_ids` [R, T] (1, 2, … per response of the
    row, 0 on padding, as `packed_sft_batch`), `response_row` and `response_end` int32 [N]
    (where response n lies in the batch: its row and its last token's column; −1 for an
    unused response slot), and the pair keys of `preference_batch`, which index the N
    responses as before. A reward model reads response n's score at (row, end).

    With `response_mask` (DPO) also `response_mask` float32 [R, T] (1 on every response's own
    tokens, as in `preference_batch`) and `response_idx` int32 [R, T] (the n of the response
    each token belongs to, −1 on padding), so per-response sums are segment sums."""
    seqs, pairs = _pair_fields(dataset, groups, max_responses, max_pairs)
    T = dataset.seq_len
    layout = pack_responses([len(q) for q in seqs], T)
    if num_rows is not None and num_rows < len(layout):
        raise ValueError(f"groups {list(groups)}: their responses need {len(layout)} packed rows, more than {num_rows}")
    starts = [int(s) for g in groups for s in _response_starts(dataset.examples[g])] if response_mask else None
    ids = np.full((len(layout), T), dataset.pad_id, np.int32)
    segments = np.zeros((len(layout), T), np.int32)
    owner = np.full((len(layout), T), -1, np.int32)
    in_response = np.zeros((len(layout), T), np.float32)
    row_N = np.full(max_responses, -1, np.int32)
    end_N = np.full(max_responses, -1, np.int32)
    for r, row in enumerate(layout):
        at = 0
        for k, i in enumerate(row, start=1):
            n = len(seqs[i])
            ids[r, at:at + n], segments[r, at:at + n], owner[r, at:at + n] = seqs[i], k, i
            if starts is not None:
                in_response[r, at + starts[i]:at + n] = 1.0
            row_N[i], end_N[i] = r, at + n - 1
            at += n
    batch = {"input_ids": ids, "attention_mask": (segments > 0).astype(np.int32), "segment_ids": segments,
             "response_row": row_N, "response_end": end_N, **pairs,
             **_optional_fields(dataset, groups, max_responses, max_pairs, False, pair_weighting)}
    if response_mask:
        batch.update(response_mask=in_response, response_idx=owner)
    return batch if num_rows is None else pad_rows(batch, int(num_rows), dataset.pad_id)


def _check_group_fits(group, max_responses: int, max_pairs: int) -> None:
    if len(group.responses) > max_responses or len(group.chosen) > max_pairs:
        raise ValueError(
            f"{group.where}: the prompt group starting at this row has {len(group.responses)} responses and "
            f"{len(group.chosen)} pairs, more than one batch holds (max_responses={max_responses}, "
            f"max_pairs={max_pairs}). Raise the limits, or pass them to preference_dataset with "
            "on_bad_row='skip' to drop such groups."
        )


def pack_groups(sizes: Sequence[tuple[int, int]], order: Sequence[int], max_responses: int,
                max_pairs: int) -> list[list[int]]:
    """Greedy packing of groups (taken in `order`) into batches.

    Args:
      sizes: (number of responses, number of pairs) per group.
      order: the group indices in the order to pack them.
    Returns:
      the list of batches, each a list of group indices; a batch is closed when the next
      group would overflow max_responses or max_pairs.
    """
    out: list[list[int]] = []
    current: list[int] = []
    n_resp = n_pairs = 0
    for g in order:
        r, p = sizes[g]
        if current and (n_resp + r > max_responses or n_pairs + p > max_pairs):
            out.append(current)
            current, n_resp, n_pairs = [], 0, 0
        current.append(int(g))
        n_resp += r
        n_pairs += p
    if current:
        out.append(current)
    return out


def _epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def _epoch_plan(dataset: Dataset, epoch: int, *, batch_size, max_responses, max_pairs, seed, shuffle,
                drop_last, pack=False) -> list[list]:
    """The batches of one epoch as lists of example (or group) indices; −1 = padding row. Packed
    SFT batches are lists of rows, each a list of example indices ([] = padding row)."""
    order = _epoch_order(len(dataset), seed, epoch, shuffle)
    if pack and dataset.kind == "sft":
        rows = pack_rows([len(e.input_ids) for e in dataset.examples], order, dataset.seq_len)
        n = len(rows)
        plan = [rows[k:k + batch_size] for k in range(0, n - n % batch_size, batch_size)]
        if n % batch_size and not drop_last:
            plan.append(rows[n - n % batch_size:] + [[]] * (batch_size - n % batch_size))
        return plan
    if dataset.kind == "preference":
        sizes = [(len(g.responses), len(g.chosen)) for g in dataset.examples]
        plan = pack_groups(sizes, order, max_responses, max_pairs)
        if drop_last and plan:
            # Partial only if the smallest group would still have fitted in it.
            n_resp = sum(sizes[g][0] for g in plan[-1])
            n_pairs = sum(sizes[g][1] for g in plan[-1])
            smallest_r, smallest_p = min(r for r, _ in sizes), min(p for _, p in sizes)
            if n_resp + smallest_r <= max_responses and n_pairs + smallest_p <= max_pairs:
                plan = plan[:-1]
        return plan
    n = len(order)
    plan = [order[k:k + batch_size].tolist() for k in range(0, n - n % batch_size, batch_size)]
    if n % batch_size and not drop_last:
        rest = order[n - n % batch_size:].tolist()
        plan.append(rest + [-1] * (batch_size - len(rest)))
    return plan


def _check_args(dataset: Dataset, batch_size, max_responses, max_pairs, process_index, process_count,
                pack=False) -> None:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
    if pack and dataset.kind == "prompt":
        raise ValueError(f"packing is for SFT and preference data; {dataset.source} holds prompts")
    if dataset.kind == "preference":
        if max_responses is None or max_pairs is None:
            raise ValueError("preference batches need max_responses and max_pairs")
        sizes = {"max_responses": max_responses, "max_pairs": max_pairs}
        for g in dataset.examples:
            _check_group_fits(g, max_responses, max_pairs)
    else:
        if batch_size is None:
            raise ValueError(f"{dataset.kind} batches need batch_size")
        sizes = {"batch_size": batch_size}
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
        if value % process_count:
            raise ValueError(f"global {name}={value} is not divisible by process_count={process_count}; "
                             "every process takes an equal slice of each global batch")


def batches(dataset: Dataset, *, batch_size: int | None = None, max_responses: int | None = None,
            max_pairs: int | None = None, seed: int = 0, shuffle: bool = True, num_epochs: int | None = 1,
            start_step: int = 0, drop_last: bool = True, process_index: int = 0,
            process_count: int = 1, response_mask: bool = False,
            pair_weighting: str | None = None, pack: bool = False,
            pad_to_multiple_of: int = 0, row_multiple: int = 1,
            grad_accum: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Iterates over this process's slice of every global batch (module docstring).

    Args:
      dataset: from `sft_dataset`, `preference_dataset` or `prompt_dataset`.
      batch_size: global B (SFT and prompt data).
      max_responses, max_pairs: global N and P (preference data).
      seed: shuffling seed (non-negative); epoch e's order depends only on (seed, e).
      shuffle: False keeps the dataset order (evaluation).
      num_epochs: epochs to run; None = forever.
      start_step: global step (counted from 0 over all epochs) of the first batch yielded.
      drop_last: drop (True) or pad (False) the last partial batch of each epoch (module
        docstring: a full last batch is never dropped).
      process_index, process_count: this process and the number of processes.
      response_mask, pair_weighting: the optional keys of preference batches (`pair_weighting`
        one of `PAIR_WEIGHTINGS`, or None for no `pair_weight`).
      pack: SFT data: batches of `batch_size` packed rows (`pack_rows`, `packed_sft_batch`)
        instead of one example per row, so a batch holds as many examples as fit. Preference
        data: the same groups per batch, their responses packed several to a row
        (`packed_preference_batch`, with `response_idx` beside `response_mask` for DPO), in as
        many rows as they need rounded up to a multiple of `row_multiple` and of
        `process_count` (so a jitted step compiles once per row count, max_responses /
        row_multiple programs at most); the `grad_accum` consecutive batches of a step
        (counted from global step 0) get the same row count, so they stack.
      pad_to_multiple_of: SFT and preference data: > 0 pads each batch to the smallest multiple
        of this that holds its longest row (at most T) instead of to T, so a jitted step
        compiles once per length bucket (T / pad_to_multiple_of programs at most).

    Returns:
      an iterator of batch dicts with local leading sizes B/n (or N/n and P/n).
    """
    _check_args(dataset, batch_size, max_responses, max_pairs, process_index, process_count, pack)
    if row_multiple < 1 or grad_accum < 1:
        raise ValueError(f"row_multiple={row_multiple}, grad_accum={grad_accum}: both must be positive")
    if pad_to_multiple_of < 0 or (pack and pad_to_multiple_of):
        raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of}: use a positive multiple, or 0 (pad to the "
                         "dataset's length; packed rows are always full length)")
    plan_args = dict(batch_size=batch_size, max_responses=max_responses, max_pairs=max_pairs, seed=seed,
                     shuffle=shuffle, drop_last=drop_last, pack=pack)
    if not _epoch_plan(dataset, 0, **plan_args):
        raise ValueError(f"{dataset.source}: {len(dataset)} examples give no complete batch "
                         f"({plan_args}); use a smaller batch or drop_last=False")

    def local(rows):
        size = len(rows) // process_count
        return rows[process_index * size:(process_index + 1) * size]

    def build(plan: list) -> dict[str, np.ndarray]:
        if dataset.kind == "preference":
            # Built globally: a group's pairs may point at rows of another process's slice.
            batch = preference_batch(dataset, plan, max_responses, max_pairs, response_mask=response_mask,
                                     pair_weighting=pair_weighting)
            return {k: local(v) for k, v in trim(batch, int(batch["attention_mask"].sum(1).max())).items()}
        if pack:
            return packed_sft_batch(dataset, local(plan))
        batch = (sft_batch if dataset.kind == "sft" else prompt_batch)(dataset, local(np.asarray(plan)))
        if dataset.kind == "sft" and pad_to_multiple_of:  # the global batch's longest row sets the length
            return trim(batch, max((len(dataset.examples[i].input_ids) for i in plan if i >= 0), default=0))
        return batch

    def trim(batch: dict[str, np.ndarray], longest: int) -> dict[str, np.ndarray]:
        """Drops the all-padding columns on the left, down to the multiple of pad_to_multiple_of
        that holds `longest` tokens."""
        if not pad_to_multiple_of:
            return batch
        T = batch["input_ids"].shape[1]
        keep = min(T, max(1, -(-longest // pad_to_multiple_of)) * pad_to_multiple_of)
        return {k: v[:, T - keep:] if v.ndim == 2 and v.shape[1] == T else v for k, v in batch.items()}

    def planned() -> Iterator[tuple[int, list]]:
        """(global step, plan) of every batch from start_step on."""
        step, epoch = 0, 0
        while num_epochs is None or epoch < num_epochs:
            plan = _epoch_plan(dataset, epoch, **plan_args)
            for k in range(max(0, start_step - step), len(plan)):
                yield step + k, plan[k]
            step += len(plan)
            epoch += 1

    def generate() -> Iterator[dict[str, np.ndarray]]:
        if not (pack and dataset.kind == "preference"):
            for _, plan in planned():
                yield build(plan)
            return
        multiple = int(np.lcm(row_multiple, process_count))
        pending: list[tuple[int, dict]] = []  # (global step, global batch) of one optimiser step

        def flush():
            rows = max(batch["input_ids"].shape[0] for _, batch in pending)
            for _, batch in pending:
                yield {k: local(v) for k, v in pad_rows(batch, -(-rows // multiple) * multiple,
                                                         dataset.pad_id).items()}
            pending.clear()

        for step, plan in planned():
            if pending and pending[0][0] // grad_accum != step // grad_accum:
                yield from flush()
            pending.append((step, packed_preference_batch(dataset, plan, max_responses, max_pairs,
                                                          response_mask=response_mask,
                                                          pair_weighting=pair_weighting)))
        if pending:
            yield from flush()

    return generate()


def num_batches(dataset: Dataset, *, batch_size: int | None = None, max_responses: int | None = None,
                max_pairs: int | None = None, seed: int = 0, shuffle: bool = True, epoch: int = 0,
                drop_last: bool = True, response_mask: bool = False, pair_weighting: str | None = None,
                pack: bool = False, pad_to_multiple_of: int = 0, row_multiple: int = 1, grad_accum: int = 1) -> int:
    """Number of batches in one epoch (for schedules). For preference data the packing, and so
    the count, can differ slightly between epochs; this is the count of epoch `epoch`. The
    optional key and layout options are accepted (and do not change the count) so batch kwargs
    can be passed as-is."""
    del response_mask, pair_weighting, pad_to_multiple_of, row_multiple, grad_accum
    _check_args(dataset, batch_size, max_responses, max_pairs, 0, 1, pack)
    return len(_epoch_plan(dataset, epoch, batch_size=batch_size, max_responses=max_responses,
                           max_pairs=max_pairs, seed=seed, shuffle=shuffle, drop_last=drop_last, pack=pack))


def prompt_texts(dataset: Dataset, batch: dict[str, np.ndarray]) -> list[str]:
    """The prompt texts of a prompt batch, for logging ("" for padding rows)."""
    return [dataset.examples[i].prompt if i >= 0 else "" for i in batch["index"].tolist()]
