"""PPO stage: the algorithm pieces as pure functions of arrays (`core`)."""

from rlhf_jax.ppo.core import (
    KL_ESTIMATORS,
    KLController,
    KLPenalizedRewards,
    adaptive_kl_update,
    compute_rewards,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_k1,
    kl_k3,
    last_token_onehot,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    value_loss,
)

__all__ = [
    "KL_ESTIMATORS",
    "KLController",
    "KLPenalizedRewards",
    "adaptive_kl_update",
    "compute_rewards",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "kl_k1",
    "kl_k3",
    "last_token_onehot",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "value_loss",
]
