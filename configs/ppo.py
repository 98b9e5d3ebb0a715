"""PPO from an SFT policy against a learned reward model, and the PPO defaults.

    python -m rlhf_jax.main --config configs/ppo.py --workdir runs/ppo \\
        --config.model.path=runs/sft/model --config.reward.rm_path=runs/rm/model

The defaults are the values of lm-human-preferences / the N-implementation-details
reproductions unless a comment says otherwise (see docs/PPO.md). Prompts default to the
Alpaca sample's instructions in ../shared/data. Every field is overridable, e.g.
--config.ppo.kl_target=0 (fixed beta), --config.ppo.critic=separate,
--config.ppo.ptx_coef=0.1 --config.ppo.ptx_data=../shared/data/alpaca_en_demo.json, or PPO-ptx on
pretraining text: --config.ppo.ptx_format=pretrain --config.ppo.ptx_data=../shared/data/tinyshakespeare.txt.
"""

from pathlib import Path

import ml_collections

from rlhf_jax.config_lib import load_config, parse_arg


def get_config(arg=None):
    parse_arg(arg)  # no options
    c = load_config(Path(__file__).resolve().parent / "common.py")
    c.stage = "ppo"
    c.model.init = "pretrained"  # the SFT policy: an earlier stage's workdir/model
    c.data.path = "../shared/data/alpaca_en_demo.json"
    c.data.format = "auto"  # prompt-only data
    c.data.max_prompt_length = 64
    c.data.max_length = 128  # PPO-ptx SFT examples
    c.reward = ml_collections.ConfigDict(dict(
        rm_path="",  # an RM stage's workdir/model ('' = reward functions only)
        rm_tokenizer="",  # '' = the policy's tokens are scored directly; else decode + re-encode
        rm_max_length=0,  # with rm_tokenizer: 0 = the RM's own (its training data.max_length); 256 if it has none
        rm_weight=1.0,
        functions=(),  # 'package.module:function' reward functions on decoded text
        function_weights=(),
    ))
    # top_k / top_p must stay off: log-probs and KL are under the full softmax(logits / T).
    c.sampling = ml_collections.ConfigDict(dict(max_new_tokens=32, temperature=0.7, top_k=0, top_p=1.0,
                                                extra_stop_token_ids=()))
    c.ppo = ml_collections.ConfigDict(dict(
        num_updates=50,  # PPO iterations (rollout + optimisation)
        batch_size=32,  # rollouts (sequences) per iteration (global): batch_size / samples_per_prompt prompts
        advantage="gae",  # 'gae' (PPO, with a critic), 'rloo' or 'grpo' (critic-free; configs/rloo.py, grpo.py)
        samples_per_prompt=1,  # k samples of each prompt (>= 2 for rloo / grpo)
        kl_in_reward=True,  # False: beta * k3 KL loss term instead of the -beta * KL reward (GRPO)
        grpo_scale_by_std=True,  # False: Dr. GRPO (advantages centred, not divided by the group std)
        ppo_epochs=4,
        num_minibatches=2,
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
        ptx_format="sft",  # 'sft': ptx_data is an SFT dataset; 'pretrain': raw text packed into blocks
        ptx_eval_fraction=0.05,  # 'pretrain': the held-out share of ptx_data never mixed in (as the stage's)
        ptx_batch_size=8,
        sample_every=10,
        num_samples_shown=4,
    ))
    c.optimizer.lr = 1e-5
    c.optimizer.eps = 1e-5
    c.optimizer.max_grad_norm = 0.0  # no clipping, as lm-human-preferences, its reproductions and TRL's PPO
    c.optimizer.decay = "linear"
    c.train.checkpoint_every = 10
    return c
