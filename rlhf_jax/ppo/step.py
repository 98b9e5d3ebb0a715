"""One PPO iteration's programs as pure functions of the policy, reference, reward-model and
critic parameters: `score_rollout` (old log-probs, values, reference log-probs and RM scores
of a sampled batch) and `ppo_update` (rewards, advantages, E epochs × M minibatches, β update).

`advantage` picks the estimator: "gae" (PPO, with a critic) or the critic-free "rloo" and
"grpo", which score k samples per prompt (rows prompt-major) and give every token of a
sequence its group-relative advantage. The KL to the reference is either a −β·KL reward per
token (`kl_in_reward`, as PPO) or a β·k3 loss term (GRPO).

Shapes: B rollout batch, Q query length, R response length, V vocabulary. Log-probs divide
the logits by the sampling temperature, or the KL grows far too fast.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import reward_model, rng
from rlhf_jax.models import ModelDef, Transformer, lora
from rlhf_jax.ppo import advantages as advantages_lib, core
from rlhf_jax.sampling import rm_input_ids
from rlhf_jax.sft import selected_token_logprobs, sft_loss


ADVANTAGES = ("gae", "rloo", "grpo")


@dataclasses.dataclass(frozen=True)
class PPOHyperparams:
    """Static hyperparameters of the update (hashable, part of the compiled program)."""

    temperature: float = 0.7
    ppo_epochs: int = 4
    num_minibatches: int = 1
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    kl_estimator: str = "k1"
    whiten_rewards: bool = False
    kl: core.KLController = core.KLController()  # fixed β unless it has a target
    ptx_coef: float = 0.0
    critic: str = "shared"  # "shared": value head on the policy trunk; "separate": own model
    advantage: str = "gae"  # "gae" (PPO, critic), "rloo" or "grpo" (critic-free, k samples per prompt)
    samples_per_prompt: int = 1  # k; rows [g·k, (g+1)·k) of a rollout are prompt g's samples
    kl_in_reward: bool = True  # False: no KL in the reward, β · k3 KL loss term instead (GRPO)
    grpo_scale_by_std: bool = True  # False: Dr. GRPO (centre only)
    rm_stop_as_eos: tuple[int, ...] = ()  # extra stop tokens the in-program RM reads as EOS
    eos_id: int = 0

    @property
    def uses_critic(self) -> bool:
        return self.advantage == "gae"

    def __post_init__(self):
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"ppo.advantage={self.advantage!r} is not one of {ADVANTAGES}")
        if self.uses_critic and (self.samples_per_prompt != 1 or not self.kl_in_reward):
            raise ValueError("ppo.advantage='gae' needs ppo.samples_per_prompt=1 and ppo.kl_in_reward=True")
        if not self.uses_critic and self.samples_per_prompt < 2:
            raise ValueError(f"ppo.advantage={self.advantage!r} needs ppo.samples_per_prompt >= 2, "
                             f"got {self.samples_per_prompt}")
        if not self.uses_critic and self.whiten_rewards:
            raise ValueError(f"ppo.whiten_rewards is a GAE option; ppo.advantage={self.advantage!r} has no critic")
        if self.kl_estimator not in core.KL_ESTIMATORS:
            raise ValueError(f"ppo.kl_estimator={self.kl_estimator!r} is not one of {sorted(core.KL_ESTIMATORS)}")
        if self.critic not in ("shared", "separate"):
            raise ValueError(f"ppo.critic={self.critic!r} is not one of 'shared', 'separate'")
        if self.temperature <= 0:
            raise ValueError(f"sampling.temperature={self.temperature} must be > 0 for PPO (log-probs need T)")


@flax.struct.dataclass
class PPOState:
    step: jax.Array  # int32 [], PPO iterations done
    params: dict  # {"policy": {...}, "critic": {...}} trainable
    frozen: dict  # {"policy": {...}, "critic": {...}} the rest of each model
    opt_state: optax.OptState
    beta: jax.Array  # float32 [] KL coefficient
    key: jax.Array  # PRNG key data; every draw comes from a stream of it (ppo_rollout_key, ppo_shuffle_keys)


@flax.struct.dataclass
class Rollout:
    """A scored batch of samples (all [B, ...], sharded over the batch axes)."""

    query_ids: jax.Array  # int32 [B, Q]
    query_mask: jax.Array  # int32 [B, Q]
    response_ids: jax.Array  # int32 [B, R]
    response_mask: jax.Array  # int32 [B, R]: 1 up to and including the stop token
    logprobs: jax.Array  # float32 [B, R] policy, at sampling temperature
    ref_logprobs: jax.Array  # float32 [B, R]
    values: jax.Array  # float32 [B, R]
    scores: jax.Array  # float32 [B] environment score (RM + reward functions + penalty)


def ppo_rollout_key(key: jax.Array, step: int | jax.Array) -> jax.Array:
    """The sampling key of PPO iteration `step` (`key`: the state's key, typed or raw)."""
    return rng.stream_key(key, "ppo_rollout", step)


def ppo_shuffle_keys(key: jax.Array, step: int | jax.Array, num_epochs: int) -> jax.Array:
    """The minibatch-shuffle keys of PPO iteration `step`, one per epoch [E]: a stream apart
    from the rollout's, so no permutation reuses the sampler's bits."""
    return jax.random.split(rng.stream_key(key, "ppo_shuffle", step), num_epochs)


def _full(query_ids, query_mask, response_ids, response_mask):
    return (jnp.concatenate([query_ids, response_ids], 1),
            jnp.concatenate([query_mask, response_mask], 1).astype(jnp.int32))


def response_logprobs_and_hidden(model: Transformer, ids_BT, mask_BT, q: int, temperature: float):
    """Log-probs [B, R] of the real response tokens (logits / T; 0 after the response ends), the
    hidden states that predict them [B, R, D] and the entropies there [B, R]. Logits are made a
    chunk of positions at a time (`sft.selected_token_logprobs`), never as one [B, R, V] array;
    the last layer runs only at the R positions read (`Transformer.hidden_span`)."""
    h_BRD = model.hidden_span(ids_BT, mask_BT, q - 1, ids_BT.shape[1] - 1)  # position t predicts token t + 1
    stats = selected_token_logprobs(model, h_BRD, ids_BT[:, q:], mask_BT[:, q:], temperature=temperature)
    return stats.logp, h_BRD, stats.entropy


def _values(policy: Transformer, critic: Transformer | None, h_BRD, ids_BT, mask_BT, q: int):
    if critic is None:
        return policy.values(h_BRD)
    return critic.values(critic.hidden_span(ids_BT, mask_BT, q - 1, ids_BT.shape[1] - 1))


def _models(defs, params, frozen):
    policy = defs["policy"].merge(params["policy"], frozen["policy"])
    critic = defs["critic"].merge(params["critic"], frozen["critic"]) if "critic" in defs else None
    return policy, critic


def score_rollout(defs: dict, ref_def: ModelDef | None, rm_def: ModelDef | None, hp: PPOHyperparams,
                  state: PPOState, ref_params: dict, rm_params: dict | None, query_ids, query_mask, response_ids,
                  response_mask):
    """Old log-probs, values, reference log-probs and RM scores of a sampled batch; `ref_def`
    None: the reference is the policy with its LoRA adapters off.

    Returns (logprobs [B, R], ref_logprobs [B, R], values [B, R], rm_scores [B] or zeros)."""
    q = query_ids.shape[1]
    ids_BT, mask_BT = _full(query_ids, query_mask, response_ids, response_mask)
    policy, critic = _models(defs, state.params, state.frozen)
    logp, h, _ = response_logprobs_and_hidden(policy, ids_BT, mask_BT, q, hp.temperature)
    values = _values(policy, critic, h, ids_BT, mask_BT, q) if hp.uses_critic else jnp.zeros_like(logp)
    ref = ref_def.merge(ref_params) if ref_def is not None else lora.base_model(policy)  # LoRA: adapters off
    ref_logp, _, _ = response_logprobs_and_hidden(ref, ids_BT, mask_BT, q, hp.temperature)
    if rm_def is not None:
        # The last real token of prompt+response is the stop token (or the last one sampled);
        # an extra stop token (a newline, say) is read as the EOS the RM was trained with.
        rm_ids_BT = rm_input_ids(ids_BT, q, hp.rm_stop_as_eos, hp.eos_id)
        rm_scores = reward_model.scores(rm_def.merge(rm_params), rm_ids_BT, mask_BT)
    else:
        rm_scores = jnp.zeros(ids_BT.shape[0], jnp.float32)
    mask = response_mask.astype(jnp.float32)
    return logp * mask, ref_logp * mask, values * mask, rm_scores


def token_advantages(hp: PPOHyperparams, rollout: Rollout, penalised: core.KLPenalizedRewards, mask):
    """Advantages [B, R] for the policy loss and GAE returns [B, R] (None without a critic).

    GAE's are whitened over the whole batch. RLOO's and GRPO's come from one number per
    sequence, the KL-penalised return Σ_t r_t (as TRL's RLOO) when `kl_in_reward`, else the
    score, grouped k at a time; they are not whitened.
    """
    if hp.uses_critic:
        rewards = penalised.rewards
        if hp.whiten_rewards:
            rewards = core.masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = core.gae(rewards, rollout.values, mask, gamma=hp.gamma, lam=hp.lam)
        return core.masked_whiten(advantages, mask), returns  # over the whole global batch
    seq_B = penalised.rewards.sum(-1) if hp.kl_in_reward else core._float(rollout.scores)
    k = hp.samples_per_prompt
    if hp.advantage == "rloo":
        adv_B = advantages_lib.rloo_advantages(seq_B, k)
    else:
        adv_B = advantages_lib.grpo_advantages(seq_B, k, scale_by_std=hp.grpo_scale_by_std)
    return advantages_lib.sequence_advantages_to_tokens(adv_B, mask), None


def _minibatch_loss(defs, hp: PPOHyperparams, state: PPOState, q: int):
    """loss(params, minibatch, ptx batch or None) -> (loss, stats) of one optimiser step."""

    def loss_fn(params, mb, ptx):
        policy, critic = _models(defs, params, state.frozen)
        logp, h, entropy = response_logprobs_and_hidden(policy, mb["ids"], mb["attn"], q, hp.temperature)
        pg_loss, pg_stats = core.policy_loss(logp, mb["logp"], mb["adv"], mb["mask"], cliprange=hp.cliprange)
        loss = pg_loss
        stats = {"policy_loss": pg_loss, "entropy": core.masked_mean(entropy, mb["mask"]),
                 **pg_stats}
        if hp.uses_critic:
            values = _values(policy, critic, h, mb["ids"], mb["attn"], q)
            vf_loss, vf_stats = core.value_loss(values, mb["values"], mb["ret"], mb["mask"],
                                                cliprange_value=hp.cliprange_value)
            loss = pg_loss + hp.vf_coef * vf_loss
            stats.update(value_loss=vf_loss, **vf_stats)
        if not hp.kl_in_reward:
            kl_loss = advantages_lib.k3_kl_loss(logp, mb["ref_logp"], mb["mask"])
            loss = loss + state.beta * kl_loss
            stats["kl_loss"] = kl_loss
        if ptx is not None:
            nll_sum, n_tok, _ = sft_loss(policy, ptx)
            ptx_loss = nll_sum / jnp.maximum(n_tok, 1.0)
            loss = loss + hp.ptx_coef * ptx_loss
            stats["ptx_loss"] = ptx_loss
        return loss, stats

    return loss_fn


def ppo_update(defs: dict, hp: PPOHyperparams, tx: optax.GradientTransformation, state: PPOState,
               rollout: Rollout, ptx_batch: dict | None = None):
    """Rewards, advantages, then E epochs × M minibatches of the clipped policy loss (+ the value
    loss with a critic); returns (state, metrics).

    `ptx_batch` (PPO-ptx): an SFT batch shaped [E·M, b, T]; minibatch step i adds
    `ptx_coef × NLL` of slice i, mixing pretraining gradients into every PPO step.
    """
    b = rollout.scores.shape[0]
    m = hp.num_minibatches
    mask = rollout.response_mask.astype(jnp.float32)
    q = rollout.query_ids.shape[1]

    penalised = core.compute_rewards(rollout.scores, rollout.logprobs, rollout.ref_logprobs, mask,
                                     state.beta if hp.kl_in_reward else 0.0, kl_estimator=hp.kl_estimator)
    advantages, returns = token_advantages(hp, rollout, penalised, mask)

    ids_BT, mask_BT = _full(rollout.query_ids, rollout.query_mask, rollout.response_ids, rollout.response_mask)
    data = dict(ids=ids_BT, attn=mask_BT, mask=mask, logp=rollout.logprobs, adv=advantages)
    if hp.uses_critic:
        data.update(values=rollout.values, ret=returns)
    if not hp.kl_in_reward:
        data["ref_logp"] = rollout.ref_logprobs
    loss_fn = _minibatch_loss(defs, hp, state, q)

    def minibatch(carry, inputs):
        params, opt_state = carry
        idx, ptx = inputs
        mb = jax.tree.map(lambda x: jnp.take(x, idx, axis=0), data)
        (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mb, ptx)
        updates, opt_state = tx.update(grads, opt_state, params)
        stats["grad_norm"] = optax.global_norm(grads)
        return (optax.apply_updates(params, updates), opt_state), stats

    # A fresh shuffle for every epoch and iteration.
    epoch_keys = ppo_shuffle_keys(state.key, state.step, hp.ppo_epochs)
    perms = jax.vmap(lambda k: jax.random.permutation(k, b))(epoch_keys).reshape(hp.ppo_epochs * m, b // m)
    (params, opt_state), stats = jax.lax.scan(minibatch, (state.params, state.opt_state), (perms, ptx_batch))

    mean_kl = (penalised.kl * mask).sum(-1).mean()
    beta = hp.kl.update(state.beta, mean_kl, b)
    metrics = _metrics(hp, state, rollout, penalised, mask, stats, advantages, returns)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, beta=beta)
    return new_state, metrics


def _metrics(hp: PPOHyperparams, state: PPOState, rollout: Rollout, penalised, mask, stats, advantages, returns):
    m = hp.num_minibatches
    seq_kl_k1 = (penalised.kl_k1 * mask).sum(-1)
    seq_kl_k3 = (penalised.kl_k3 * mask).sum(-1)
    mean_kl = (penalised.kl * mask).sum(-1).mean()
    non_score = (-state.beta * penalised.kl * mask).sum(-1)
    metrics = {k: v.mean() for k, v in stats.items()}
    metrics["approx_kl_last_epoch"] = stats["approx_kl"][-m:].mean()
    metrics["clipfrac_last_epoch"] = stats["clipfrac"][-m:].mean()
    metrics.update({
        "score": rollout.scores.mean(),
        "kl": mean_kl,
        "kl_k1": seq_kl_k1.mean(),
        "kl_k3": seq_kl_k3.mean(),
        "beta": state.beta,
        "non_score_reward": non_score.mean(),
        "total_reward": (non_score + rollout.scores).mean(),
        "response_length": mask.sum(-1).mean(),
    })
    if hp.uses_critic:
        metrics["explained_variance"] = core.explained_variance(rollout.values, returns, mask)
        metrics["returns_mean"] = core.masked_mean(returns, mask)
    else:
        metrics["advantage_abs_mean"] = core.masked_mean(jnp.abs(advantages), mask)
    return metrics
