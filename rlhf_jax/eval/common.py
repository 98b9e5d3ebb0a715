"""What the evaluations share: config checks with one-line errors, model specs, judges (an RM,
a task's gold scorer or a reward function), prompts, the binomial interval, per-token
log-probs of given responses, sampling with the tokens kept, and the report files.

Shapes: B batch, Q prompt length, R response length.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from rlhf_jax import data as data_lib
from rlhf_jax import sharding as sharding_lib
from rlhf_jax.models import ModelDef, cached_program, load_model, to_host
from rlhf_jax.ppo.step import response_logprobs_and_hidden
from rlhf_jax.reward_functions import load_reward_function
from rlhf_jax.reward_model import RMScorer
from rlhf_jax.sampling import SamplingConfig, make_generate, response_text, rollout_key
from rlhf_jax.tasks import TASKS, get_task

ScoreFn = Callable[[Sequence[str], Sequence[str]], np.ndarray]  # (prompts, responses) -> scores [N]


# ----------------------------------------------------------------------------- config checks


def check(ok: bool, field: str, value: Any, what: str) -> None:
    """Raises the one-line `ValueError` "field=value: what" unless `ok`."""
    if not ok:
        raise ValueError(f"{field}={value!r}: {what}")


def positive_int(cfg, field: str, minimum: int = 1) -> int:
    """`cfg.<field>` (dotted) as an int >= `minimum`, or a ValueError naming it."""
    value = cfg
    for part in field.split("."):
        value = value[part]
    check(isinstance(value, int) and not isinstance(value, bool) and value >= minimum, field, value,
          f"must be an integer >= {minimum}")
    return int(value)


def model_path(value: str, field: str) -> str:
    """A model given by path: a Hugging Face directory (a stage's workdir/model) or a .gguf file."""
    check(isinstance(value, str) and bool(value), field, value,
          "set it to a model directory (a stage's workdir/model) or a .gguf file")
    p = Path(value)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"{field}={value!r}: no such .gguf file")
    elif not (p / "config.json").is_file():
        raise FileNotFoundError(f"{field}={value!r}: no config.json there (expected a model directory, e.g. a "
                                f"stage's workdir/model, or a .gguf file)")
    return value


def model_spec(cfg) -> dict | str:
    """The model under evaluation (`model.init`, `model.path`) as a `load_model` spec."""
    init, path = cfg.model.init, cfg.model.path
    check(init in ("pretrained", "gguf"), "model.init", init,
          "must be 'pretrained' (model.path: a directory or .gguf file) or 'gguf' ('' = SmolLM2-135M-Instruct)")
    if init == "gguf" and not path:
        return {"init": "gguf", "path": ""}
    return model_path(path, "model.path")


def spec_label(spec: dict | str) -> str:
    return spec if isinstance(spec, str) else "SmolLM2-135M-Instruct (gguf)"


def make_mesh(cfg) -> Mesh:
    return sharding_lib.mesh_from_config(cfg.mesh)


def sampling_config(cfg, tokenizer, *, need_temperature: bool) -> SamplingConfig:
    """`cfg.sampling` checked field by field; `need_temperature`: T > 0 (log-probs, best-of-n)."""
    s = cfg.sampling
    positive_int(cfg, "sampling.max_new_tokens")
    check(s.temperature > 0 if need_temperature else s.temperature >= 0, "sampling.temperature", s.temperature,
          "must be > 0 (this evaluation reads log-probs at T or draws several samples)" if need_temperature
          else "must be >= 0 (0 = greedy)")
    check(s.top_k >= 0, "sampling.top_k", s.top_k, "must be >= 0 (0 = off)")
    check(0 < s.top_p <= 1, "sampling.top_p", s.top_p, "must be in (0, 1] (1 = off)")
    return SamplingConfig.for_tokenizer(tokenizer, max_new_tokens=int(s.max_new_tokens),
                                        temperature=float(s.temperature), top_k=int(s.top_k), top_p=float(s.top_p),
                                        extra_stop_token_ids=extra_stop_token_ids(cfg))


def extra_stop_token_ids(cfg) -> tuple[int, ...]:
    """`sampling.extra_stop_token_ids`: tokens besides EOS that end a response (none if unset)."""
    ids = tuple(int(i) for i in cfg.sampling.get("extra_stop_token_ids", ()))
    check(all(i >= 0 for i in ids), "sampling.extra_stop_token_ids", ids, "must be token ids (>= 0)")
    return ids


def generate_kwargs(cfg) -> dict:
    """`generate_texts` / `best_of_n` keywords from the config's sampling and batch fields."""
    s = cfg.sampling
    return dict(max_new_tokens=int(s.max_new_tokens), temperature=float(s.temperature), top_k=int(s.top_k),
                top_p=float(s.top_p), batch_size=positive_int(cfg, "eval.batch_size"),
                max_prompt_length=positive_int(cfg, "data.max_prompt_length"),
                extra_stop_token_ids=extra_stop_token_ids(cfg))


# ----------------------------------------------------------------------------- judges


@dataclasses.dataclass
class Judge:
    """A scorer of (prompt, response) texts: `kind` 'rm', 'task' or 'function'."""

    name: str
    kind: str
    score: ScoreFn
    task: Any = None  # the task object of kind 'task' (its prompts can be evaluated on)


def rm_judge(path: str, field: str, cfg, mesh: Mesh) -> Judge:
    """An RM directory as a judge: `RMScorer`, text re-encoded with the RM's own tokenizer."""
    scorer = RMScorer(model_path(path, field), max_length=positive_int(cfg, "eval.rm_max_length", 2),
                      batch_size=positive_int(cfg, "eval.batch_size"), mesh=mesh)
    return Judge(name=path, kind="rm", score=lambda p, r: np.asarray(scorer(list(zip(p, r))), np.float64))


def gold_judge(cfg, mesh: Mesh) -> Judge | None:
    """`eval.gold`: '' (none), a task name (`rlhf_jax.tasks`), an RM (a model directory or
    .gguf file) or a reward function 'package.module:function'."""
    gold = cfg.eval.gold
    if not gold:
        return None
    if gold in TASKS:
        task = get_task(gold)
        return Judge(name=f"task {gold}", kind="task", task=task,
                     score=lambda p, r: np.asarray(task.gold_batch(p, r), np.float64))
    if Path(gold).suffix == ".gguf" or Path(gold).is_dir():
        return rm_judge(gold, "eval.gold", cfg, mesh)
    if ":" in gold and "/" not in gold.partition(":")[0]:
        fn = load_reward_function(gold)
        return Judge(name=gold, kind="function", score=lambda p, r: np.asarray(fn(list(p), list(r)), np.float64))
    raise ValueError(f"eval.gold={gold!r}: not a task ({', '.join(sorted(TASKS))}), a model directory or .gguf "
                     f"file, or 'package.module:function'")


def score(judge: Judge, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """The judge's scores float64 [N], checked for shape and finiteness."""
    out = np.asarray(judge.score(list(prompts), list(responses)), np.float64)
    if out.shape != (len(responses),):
        raise ValueError(f"judge {judge.name!r} returned shape {out.shape}, expected ({len(responses)},)")
    if not np.all(np.isfinite(out)):
        raise ValueError(f"judge {judge.name!r} returned a non-finite score")
    return out


# ----------------------------------------------------------------------------- prompts


def prompts(cfg, tokenizer, gold: Judge | None) -> list[str]:
    """The prompts to sample from, as the policy sees them (chat formats rendered with
    `tokenizer`): the rows of `data.path` (any prompt format), or the built-in task's prompts
    when `data.path` is '' and `eval.gold` names a task. `eval.num_prompts` > 0 keeps the first N."""
    n = int(cfg.eval.num_prompts)
    check(n >= 0, "eval.num_prompts", n, "must be >= 0 (0 = every prompt of data.path)")
    if not cfg.data.path:
        if gold is None or gold.task is None:
            raise ValueError("data.path='': set it to a prompts file (any prompt format: prompt, messages, alpaca, "
                             "or a preference file), or set eval.gold to a task to use the task's prompts")
        return gold.task.prompts(n or 256)
    ds = data_lib.prompt_dataset(cfg.data.path, tokenizer, format=cfg.data.format,
                                 max_prompt_length=positive_int(cfg, "data.max_prompt_length"),
                                 on_bad_row=cfg.data.on_bad_row)
    texts = [ex.prompt for ex in ds.examples]
    if not texts:
        raise ValueError(f"data.path={cfg.data.path!r}: no usable prompt (every row was skipped)")
    return texts[:n] if n else texts


# ----------------------------------------------------------------------------- statistics


def wilson(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (successes may be fractional: ties
    count a half). (0, 1) when n = 0."""
    if not 0 < confidence < 1:
        raise ValueError(f"eval.confidence={confidence!r}: must be in (0, 1)")
    if n <= 0:
        return 0.0, 1.0
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams of whitespace words over all texts / all n-grams (Li et al. 2016); 0
    when the texts have no n-gram."""
    grams = [tuple(w[i:i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


# ----------------------------------------------------------------------------- programs


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def batch_rows(mesh: Mesh, batch_size: int) -> int:
    """Rows per program call: `batch_size` rounded up to a multiple of the batch shards."""
    return _round_up(int(batch_size), sharding_lib.batch_shards(mesh))


def logprob_program(model_def: ModelDef, mesh: Mesh, temperature: float):
    """jitted fn(params, query_ids_BQ, query_mask_BQ, response_ids_BR, response_mask_BR) ->
    log-probs [B, R] of the response tokens under softmax(logits / T), 0 off the mask. The
    query is left-padded and the response right-padded, as sampled (PPO's layout)."""
    def build():
        b2 = sharding_lib.batch_sharding(mesh, 2)

        def fn(params, q_ids, q_mask, r_ids, r_mask):
            ids = jnp.concatenate([q_ids, r_ids], 1)
            mask = jnp.concatenate([q_mask, r_mask], 1).astype(jnp.int32)
            logp_BR, _, _ = response_logprobs_and_hidden(model_def.merge(params), ids, mask, q_ids.shape[1],
                                                         temperature)
            return jnp.where(r_mask > 0, logp_BR, 0.0)

        return jax.jit(fn, in_shardings=(sharding_lib.param_shardings(model_def, mesh), b2, b2, b2, b2),
                       out_shardings=b2)

    return cached_program("eval_logprobs", model_def, mesh, float(temperature), build)


def response_logprobs(program, params: dict, q_ids: np.ndarray, q_mask: np.ndarray, r_ids: np.ndarray,
                      r_mask: np.ndarray, mesh: Mesh) -> np.ndarray:
    """`logprob_program` on host arrays whose batch the mesh's batch shards divide."""
    arrays = jax.device_put((q_ids, q_mask, r_ids, r_mask), sharding_lib.batch_sharding(mesh, 2))
    return to_host(program(params, *arrays))


@dataclasses.dataclass
class Policy:
    """A loaded policy: its definition, every variable, tokenizer and a label for tables."""

    label: str
    model_def: ModelDef
    params: dict
    tokenizer: Any

    @classmethod
    def load(cls, spec, label: str, mesh: Mesh, seed: int = 0) -> "Policy":
        model, tok = load_model(spec, heads=("lm",), mesh=mesh, seed=seed)
        model_def, _, params = ModelDef.split(model, None)
        return cls(label, model_def, params, tok)


@dataclasses.dataclass
class Sampled:
    """Samples of a policy, row r answering prompt `prompt_index[r]` (prompt-major, k per prompt).

    The per-batch arrays keep the layout the sampler used, so log-probs of other models on
    the same tokens are one forward pass per batch."""

    texts: list[str]
    prompt_index: np.ndarray  # int [N]
    logprobs: list[np.ndarray]  # [N] arrays: the sampler's log-probs (at T) per response token
    lengths: np.ndarray  # int [N] response tokens (the stop token included)
    stopped: np.ndarray  # bool [N]
    batches: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]]  # (q ids, q mask, r ids, r mask, rows)


def sample(policy: Policy, prompts_: Sequence[str], sampling: SamplingConfig, *, seed: int, batch_size: int,
           max_prompt_length: int, mesh: Mesh, num_samples: int = 1) -> Sampled:
    """`num_samples` responses per prompt, keeping tokens and log-probs (`generate_texts`
    keeps only text). Batch j is drawn with `rollout_key(seed, j)`."""
    tok = policy.tokenizer
    ds = data_lib.prompt_dataset([{"prompt": p} for p in prompts_], tok, format="prompt",
                                 max_prompt_length=int(max_prompt_length))
    generate = cached_program("generate", policy.model_def, mesh, sampling,
                              lambda: make_generate(policy.model_def, mesh, sampling))
    rows = [g for g in range(len(prompts_)) for _ in range(int(num_samples))]
    b = batch_rows(mesh, batch_size)
    texts, logprobs, lengths, stopped, batches = [], [], [], [], []
    for j, start in enumerate(range(0, len(rows), b)):
        chunk = rows[start:start + b]
        n = len(chunk)
        chunk = chunk + [chunk[-1]] * (b - n)  # one program shape
        q_ids, q_mask = data_lib.left_pad([ds.examples[g].input_ids for g in chunk], ds.seq_len, ds.pad_id)
        out = generate(policy.params, q_ids, q_mask, rollout_key(int(seed), j))
        r_ids, r_mask, lp, ln, st = (to_host(x) for x in (out.tokens, out.mask, out.logprobs, out.lengths,
                                                           out.stopped))
        for i in range(n):
            texts.append(response_text(tok, r_ids[i], ln[i], st[i]))
            logprobs.append(lp[i, :ln[i]])
        lengths += ln[:n].tolist()
        stopped += st[:n].tolist()
        batches.append((q_ids, q_mask, r_ids, r_mask, n))
    return Sampled(texts, np.asarray(rows, np.int64), logprobs, np.asarray(lengths, np.int64),
                   np.asarray(stopped, bool), batches)


def other_logprobs(sampled: Sampled, model: Policy, temperature: float, mesh: Mesh) -> list[np.ndarray]:
    """Log-probs under `model` (at `temperature`) of every sampled response's tokens."""
    program = logprob_program(model.model_def, mesh, temperature)
    out: list[np.ndarray] = []
    for q_ids, q_mask, r_ids, r_mask, n in sampled.batches:
        lp = response_logprobs(program, model.params, q_ids, q_mask, r_ids, r_mask, mesh)
        out += [lp[i, :int(r_mask[i].sum())] for i in range(n)]
    return out


def check_same_vocab(a: Policy, b: Policy, field: str) -> None:
    """Refuses a KL between models on different token sets."""
    na, nb = a.params["embed"].shape[0], b.params["embed"].shape[0]
    if na != nb:
        raise ValueError(f"{field}: {b.label} has another vocabulary than {a.label} ({nb} vs {na} tokens); "
                         f"a KL needs both models on the same tokens")


# ----------------------------------------------------------------------------- reports


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        return "nan" if not math.isfinite(float(x)) else f"{round(float(x), digits) + 0.0:.{digits}f}"  # no -0.000
    return str(x)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; numbers right-aligned, floats to 3 decimals."""
    def align(col):
        return "---:" if rows and all(isinstance(r[col], (int, float, np.number)) or r[col] is None for r in rows) \
            else "---"

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align(c) for c in range(len(header))) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def plain(x: Any) -> Any:
    """JSON-safe numbers (numpy scalars to Python, non-finite floats to strings)."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else str(float(x))
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def matplotlib_pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: Path, title: str) -> Path:
    """Titles, lays out, writes (PNG, 100 dpi) and closes an evaluation's figure."""
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    matplotlib_pyplot().close(fig)
    return out
