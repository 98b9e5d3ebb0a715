"""The whole RLHF pipeline on a built-in task, in about five minutes on 2 CPU cores.

    python -m rlhf_jax.main --config configs/quickstart.py --workdir runs/quickstart

A tiny byte-level model learns, from imperfect demonstrations, to describe things with
adjectives (SFT); its samples are compared in pairs by a simulated labeler who prefers kind
words and errs 10% of the time; a reward model learns those preferences; PPO optimises the
policy against it with a KL penalty to the SFT model. The gold scorer is read only by the
labeler and by the final evaluation. Variants: `configs/quickstart.py:rounds=2`.
"""

import ml_collections

from rlhf_jax.config_defaults import base_config, ppo_config


def get_config(arg: str = ""):
    options = dict(a.split("=") for a in arg.split(",") if a)
    c = ml_collections.ConfigDict()
    c.stage = "rlhf"
    c.seed = 0
    c.task = "word_sentiment"
    c.rounds = int(options.get("rounds", 1))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, num_devices=0))
    c.data = ml_collections.ConfigDict(dict(num_demos=2048, num_train_prompts=512, num_eval_prompts=256))
    c.collect = ml_collections.ConfigDict(dict(num_prompts=512, num_responses=2, max_new_tokens=40,
                                               temperature=0.8, batch_size=256))
    c.labeler = ml_collections.ConfigDict(dict(kind="gold", noise=0.1, rm_path="", wait_timeout_s=3600.0,
                                               poll_s=10.0))
    c.eval = ml_collections.ConfigDict(dict(max_new_tokens=40, temperature=0.7, batch_size=256))

    tiny = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=192)

    sft = base_config()
    sft.stage = "sft"
    sft.model.tiny.update(tiny)
    sft.tokenizer = "byte"
    sft.data.max_length = 64
    sft.data.eval_fraction = 0.05
    sft.optimizer.lr = 3e-3
    sft.optimizer.warmup_steps = 20
    sft.train.batch_size = 64
    sft.train.num_steps = 400  # about 12 epochs: the model must spell the words before comparisons mean anything
    sft.train.eval_every = 0
    sft.train.log_every = 10
    sft.train.checkpoint_every = 50
    c.sft = sft

    rm = base_config()
    rm.stage = "rm"
    rm.data.max_length = 64
    rm.data.eval_fraction = 0.1
    rm.data.on_bad_row = "skip"  # a pair of identical samples carries no preference
    rm.rm.max_responses = 64
    rm.rm.max_pairs = 32
    rm.optimizer.lr = 1e-3
    rm.optimizer.warmup_steps = 10
    rm.train.num_epochs = 4
    rm.train.eval_every = 0
    rm.train.log_every = 10
    rm.train.checkpoint_every = 50
    c.rm = rm

    ppo = ppo_config()
    ppo.data.max_prompt_length = 24
    ppo.sampling.max_new_tokens = 40
    ppo.sampling.temperature = 0.7
    ppo.ppo.num_updates = 40
    ppo.ppo.batch_size = 64
    ppo.ppo.num_minibatches = 2
    ppo.ppo.init_beta = 0.05
    ppo.ppo.kl_target = 0.0
    ppo.ppo.sample_every = 10
    ppo.optimizer.lr = 1e-3
    ppo.train.checkpoint_every = 20
    c.ppo = ppo
    return c
