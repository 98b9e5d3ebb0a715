"""The alignment-tax evaluation: `eval_lm.lm_loss` against a hand computation, PPO-ptx on
pretraining blocks, and the pipeline's recipe (pretrain → SFT → comparisons → RM → PPO and
PPO-ptx) at a tiny size, with the held-out LM loss of every model in its summary."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import eval_lm, sharding
from rlhf_jax.config_lib import load_config
from rlhf_jax.data import load_tokenizer
from rlhf_jax.models import ModelConfig, Transformer, save_pretrained
from rlhf_jax.pipeline import run_rlhf
from rlhf_jax.ppo.trainer import run_ppo
from rlhf_jax.reward_functions import count_substring
from rlhf_jax.train.logging import read_metrics
from rlhf_jax.train.pretrain import corpora

ROOT = Path(__file__).resolve().parents[1]
TEXT = "".join(f"Line {i}: to be or not to be, that is the question.\n" for i in range(60))


def test_lm_loss_matches_a_hand_computation(tmp_path):
    tok = load_tokenizer("byte")
    cfg = ModelConfig(model_type="llama", vocab_size=len(tok), hidden_size=32, num_layers=1, num_heads=4,
                      num_kv_heads=2, head_dim=8, mlp_dim=64, max_position_embeddings=64,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    model = sharding.create_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(1), heads=("lm",)), mesh)
    save_pretrained(model, tmp_path / "model", tokenizer=tok)
    (tmp_path / "text.txt").write_text(TEXT)
    train, _ = corpora(tmp_path / "text.txt", tok, max_length=16)
    batches = eval_lm.text_batches(train, tok, 16, 5)  # the last batch has padding rows
    got = eval_lm.lm_loss(tmp_path / "model", batches)

    ids = np.concatenate([b["input_ids"][b["attention_mask"][:, 0] > 0] for b in batches])  # real rows
    logits = np.asarray(model(ids, np.ones_like(ids)), np.float64)[:, :-1]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    targets = np.take_along_axis(logp, ids[:, 1:, None], -1)
    total, n = -targets.sum(), targets.size
    assert got["tokens"] == n == len(train) * 15
    assert got["loss"] == pytest.approx(total / n, rel=1e-5)
    assert got["perplexity"] == pytest.approx(np.exp(total / n), rel=1e-5)


def test_ppo_ptx_mixes_pretraining_blocks(tmp_path):
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}:"}) + "\n" for i in range(16)))
    (tmp_path / "corpus.txt").write_text(TEXT)
    c = load_config(ROOT / "configs" / "ppo.py")
    c.model.init = "tiny"
    c.model.tiny.update(dict(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64))
    c.update_from_flattened_dict({
        "data.path": str(tmp_path / "prompts.jsonl"), "data.max_prompt_length": 8, "data.max_length": 32,
        "sampling.max_new_tokens": 6, "ppo.batch_size": 8, "ppo.num_minibatches": 2, "ppo.ppo_epochs": 1,
        "ppo.num_updates": 2, "ppo.kl_target": 0.0, "ppo.sample_every": 0, "ppo.ptx_coef": 1.0,
        "ppo.ptx_format": "pretrain", "ppo.ptx_data": str(tmp_path / "corpus.txt"), "ppo.ptx_batch_size": 4,
        "train.progress_bar": False, "train.checkpoint_every": 0, "train.tensorboard": False,
        "mesh.num_devices": 1})
    run_ppo(c, tmp_path / "ppo", reward_functions=[count_substring("a")])
    ptx = [m["ppo/ptx_loss"] for m in read_metrics(tmp_path / "ppo")]
    assert len(ptx) == 2 and all(2.0 < v < 7.0 for v in ptx)  # ≈ ln 259 for an untrained byte model


TINY = dict(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)
SMALL = {  # the quickstart cut to a few steps of tiny models
    "data.num_demos": 64, "data.num_train_prompts": 32, "data.num_eval_prompts": 8, "collect.num_prompts": 16,
    "collect.batch_size": 32, "collect.max_new_tokens": 8, "eval.max_new_tokens": 8, "eval.batch_size": 8,
    "eval.lm_batch_size": 8, "sft.train.num_steps": 2, "sft.train.batch_size": 16, "rm.train.num_epochs": 1,
    "rm.rm.max_responses": 8, "rm.rm.max_pairs": 4, "ppo.ppo.num_updates": 1, "ppo.ppo.batch_size": 16,
    "ppo.sampling.max_new_tokens": 8, "sft.train.progress_bar": False, "rm.train.progress_bar": False,
    "ppo.train.progress_bar": False, "rm.data.eval_fraction": 0.0, "sft.optimizer.warmup_steps": 0,
    "rm.optimizer.warmup_steps": 0, "ptx.batch_size": 4, "sft.data.eval_fraction": 0.2,
}


def _recipe(tmp_path, arg=""):
    """experiments/shakespeare_recipe.py on a 60-line corpus, every model tiny."""
    (tmp_path / "corpus.txt").write_text(TEXT)
    cfg = load_config(ROOT / "experiments" / "shakespeare_recipe.py", arg)
    cfg.mesh.num_devices = 1
    cfg.sft.model.tiny.update(TINY)
    cfg.pretrain.model.tiny.update(TINY)
    cfg.update_from_flattened_dict({
        **SMALL, "pretrain.data.path": str(tmp_path / "corpus.txt"), "pretrain.data.max_length": 32,
        "pretrain.data.eval_fraction": 0.2, "pretrain.train.num_steps": 3, "pretrain.train.batch_size": 8,
        "pretrain.train.eval_every": 0, "pretrain.optimizer.warmup_steps": 0, "pretrain.train.tensorboard": False,
    })
    return cfg


def test_recipe_pretrains_then_reports_the_tax_of_ppo_and_ppo_ptx(tmp_path, capsys):
    run = tmp_path / "run"
    summary = run_rlhf(_recipe(tmp_path), run)
    out = capsys.readouterr().out
    assert "| SFT     |" in out and "| PPO-ptx |" in out  # the gold table's rows, aligned
    tax = summary["alignment_tax"]
    assert list(tax) == ["pretrain", "SFT", "PPO", "PPO-ptx"]
    for row in tax.values():
        assert set(row) == {"text_loss", "text_perplexity", "demo_loss", "demo_perplexity"}
        assert all(np.isfinite(v) for v in row.values())
        assert row["text_perplexity"] == pytest.approx(np.exp(row["text_loss"]))
    assert len({row["text_loss"] for row in tax.values()}) == 4  # four different models
    assert set(summary["gold_scores"]) == {"SFT", "PPO", "PPO-ptx"}
    assert summary["gold_score_ptx"] == summary["gold_scores"]["PPO-ptx"] and summary["kl_to_sft_ptx"] is not None
    # Each stage starts from the last; PPO-ptx from the SFT policy, on the pretraining text.
    config = lambda stage: json.loads((run / stage / "config.json").read_text())  # noqa: E731
    assert config("sft")["model"]["path"] == str(run / "pretrain" / "model")
    assert config("round_1/rm")["model"]["path"] == str(run / "sft" / "model")
    ptx, ppo = config("round_1/ppo_ptx"), config("round_1/ppo")
    assert ptx["model"]["path"] == ppo["model"]["path"] == str(run / "sft" / "model")
    assert ptx["reward"]["rm_path"] == ppo["reward"]["rm_path"] == str(run / "round_1" / "rm" / "model")
    assert (ptx["ppo"]["ptx_coef"], ptx["ppo"]["ptx_format"], ptx["ppo"]["ptx_data"]) == \
        (1.0, "pretrain", str(tmp_path / "corpus.txt"))
    assert ptx["ppo"]["ptx_eval_fraction"] == 0.2 and ppo["ppo"]["ptx_coef"] == 0.0
    assert all(np.isfinite(r["ppo/ptx_loss"]) for r in read_metrics(run / "round_1" / "ppo_ptx"))
    table = (run / "alignment_tax.md").read_text()
    assert "| PPO-ptx | " in table and "held-out pretraining text loss" in table
    assert json.loads((run / "summary.json").read_text())["alignment_tax"] == tax


@pytest.mark.parametrize("algorithm", ["dpo", "best_of_n"])
def test_ptx_is_refused_where_there_is_no_policy_gradient_step(tmp_path, algorithm):
    cfg = load_config(ROOT / "experiments" / "quickstart.py", f"algorithm={algorithm},ptx=0.5")
    with pytest.raises(ValueError, match=rf"ptx.coef=0.5 .* algorithm='{algorithm}'"):
        run_rlhf(cfg, tmp_path)
    assert not (tmp_path / "sft").exists()  # refused before any stage ran


def test_ptx_on_pretraining_text_needs_a_pretrain_stage(tmp_path):
    cfg = load_config(ROOT / "experiments" / "quickstart.py", "ptx=1.0")
    cfg.ptx.format = "pretrain"
    with pytest.raises(ValueError, match="ptx.format='pretrain' .* needs cfg.pretrain"):
        run_rlhf(cfg, tmp_path)
    cfg.ptx.format = "text"
    with pytest.raises(ValueError, match="ptx.format='text' is not one of"):
        run_rlhf(cfg, tmp_path)


@pytest.mark.slow  # ~4 minutes on 2 busy cores: two rounds of RLOO, then a restart
def test_two_round_rloo_recipe_with_ptx_on_demonstrations_in_the_last_round_and_resumes(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = _recipe(tmp_path, "algorithm=rloo")
    cfg.rounds = 2
    cfg.ppo.ppo.batch_size = 8  # 2 prompts × k = 4
    cfg.ptx.format = "sft"  # a fresh draw of the task's demonstrations
    summary = run_rlhf(cfg, run)
    assert list(summary["alignment_tax"]) == ["pretrain", "SFT", "RLOO", "RLOO-ptx"]
    ptx = json.loads((run / "round_2" / "rloo_ptx" / "config.json").read_text())
    assert ptx["model"]["path"] == str(run / "round_1" / "rloo" / "model")  # the last round's start
    assert ptx["ppo"]["advantage"] == "rloo" and ptx["ppo"]["ptx_coef"] == 1.0
    assert (ptx["ppo"]["ptx_format"], ptx["ppo"]["ptx_data"]) == ("sft", str(run / "data" / "ptx_demonstrations.jsonl"))
    fresh = (run / "data" / "ptx_demonstrations.jsonl").read_text().splitlines()
    assert len(fresh) == 64 and fresh != (run / "data" / "demonstrations.jsonl").read_text().splitlines()
    assert all(np.isfinite(r["ppo/ptx_loss"]) for r in read_metrics(run / "round_2" / "rloo_ptx"))
    assert not (run / "round_1" / "rloo_ptx").exists()
    capsys.readouterr()
    again = run_rlhf(cfg, run)
    assert capsys.readouterr().out.count("already done, skipped") == 7  # pretrain, sft, 2 × (rm, rloo), rloo_ptx
    assert again["alignment_tax"] == summary["alignment_tax"]
