"""The whole RLHF pipeline on a built-in task, in about two minutes on 2 CPU cores.

    python -m rlhf_jax.main --config experiments/quickstart.py --workdir runs/quickstart

A tiny byte-level model learns, from imperfect demonstrations, to describe things with
adjectives (SFT); its samples are compared in pairs by a simulated labeler who prefers kind
words and errs 10% of the time; a reward model learns those preferences; PPO optimises the
policy against it with a KL penalty to the SFT model. The gold scorer is read only by the
labeler and by the final evaluation. The stages are configs/sft.py, rm.py and ppo.py with
the fields below changed (the pipeline sets each stage's data path and starting model).
Variants: `experiments/quickstart.py:rounds=2`; `:algorithm=rloo` (or grpo, best_of_n, dpo) picks the
policy step of every round (rlhf_jax/pipeline.py); experiments/algorithms.py runs them all;
`:ptx=1.0` also runs the last round's PPO (RLOO, GRPO) again with PPO-ptx, the next-token loss on a
fresh draw of the task's demonstrations mixed into every step with coefficient 1.0, and the
alignment-tax table (held-out demonstration loss of SFT, PPO and PPO-ptx) compares the two; it
printed (seed 0, 116 s of pipeline) 0.576, 1.882 and 0.711 nats/token at gold scores +0.095,
+0.987 and +0.889 (PPO-ptx's KL to SFT 6.56 nats; SFT, RM and PPO are the ones below).

What it printed (seed 0; 99 s of pipeline on 2 idle CPU cores; the PPO row of experiments/algorithms.py gives the same figures):

| policy | gold score | RM accuracy | KL to SFT (nats) |
|--------|-----------:|------------:|-----------------:|
| SFT    |     +0.095 |             |                0 |
| PPO    |     +0.987 |       0.766 |             9.51 |
"""

from pathlib import Path

import ml_collections

from rlhf_jax.config_lib import load_config, parse_arg

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _sft() -> ml_collections.ConfigDict:
    c = load_config(CONFIGS / "sft.py")
    c.data.path = ""  # the task's demonstrations, written by the pipeline
    c.model.tiny.mlp_dim = 192
    c.tokenizer = "byte"
    c.data.max_length = 64
    c.data.eval_fraction = 0.05
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 20
    c.train.batch_size = 64
    c.train.num_steps = 400  # about 12 epochs: the model must spell the words before comparisons mean anything
    c.train.eval_every = 0
    c.train.log_every = 10
    c.train.checkpoint_every = 50
    return c


def _rm() -> ml_collections.ConfigDict:
    c = load_config(CONFIGS / "rm.py")
    c.data.path = ""  # the round's comparisons, exported by the pipeline
    c.data.max_length = 64
    # data.on_bad_row stays "skip": a pair of identical samples carries no preference.
    c.rm.max_responses = 64
    c.rm.max_pairs = 32
    c.optimizer.lr = 1e-3
    c.train.num_epochs = 4
    c.train.eval_every = 0
    return c


def _ppo(algorithm: str) -> ml_collections.ConfigDict:
    """The policy-gradient stage: configs/ppo.py, or rloo.py / grpo.py (k samples per prompt)."""
    c = load_config(CONFIGS / f"{algorithm if algorithm in ('rloo', 'grpo') else 'ppo'}.py")
    c.data.path = ""  # the task's prompts, written by the pipeline
    c.data.max_prompt_length = 24
    c.sampling.max_new_tokens = 40
    c.ppo.num_updates = 40
    c.ppo.batch_size = 64  # sequences: the same sample budget (40 × 64) for PPO, RLOO and GRPO
    c.ppo.init_beta = 0.05 if algorithm != "grpo" else c.ppo.init_beta  # GRPO: configs/grpo.py's k3-loss beta
    c.ppo.kl_target = 0.0
    c.optimizer.lr = 1e-3
    c.train.checkpoint_every = 20
    return c


def get_config(arg=None):
    arg = parse_arg(arg, rounds=1, algorithm="ppo", ptx=0.0)
    if arg.algorithm not in ("ppo", "rloo", "grpo", "dpo", "best_of_n"):
        raise ValueError(f"algorithm={arg.algorithm!r} is not one of ppo, rloo, grpo, dpo, best_of_n")
    c = ml_collections.ConfigDict()
    c.stage = "rlhf"
    c.seed = 0
    c.task = "word_sentiment"
    c.rounds = arg.rounds
    c.algorithm = arg.algorithm  # ppo, rloo, grpo, dpo or best_of_n: the policy step of every round
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, num_devices=0))  # given to every stage
    # The run's own files instead of the task's (task=''; rlhf_jax/pipeline.py, experiments/hh_loop_smollm2.py):
    # policy_path: the policy to start from ('' = configs/sft.py's model; 'smollm2'; a model dir or .gguf)
    c.policy_path = ""
    c.data = ml_collections.ConfigDict(dict(
        num_demos=2048, num_train_prompts=512, num_eval_prompts=256,
        sft_path="",  # demonstrations for SFT ('' = the task's; none and no task: policy_path is the SFT policy)
        prompts_path="", prompts_format="auto", on_bad_row="error"))  # prompts ('' = the task's); last N held out
    c.collect = ml_collections.ConfigDict(dict(num_prompts=512, num_responses=2, max_new_tokens=40,
                                               temperature=0.8, batch_size=256, max_prompt_length=64,
                                               extra_stop_token_ids=()))  # tokens besides EOS ending a response
    # kind: 'gold' (the task's scorer), 'function' (labeler.function), 'rm' (labeler.rm_path), 'human' (the page)
    c.labeler = ml_collections.ConfigDict(dict(kind="gold", noise=0.1, rm_path="", function="",
                                               wait_timeout_s=3600.0, poll_s=10.0))
    # Gold-scored samples, and the held-out LM loss of every model (lm_batches: 0 = all held-out batches).
    c.eval = ml_collections.ConfigDict(dict(
        max_new_tokens=40, temperature=0.7, batch_size=256, lm_batch_size=64, lm_batches=0, max_prompt_length=64,
        extra_stop_token_ids=(),
        gold="",  # '' = the task's scorer, else the labeler's RM / function; or a task, RM dir, 'module:function'
        rm_max_length=0,  # tokens an RM judge reads (0 = rm.data.max_length)
        # + the Gao et al. curve (PPO/RLOO/GRPO) on the first N held-out prompts (0 = all)
        overoptimisation=False, overoptimisation_ns=(1, 2, 4, 8), overoptimisation_prompts=0))
    # PPO-ptx: with coef > 0 the last round's policy-gradient step runs again mixing in
    # demonstrations ('sft') or the pretrain stage's text ('pretrain'); not for dpo / best_of_n.
    c.ptx = ml_collections.ConfigDict(dict(coef=arg.ptx, format="sft", batch_size=16))
    c.sft = _sft()
    c.rm = _rm()
    c.ppo = _ppo(arg.algorithm)
    # Best-of-n samples at evaluation: n = 10 per eval prompt is 2560 samples, the PG stage's 40 × 64.
    c.best_of_n = ml_collections.ConfigDict(dict(n=10))
    if (CONFIGS / "dpo.py").exists():  # the DPO stage (online DPO rounds train on the comparisons)
        c.dpo = load_config(CONFIGS / "dpo.py")
        c.dpo.data.path = ""  # the round's preferences, exported by the pipeline
    elif arg.algorithm == "dpo":
        raise ValueError("algorithm=dpo needs configs/dpo.py (the DPO stage), which this checkout lacks")
    return c
