"""Setting up the PPO stage: the models (policy, KL reference, reward model, critic), the
prompts, the state, and the three jitted programs of an iteration (generate, score, update)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from rlhf_jax import data as data_lib
from rlhf_jax import optim, reward_functions as reward_functions_lib
from rlhf_jax.models import ModelDef, abstract_def, load_frozen, load_model, lora
from rlhf_jax.ppo.core import KLController
from rlhf_jax.ppo.step import PPOHyperparams, PPOState, Rollout, ppo_update, score_rollout
from rlhf_jax.reward_model import RMScorer
from rlhf_jax.sampling import SamplingConfig, make_generate
from rlhf_jax.train import pretrain as pretrain_lib
from rlhf_jax.train import step as step_lib
from rlhf_jax.train.runtime import Runtime


def _check_untruncated(sampling) -> None:
    """Refuses top-k / top-p: the stage's log-probs, ratios and KL are all under the full
    softmax(logits / T), so rollouts must be drawn from it. (Recomputing them under the
    truncated distribution is ill-posed: a token the sampler kept at the cut can fall outside
    the set the training forward pass keeps, a log-prob of -inf and an infinite KL.)"""
    why = "PPO / RLOO / GRPO sample from the full softmax(logits / T) that their log-probs and KL use"
    if int(sampling.top_k) != 0:
        raise ValueError(f"sampling.top_k={sampling.top_k}: {why}; set sampling.top_k=0")
    if float(sampling.top_p) != 1.0:
        raise ValueError(f"sampling.top_p={sampling.top_p}: {why}; set sampling.top_p=1.0")


def hyperparams(cfg) -> PPOHyperparams:
    _check_untruncated(cfg.sampling)
    p = cfg.ppo
    return PPOHyperparams(
        temperature=float(cfg.sampling.temperature), ppo_epochs=int(p.ppo_epochs),
        num_minibatches=int(p.num_minibatches), cliprange=float(p.cliprange),
        cliprange_value=float(p.cliprange_value), vf_coef=float(p.vf_coef), gamma=float(p.gamma), lam=float(p.lam),
        kl_estimator=p.kl_estimator, whiten_rewards=bool(p.whiten_rewards),
        kl=KLController(init_beta=float(p.init_beta), target=float(p.kl_target) if p.kl_target else None,
                        horizon=float(p.kl_horizon)),
        ptx_coef=float(p.ptx_coef), critic=p.critic, advantage=p.advantage,
        samples_per_prompt=int(p.samples_per_prompt), kl_in_reward=bool(p.kl_in_reward),
        grpo_scale_by_std=bool(p.grpo_scale_by_std))


def _copy(tree):
    """Fresh buffers (the state is donated to the update, the reference must not alias it)."""
    return jax.tree.map(jnp.copy, tree)


@dataclasses.dataclass
class Models:
    """The PPO stage's models as definitions and parameter dicts."""

    defs: dict  # {"policy": ModelDef[, "critic": ModelDef]}
    params: dict  # trainable {"policy": {...}, "critic": {...}}
    frozen: dict  # the rest of each trained model
    tokenizer: Any
    ref_def: ModelDef | None  # None: the policy with its LoRA adapters off
    ref_params: dict
    rm_def: ModelDef | None = None  # an RM scored inside the score program
    rm_params: dict | None = None
    rm_text: RMScorer | None = None  # an RM with its own tokenizer, scored on decoded text


def _reward_model(cfg, rt: Runtime, models: Models) -> None:
    if not cfg.reward.rm_path:
        return
    rm, rm_tokenizer = load_model(cfg.reward.rm_path, heads=("reward",), tokenizer=cfg.reward.rm_tokenizer,
                                  mesh=rt.mesh, rules=rt.rules, require_trained=("reward",),
                                  role="reward.rm_path")
    if cfg.reward.rm_tokenizer:
        # The RM reads text, not the policy's tokens: decode, re-encode as its data was, score.
        # rm_max_length 0: the RM's saved scoring settings (those of its training data).
        models.rm_text = RMScorer((rm, rm_tokenizer), max_length=int(cfg.reward.rm_max_length) or None,
                                  batch_size=int(cfg.ppo.batch_size), settings_from=cfg.reward.rm_path)
        models.rm_params = models.rm_text.params
    else:
        models.rm_def, _, models.rm_params = ModelDef.split(rm, None)


def _critic(cfg, rt: Runtime, models: Models) -> None:
    """A separate critic: the RM's trunk with a value head that starts as its score head (TRL),
    on the reward's scale: the scores in the reward are rm_weight · (gain · raw + bias), so the
    head is `_score_head`, not the raw one; a raw head would start off by the normalisation and
    take |offset| / cliprange_value iterations to catch up, biasing advantages meanwhile."""
    if models.rm_params is None:
        raise ValueError("ppo.critic='separate' is initialised from the RM: set reward.rm_path")
    critic, _ = load_model(cfg.reward.rm_path, heads=("value",), mesh=rt.mesh, rules=rt.rules)
    critic_def, critic_train, critic_rest = ModelDef.split(critic, ".*")
    for name, value in zip(("value_head.kernel", "value_head.bias"),
                           _score_head(models.rm_params, float(cfg.reward.rm_weight))):
        critic_train[name] = jax.device_put(value.astype(critic_train[name].dtype), critic_train[name].sharding)
    models.defs["critic"] = critic_def
    models.params["critic"], models.frozen["critic"] = critic_train, critic_rest


def _score_head(rm_params: dict, rm_weight: float) -> tuple[jax.Array, jax.Array]:
    """The RM's reward head with its normalisation and `rm_weight` folded in: (kernel [D, 1],
    bias [1]) in float32 of a linear head whose output is rm_weight · (gain · raw + bias)."""
    kernel, bias = (rm_params[f"reward_head.{n}"].astype(jnp.float32) for n in ("kernel", "bias"))
    gain, shift = rm_weight * rm_params["reward_gain"], rm_weight * rm_params["reward_bias"]
    return gain * kernel, gain * bias + shift


def load_models(cfg, rt: Runtime, hp: PPOHyperparams) -> Models:
    policy_heads = ("lm", "value") if hp.uses_critic and hp.critic == "shared" else ("lm",)
    policy, tokenizer = load_model(cfg.model, heads=policy_heads, tokenizer=cfg.tokenizer, mesh=rt.mesh,
                                   rules=rt.rules, seed=cfg.seed)
    policy_def, policy_train, policy_rest = lora.split_trainable(policy, cfg.train.trainable)
    # The frozen reference: the initial policy without its value head, or another checkpoint
    # (iterated rounds keep the KL to the SFT model while the policy starts from the last one);
    # with LoRA the initial policy is the policy with its adapters off (ref_def None), whose
    # frozen base arrays the state holds already.
    if cfg.ppo.reference_path:
        ref_def, ref_params, _ = load_frozen(dict(init="pretrained", path=cfg.ppo.reference_path,
                                                  dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype),
                                             heads=("lm",), mesh=rt.mesh, rules=rt.rules)
    elif lora.has_adapters(policy):
        ref_def, ref_params = None, {}
    else:
        ref_def = abstract_def(policy.cfg, ("lm",))
        ref_params = _copy({n: {**policy_train, **policy_rest}[n] for n in ref_def.names})
    models = Models(defs={"policy": policy_def}, params={"policy": policy_train, "critic": {}},
                    frozen={"policy": policy_rest, "critic": {}}, tokenizer=tokenizer, ref_def=ref_def,
                    ref_params=ref_params)
    _reward_model(cfg, rt, models)
    if hp.uses_critic and hp.critic == "separate":
        _critic(cfg, rt, models)
    return models


@dataclasses.dataclass
class PPOSetup:
    """Everything the PPO loop reads: models, data, state and the compiled programs."""

    cfg: Any
    rt: Runtime
    hp: PPOHyperparams
    models: Models
    prompts: data_lib.Dataset
    ptx_data: data_lib.Dataset | pretrain_lib.Corpus | None
    reward_fns: list
    fn_weights: list
    state: PPOState
    generate: Callable = None
    score: Callable = None
    update: Callable = None

    @property
    def steps_per_update(self) -> int:
        return self.hp.ppo_epochs * self.hp.num_minibatches


def _data(cfg, tokenizer, hp: PPOHyperparams):
    prompts = data_lib.prompt_dataset(cfg.data.path, tokenizer, format=cfg.data.format,
                                      max_prompt_length=cfg.data.max_prompt_length, on_bad_row=cfg.data.on_bad_row)
    if hp.ptx_coef <= 0:
        return prompts, None
    if not cfg.ppo.ptx_data:
        raise ValueError("ppo.ptx_coef > 0 needs ppo.ptx_data (an SFT dataset, or text with ppo.ptx_format=pretrain)")
    if cfg.ppo.get("ptx_format", "sft") == "pretrain":  # raw text, packed into blocks
        return prompts, pretrain_lib.corpora(cfg.ppo.ptx_data, tokenizer, max_length=cfg.data.max_length,
                                             eval_fraction=float(cfg.ppo.ptx_eval_fraction),
                                             split_seed=cfg.data.split_seed)[0]
    return prompts, data_lib.sft_dataset(cfg.ppo.ptx_data, tokenizer, max_length=cfg.data.max_length,
                                         on_bad_row=cfg.data.on_bad_row)


def _compile(s: PPOSetup, tx) -> None:
    """The generate, score and update programs, jitted with explicit shardings."""
    m, rt, hp = s.models, s.rt, s.hp
    sampling = SamplingConfig.for_tokenizer(
        m.tokenizer, max_new_tokens=s.cfg.sampling.max_new_tokens, temperature=s.cfg.sampling.temperature,
        extra_stop_token_ids=s.cfg.sampling.extra_stop_token_ids)  # untruncated: `_check_untruncated`
    s.generate = make_generate(m.defs["policy"], rt.mesh, sampling, rules=rt.rules)
    state_sh = jax.tree.map(lambda x: x.sharding, s.state)
    b2, b1 = rt.batch_sharding(2), rt.batch_sharding(1)
    ref_sh = jax.tree.map(lambda x: x.sharding, m.ref_params)
    rm_params = m.rm_params if m.rm_def is not None else None
    rm_sh = jax.tree.map(lambda x: x.sharding, rm_params) if rm_params is not None else None
    defs, ref_def, rm_def = m.defs, m.ref_def, m.rm_def

    def score_fn(st, ref, rmp, query_ids, query_mask, response_ids, response_mask):
        return score_rollout(defs, ref_def, rm_def, hp, st, ref, rmp, query_ids, query_mask, response_ids,
                             response_mask)

    jitted_score = jax.jit(score_fn, in_shardings=(state_sh, ref_sh, rm_sh, b2, b2, b2, b2),
                           out_shardings=(b2, b2, b2, b1))
    s.score = lambda st, *batch: jitted_score(st, m.ref_params, rm_params, *batch)
    rollout_sh = Rollout(query_ids=b2, query_mask=b2, response_ids=b2, response_mask=b2, logprobs=b2,
                         ref_logprobs=b2, values=b2, scores=b1)
    ptx_sh = None
    if s.ptx_data is not None:
        ptx_sh = {k: rt.batch_sharding(3, stacked=True) for k in ("input_ids", "attention_mask", "loss_mask")}
    s.update = jax.jit(lambda st, ro, ptx: ppo_update(defs, hp, tx, st, ro, ptx),
                       in_shardings=(state_sh, rollout_sh, ptx_sh),
                       out_shardings=(state_sh, NamedSharding(rt.mesh, P())), donate_argnums=(0,))


def build(cfg, workdir, reward_functions: Sequence = ()) -> PPOSetup:
    """Loads the models and data of `cfg`, builds the state and compiles the programs."""
    rt = Runtime(cfg, workdir)
    hp = hyperparams(cfg)
    p = cfg.ppo
    if p.batch_size % p.num_minibatches:
        raise ValueError(f"ppo.batch_size={p.batch_size} is not divisible by ppo.num_minibatches={p.num_minibatches}")
    if p.batch_size % hp.samples_per_prompt:
        raise ValueError(f"ppo.batch_size={p.batch_size} (sequences) is not divisible by "
                         f"ppo.samples_per_prompt={hp.samples_per_prompt}")
    models = load_models(cfg, rt, hp)
    eos = models.tokenizer.eos_token_id
    hp = dataclasses.replace(hp, eos_id=int(eos or 0), rm_stop_as_eos=tuple(
        sorted({int(i) for i in cfg.sampling.extra_stop_token_ids} - {eos})) if eos is not None else ())
    fns = [reward_functions_lib.load_reward_function(f) for f in cfg.reward.functions if f] + list(reward_functions)
    weights = list(cfg.reward.function_weights) + [1.0] * (len(fns) - len(cfg.reward.function_weights))
    if models.rm_params is None and not fns:
        raise ValueError("PPO needs a reward: set reward.rm_path and/or reward.functions")
    prompts, ptx_data = _data(cfg, models.tokenizer, hp)
    tx, _ = optim.make_optimizer(cfg.optimizer, int(p.num_updates) * hp.ppo_epochs * hp.num_minibatches)
    state = PPOState(step=step_lib.replicated_scalar(0, jnp.int32, rt.mesh), params=models.params,
                     frozen=models.frozen, opt_state=step_lib.init_opt_state(tx, models.params, rt.mesh),
                     beta=step_lib.replicated_scalar(hp.kl.init_beta, jnp.float32, rt.mesh),
                     key=jax.device_put(jax.random.key_data(jax.random.key(cfg.seed)), NamedSharding(rt.mesh, P())))
    s = PPOSetup(cfg, rt, hp, models, prompts, ptx_data, fns, weights, state)
    _compile(s, tx)
    return s
