"""RLOO (REINFORCE leave-one-out, Ahmadian et al. 2024): the PPO stage without a critic.

    python -m rlhf_jax.main --config configs/rloo.py --workdir runs/rloo \\
        --config.model.path=runs/sft/model --config.reward.rm_path=runs/rm/model

k samples per prompt; a sample's advantage is its KL-penalised return minus the mean of the
other k − 1 (TRL's RLOO); the clipped ratio and minibatch epochs are PPO's (configs/ppo.py,
whose fields all apply). `ppo.batch_size` counts sequences: 32 = 8 prompts × k = 4.
Options: `configs/rloo.py:k=8`.
"""

from pathlib import Path

from rlhf_jax.config_lib import load_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, k=4)
    c = load_config(Path(__file__).resolve().parent / "ppo.py")
    c.ppo.advantage = "rloo"
    c.ppo.samples_per_prompt = arg.k
    c.ppo.kl_in_reward = True  # -beta * KL per token in the return, as TRL's RLOO
    c.ppo.init_beta = 0.05  # TRL's RLOOConfig.kl_coef
    c.ppo.kl_target = 0.0  # fixed beta
    # optimizer.max_grad_norm = 0 from ppo.py: TRL's on-policy RLOOTrainer does not clip either.
    return c
