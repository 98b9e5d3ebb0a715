"""`algorithm` picks the pipeline's policy step: RLOO, GRPO and best-of-n rounds on a cut-down
quickstart, sharing one workdir (the SFT model, comparisons and RM are made once)."""

from pathlib import Path

import pytest

from rlhf_jax.config_lib import load_config
from rlhf_jax.pipeline import run_rlhf

ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    "data.num_demos": 64, "data.num_train_prompts": 32, "data.num_eval_prompts": 8, "collect.num_prompts": 16,
    "collect.batch_size": 32, "collect.max_new_tokens": 8, "eval.max_new_tokens": 8, "eval.batch_size": 8,
    "sft.train.num_steps": 4, "sft.train.batch_size": 16, "rm.train.num_epochs": 1, "rm.rm.max_responses": 8,
    "rm.rm.max_pairs": 4, "ppo.ppo.num_updates": 2, "ppo.ppo.batch_size": 16, "ppo.sampling.max_new_tokens": 8,
    "sft.train.progress_bar": False, "rm.train.progress_bar": False, "ppo.train.progress_bar": False,
    "rm.data.eval_fraction": 0.0, "sft.optimizer.warmup_steps": 0, "rm.optimizer.warmup_steps": 0,
    "best_of_n.n": 3,
}


def _config(algorithm):
    cfg = load_config(ROOT / "experiments" / "quickstart.py", f"algorithm={algorithm}")
    cfg.mesh.num_devices = 1
    cfg.update_from_flattened_dict(SMALL)
    return cfg


@pytest.mark.slow  # ~2 minutes on a busy 2-core machine
def test_rloo_grpo_and_best_of_n_rounds(tmp_path):
    rloo = run_rlhf(_config("rloo"), tmp_path)
    assert rloo["algorithm"] == "rloo" and rloo["kl_to_sft"] is not None and rloo["policy_seconds"] > 0
    assert (tmp_path / "round_1" / "rloo" / "model" / "model.safetensors").exists()
    grpo = run_rlhf(_config("grpo"), tmp_path)  # reuses the SFT model, the comparisons and the RM
    assert grpo["gold_score_sft"] == rloo["gold_score_sft"] and "gold_score_grpo" in grpo
    bon = run_rlhf(_config("best_of_n"), tmp_path)
    assert bon["best_of_n/n"] == 3 and bon["kl_to_sft"] == pytest.approx(1.0986122886681098 - 2 / 3)
    assert 0 <= bon["kl_to_sft_plugin"] <= bon["kl_to_sft"] + 1e-9
    assert not (tmp_path / "round_1" / "best_of_n").exists()
    for alg in ("rloo", "grpo", "best_of_n"):
        assert (tmp_path / f"summary_{alg}.json").exists()


def test_dpo_rounds_train_on_the_comparisons(tmp_path):
    cfg = _config("dpo")
    cfg.update_from_flattened_dict({"dpo.train.num_steps": 2, "dpo.optimizer.warmup_steps": 0,
                                    "dpo.train.eval_every": 0, "dpo.data.eval_fraction": 0.0,
                                    "dpo.train.progress_bar": False, "dpo.dpo.max_responses": 8,
                                    "dpo.dpo.max_pairs": 4, "dpo.data.max_length": 64})
    summary = run_rlhf(cfg, tmp_path)
    assert summary["algorithm"] == "dpo"
    tax = summary["alignment_tax"]  # no pretrain stage: the held-out demonstrations only
    assert list(tax) == ["SFT", "DPO"] and set(tax["DPO"]) == {"demo_loss", "demo_perplexity"}
    assert tax["DPO"]["demo_loss"] != tax["SFT"]["demo_loss"]
    assert (tmp_path / "round_1" / "dpo" / "model" / "model.safetensors").exists()
    assert not (tmp_path / "round_1" / "rm").exists()  # online DPO trains on the comparisons, no RM


def test_the_comparison_has_one_summary_and_one_seed(tmp_path):
    """experiments/algorithms.py's seed is every run's, and its summary.json names each number's
    algorithm (what a sweep over seeds gathers)."""
    import json

    from rlhf_jax.pipeline import run_algorithms

    cfg = load_config(ROOT / "experiments" / "algorithms.py", "algorithms=best_of_n")
    cfg.seed = 3
    cfg.runs.best_of_n.mesh.num_devices = 1
    cfg.runs.best_of_n.update_from_flattened_dict(SMALL)
    rows = run_algorithms(cfg, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["algorithms"] == ["best_of_n"] and summary["gold_score_sft"] == rows[0]["gold_score_sft"]
    assert summary["best_of_n/gold_score_policy"] == rows[0]["gold_score_policy"]
    assert summary["best_of_n/kl_to_sft"] == rows[0]["kl_to_sft"] and "best_of_n/win_rate_vs_sft" in summary
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 3
