"""PPO from an SFT policy against a learned reward model.

    python -m rlhf_jax.main --config configs/ppo.py --workdir runs/ppo \\
        --config.model.path=runs/sft/model --config.reward.rm_path=runs/rm/model

Prompts default to the Alpaca sample's instructions in ../shared/data. Every field is
overridable, e.g. --config.ppo.kl_target=0 (fixed beta), --config.ppo.critic=separate,
--config.ppo.ptx_coef=0.1 --config.ppo.ptx_data=../shared/data/alpaca_en_demo.json.
"""

from rlhf_jax.config_defaults import ppo_config


def get_config():
    c = ppo_config()
    c.data.path = "../shared/data/alpaca_en_demo.json"
    c.data.max_prompt_length = 64
    c.sampling.max_new_tokens = 32
    c.sampling.temperature = 0.7
    c.ppo.num_updates = 50
    c.ppo.batch_size = 32
    c.ppo.num_minibatches = 2
    c.ppo.kl_target = 6.0
    c.ppo.init_beta = 0.15
    c.optimizer.lr = 1e-5
    c.train.checkpoint_every = 10
    return c
