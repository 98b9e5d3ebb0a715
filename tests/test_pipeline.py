"""Iterated rounds of the RLHF pipeline (mechanics, on a cut-down quickstart)."""

import json
from pathlib import Path

import pytest

from rlhf_jax.config_lib import load_config
from rlhf_jax.feedback import ComparisonStore
from rlhf_jax.pipeline import run_rlhf

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~2 minutes; the default suite covers every stage through the quickstart
def test_two_rounds_collect_label_retrain_and_continue(tmp_path, capsys):
    cfg = load_config(ROOT / "experiments" / "quickstart.py", "rounds=2")
    cfg.mesh.num_devices = 1
    cfg.update_from_flattened_dict({
        "data.num_demos": 64, "data.num_train_prompts": 32, "data.num_eval_prompts": 8,
        "collect.num_prompts": 16, "collect.batch_size": 32, "collect.max_new_tokens": 8, "eval.max_new_tokens": 8,
        "eval.batch_size": 8, "sft.train.num_steps": 4, "sft.train.batch_size": 16, "rm.train.num_epochs": 1,
        "rm.rm.max_responses": 8, "rm.rm.max_pairs": 4, "ppo.ppo.num_updates": 2, "ppo.ppo.batch_size": 16,
        "ppo.sampling.max_new_tokens": 8, "sft.train.progress_bar": False, "rm.train.progress_bar": False,
        "ppo.train.progress_bar": False, "rm.data.eval_fraction": 0.0, "sft.optimizer.warmup_steps": 0,
        "rm.optimizer.warmup_steps": 0,
    })
    summary = run_rlhf(cfg, tmp_path)
    assert {"gold_score_sft", "gold_score_ppo", "rm_eval_accuracy", "ppo_kl_final"} <= set(summary)
    store = ComparisonStore(tmp_path / "comparisons")
    rounds = sorted(item["meta"]["round"] for item in store.items())
    assert rounds == [1] * 16 + [2] * 16 and len(store.labels()) == 32
    # Round 2's RM trains on every comparison so far; its PPO starts from round 1's policy
    # and keeps the KL to the SFT model.
    assert len((tmp_path / "round_2" / "preferences.jsonl").read_text().splitlines()) > \
        len((tmp_path / "round_1" / "preferences.jsonl").read_text().splitlines())
    ppo2 = json.loads((tmp_path / "round_2" / "ppo" / "config.json").read_text())
    assert ppo2["model"]["path"] == str(tmp_path / "round_1" / "ppo" / "model")
    assert ppo2["ppo"]["reference_path"] == str(tmp_path / "sft" / "model")
    items = {i["meta"]["policy"] for i in store.items() if i["meta"]["round"] == 2}
    assert items == {str((tmp_path / "round_1" / "ppo" / "model").resolve())}

    # Restarted on the same workdir, every finished stage is skipped.
    capsys.readouterr()
    again = run_rlhf(cfg, tmp_path)
    out = capsys.readouterr().out
    assert out.count("already done, skipped") == 5
    assert again["gold_score_ppo"] == summary["gold_score_ppo"]
