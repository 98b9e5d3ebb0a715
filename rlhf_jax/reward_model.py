"""The reward model: the score at the last real token, the pairwise loss, the normalisation,
and scoring text with the RM's own tokenizer.

A training batch holds N responses (one forward pass each) and P pairs indexing them, so the
pairs of one prompt share the passes of its K responses (InstructGPT). The responses sit one
per left-padded row, or packed several to a row (`data.packed_preference_batch`); either way
the trunk's last layer runs only at the tokens whose score is read (`Transformer.hidden_at`).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import sharding as sharding_lib
from rlhf_jax.data import encode_prompt_response, left_pad
from rlhf_jax.data.batching import PAIR_WEIGHTINGS
from rlhf_jax.models import ModelDef, Transformer, cached_program, last_index, load_model, model_mesh, to_host
from rlhf_jax.models.load import resolve, saved_scoring

# The RM's max_length when it was saved without scoring settings (a foreign checkpoint, or one
# written before they were saved): the RM stage's default data.max_length.
FALLBACK_MAX_LENGTH = 256
_log = logging.getLogger(__name__)
_logged: set[tuple] = set()  # (source, setting, given, saved) mismatches already logged


def raw_scores(model: Transformer, input_ids_NT: jax.Array, attention_mask_NT: jax.Array) -> jax.Array:
    """Reward-head output at the last real token of each row [N], before normalisation."""
    rows_N = jnp.arange(input_ids_NT.shape[0])
    return model.raw_rewards(model.hidden_at(input_ids_NT, attention_mask_NT, rows_N, last_index(attention_mask_NT)))


def batch_raw_scores(model: Transformer, batch: dict) -> jax.Array:
    """`raw_scores` of a preference batch's N responses, one per row or packed
    (`segment_ids`, `response_row`, `response_end`; an unused slot's score is a real token's,
    which no pair reads)."""
    if "segment_ids" not in batch:
        return raw_scores(model, batch["input_ids"], batch["attention_mask"])
    rows_N, ends_N = (jnp.maximum(batch[k], 0) for k in ("response_row", "response_end"))
    return model.raw_rewards(model.hidden_at(batch["input_ids"], None, rows_N, ends_N,
                                             segment_ids_BT=batch["segment_ids"]))


def responses_in(batch: dict) -> np.ndarray:
    """bool [N]: which of a (host) preference batch's response slots hold a response."""
    if "response_end" in batch:
        return np.asarray(batch["response_end"]) >= 0
    return np.asarray(batch["attention_mask"]).sum(-1) > 0


def scores(model: Transformer, input_ids_NT: jax.Array, attention_mask_NT: jax.Array) -> jax.Array:
    """The RM's score [N]: gain · raw + bias, read at the last real token of each row."""
    return model.reward_gain[...] * raw_scores(model, input_ids_NT, attention_mask_NT) + model.reward_bias[...]


def rm_loss(model: Transformer, batch: dict, *, center_rewards_coef: float = 0.0) -> tuple[jax.Array, jax.Array, dict]:
    """Σ w·(−log σ(r₊ − r₋ − margin)) over the pairs (+ TRL's reward-centring term), Σ w, and
    metric (Σ w·x, Σ w) pairs.

    w = pair_mask · pair_weight: `pair_weight` is 1/C(K,2) for the pairs of a K-response
    ranking with per-prompt weighting (InstructGPT; `data.batching`), 1 per pair without it
    (or when the batch has no `pair_weight`). accuracy counts an exact tie r₊ = r₋ as 0.5 and
    `ties` reports how often one occurred (identical inputs, or a constant head).
    """
    r_N = batch_raw_scores(model, batch)
    r_chosen_P = r_N[batch["chosen_idx"]]
    r_rejected_P = r_N[batch["rejected_idx"]]
    mask_P = batch["pair_mask"].astype(jnp.float32)
    w_P = mask_P * batch["pair_weight"].astype(jnp.float32) if "pair_weight" in batch else mask_P
    diff_P = r_chosen_P - r_rejected_P
    loss_P = -jax.nn.log_sigmoid(diff_P - batch["margin"])
    if center_rewards_coef:
        loss_P = loss_P + center_rewards_coef * (r_chosen_P + r_rejected_P) ** 2
    weight = w_P.sum()
    tie_P = (diff_P == 0).astype(jnp.float32)

    def weighted(x_P):
        return (x_P * w_P).sum(), weight

    stats = {
        "loss": weighted(loss_P),
        "accuracy": weighted((diff_P > 0).astype(jnp.float32) + 0.5 * tie_P),
        "ties": weighted(tie_P),
        "reward_chosen": weighted(r_chosen_P),
        "reward_rejected": weighted(r_rejected_P),
        "reward_margin": weighted(diff_P),
        "pairs_per_batch": (mask_P.sum(), jnp.float32(1.0)),
    }
    return (loss_P * w_P).sum(), weight, stats


def batch_kwargs(cfg) -> dict:
    """`data.batches` arguments of a reward-model micro-batch (`cfg.rm`'s sizes and weighting,
    `cfg.data`'s padding or packing)."""
    weighting = cfg.rm.get("pair_weighting", "per_prompt")
    if weighting not in PAIR_WEIGHTINGS:
        raise ValueError(f"rm.pair_weighting={weighting!r} is not one of {list(PAIR_WEIGHTINGS)}")
    return dict(max_responses=int(cfg.rm.max_responses), max_pairs=int(cfg.rm.max_pairs), pair_weighting=weighting,
                pad_to_multiple_of=int(cfg.data.get("pad_to_multiple_of", 0)),
                pack=bool(cfg.data.get("packing", False)), row_multiple=int(cfg.data.get("packed_rows_multiple", 1)))


def normalisation(raw: np.ndarray) -> tuple[float, float]:
    """Gain and bias so that `gain · raw + bias` has mean 0 and std 1 (OpenAI's RM
    normalisation, on reference responses or on samples of the initial policy)."""
    raw = np.asarray(raw, np.float64)
    if raw.size < 2:
        raise ValueError(f"reward normalisation needs at least 2 scores, got {raw.size}")
    std = raw.std()
    if not np.isfinite(std) or std < 1e-8:
        raise ValueError(f"reward normalisation: scores have std {std}; the RM gives a constant reward")
    gain = 1.0 / std
    return float(gain), float(-raw.mean() * gain)


def _scores_program(model_def: ModelDef, params: dict, ids_BT, mask_BT):
    return scores(model_def.merge(params), ids_BT, mask_BT)


def scoring_settings(*, max_length: int, max_prompt_length: int | None, format: str,
                     add_bos: bool = True) -> dict:
    """How an RM's training texts were laid out and truncated: saved with the RM
    (`save_pretrained(scoring=...)`, in `rlhf_jax.json`) so that `RMScorer` scores text as the
    RM was trained on by default. `format` is the data format its rows were read in (how its
    prompts look; `RMScorer` takes prompts already in that layout)."""
    return {"max_length": int(max_length), "max_prompt_length": int(max_prompt_length) if max_prompt_length else None,
            "add_bos": bool(add_bos), "format": format}


def _log_once(key: tuple, msg: str, *args) -> None:
    if key not in _logged:
        _logged.add(key)
        _log.warning(msg, *args)


def _resolve_settings(rm: Any, settings_from: Any, max_length: int | None,
                      max_prompt_length: int | None) -> tuple[int, int | None, bool]:
    """(max_length, max_prompt_length or None, add_bos) for `RMScorer`: a value given wins over
    the saved one (a difference is logged once), the saved one over the fallback."""
    where = settings_from if settings_from is not None else rm
    pair = resolve(where).kind == "pair"
    source = "the (model, tokenizer) pair" if pair else str(where)
    saved = None if pair else saved_scoring(where)
    if saved is None and max_length is None and not pair:
        _log_once((source, "fallback"), "%s: no scoring settings saved with the RM; scoring with max_length=%d and "
                  "no prompt cap (pass max_length / max_prompt_length to match its training)",
                  source, FALLBACK_MAX_LENGTH)
    defaults = saved if saved is not None else {"max_length": FALLBACK_MAX_LENGTH, "max_prompt_length": None}
    out = {}
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if value is None:
            out[name] = defaults.get(name)
            continue
        out[name] = int(value) if name == "max_length" else int(value) or None  # max_prompt_length=0: no cap
        if saved is not None and out[name] != saved.get(name):
            _log_once((source, name, out[name], saved.get(name)), "%s: %s=%s given, but the RM was trained with "
                      "%s=%s (its saved scoring settings); scoring with %s", source, name, out[name], name,
                      saved.get(name), out[name])
    return int(out["max_length"]), out["max_prompt_length"], bool(defaults.get("add_bos", True))


class RMScorer:
    """Text in, scores out: (prompt, response) pairs encoded with the RM's own tokenizer
    exactly as its training data was — [BOS] prompt response [EOS], the prompt cut from the
    left to `max_prompt_length`, the whole to `max_length` — and scored in fixed-shape
    batches of one compiled program.

    `max_length`, `max_prompt_length`: None (the default) takes the RM's saved scoring
    settings (`scoring_settings`: those of its training data); an RM saved without them is
    scored with max_length=256 and no prompt cap (logged). A value given wins; if it differs
    from the saved one, that is logged once. `max_prompt_length=0`: no prompt cap.
    `settings_from`: where the settings are saved when `rm` is an already loaded
    (model, tokenizer) pair: its model directory.
    """

    def __init__(self, rm: Any, *, max_length: int | None = None, max_prompt_length: int | None = None,
                 batch_size: int = 32, tokenizer: Any = "", mesh=None, settings_from: Any = None):
        max_length, max_prompt_length, self.add_bos = _resolve_settings(rm, settings_from, max_length,
                                                                        max_prompt_length)
        if max_length < 2:
            raise ValueError(f"max_length: must be >= 2 (BOS + one response token), got {max_length}")
        if max_prompt_length is not None and not 1 <= max_prompt_length < max_length:
            raise ValueError(f"max_prompt_length: must be in [1, max_length - 1 = {max_length - 1}], "
                             f"got {max_prompt_length}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        model, self.tokenizer = load_model(rm, heads=("reward",), tokenizer=tokenizer, mesh=mesh,
                                           require_trained=("reward",), role="reward model")
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.mesh = mesh if mesh is not None else model_mesh(model)
        shards = sharding_lib.batch_shards(self.mesh)
        self.batch_size = -(-int(batch_size) // shards) * shards
        self.model_def, _, params = ModelDef.split(model, None)
        # A no-op for a model already laid out on this mesh; moves a pair's model otherwise.
        self.params = jax.device_put(params, sharding_lib.param_shardings(self.model_def, self.mesh))
        self._batch_sharding = sharding_lib.batch_sharding(self.mesh, 2)
        self._program = cached_program("rm_scores", self.model_def, self.mesh, None,
                                       lambda: jax.jit(functools.partial(_scores_program, self.model_def)))

    def encode(self, pairs: Sequence[tuple[str, str]]) -> list[np.ndarray]:
        """The token ids the RM scores, one array per (prompt, response): the preference data's
        own encoding (`data.encode_prompt_response`: the response kept, the prompt cut from the left)."""
        return encode_prompt_response(self.tokenizer, pairs, max_length=self.max_length,
                                      max_prompt_length=self.max_prompt_length, add_bos=self.add_bos)

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """Scores float32 [N] of (prompt, response) pairs."""
        seqs = [np.asarray(s, np.int32) for s in self.encode(pairs)]
        out = np.zeros(len(seqs), np.float32)
        b = self.batch_size
        for start in range(0, len(seqs), b):
            chunk = seqs[start:start + b]
            # Copies of a real row, not empty rows: one program shape and no all-padding row.
            chunk = chunk + [chunk[0]] * (b - len(chunk))
            ids_BT, mask_BT = left_pad(chunk, self.max_length, self.tokenizer.pad_token_id)
            ids_BT, mask_BT = jax.device_put((ids_BT, mask_BT), self._batch_sharding)
            n = min(b, len(seqs) - start)
            out[start:start + n] = to_host(self._program(self.params, ids_BT, mask_BT))[:n]
        return out
