"""GRPO (Shao et al. 2024): the PPO stage without a critic, group-normalised advantages.

    python -m rlhf_jax.main --config configs/grpo.py --workdir runs/grpo \\
        --config.model.path=runs/sft/model --config.reward.rm_path=runs/rm/model

k samples per prompt; a sample's advantage is (score − group mean) / group std, the same for
each of its tokens; the KL to the reference is a β·k3 loss term, not a reward. The clipped
ratio and minibatch epochs are PPO's (configs/ppo.py). `ppo.batch_size` counts sequences:
32 = 4 prompts × k = 8. Options: `configs/grpo.py:k=4,scale_by_std=false` (Dr. GRPO: centre
only, no difficulty bias); `--config.ppo.kl_in_reward=true` puts the KL in the reward instead.
"""

from pathlib import Path

from rlhf_jax.config_lib import load_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, k=8, scale_by_std=True)
    c = load_config(Path(__file__).resolve().parent / "ppo.py")
    c.ppo.advantage = "grpo"
    c.ppo.samples_per_prompt = arg.k
    c.ppo.grpo_scale_by_std = arg.scale_by_std
    c.ppo.kl_in_reward = False  # beta * k3 KL loss term
    c.ppo.init_beta = 0.04  # DeepSeekMath's beta
    c.ppo.kl_target = 0.0  # fixed beta
    c.optimizer.max_grad_norm = 1.0  # TRL's GRPOTrainer clips (transformers' Trainer default); PPO does not
    return c
