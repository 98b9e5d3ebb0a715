"""The RLHF loop on the user's files (`task=''`): an SFT data file, a prompts file, a labeler
that is a Python function or an RM checkpoint, a policy given as a path; the gold scorer
judges the win rate against the SFT policy and the over-optimisation curve."""

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from rlhf_jax.config_lib import load_config
from rlhf_jax.pipeline import _win_rate, run_rlhf
from rlhf_jax.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    "data.num_train_prompts": 0, "data.num_eval_prompts": 8, "collect.num_prompts": 16,
    "collect.batch_size": 32, "collect.max_new_tokens": 8, "eval.max_new_tokens": 8, "eval.batch_size": 8,
    "sft.train.num_steps": 30, "sft.train.batch_size": 16, "sft.optimizer.lr": 3e-3, "rm.train.num_epochs": 1,
    "rm.rm.max_responses": 8, "rm.rm.max_pairs": 4, "ppo.ppo.num_updates": 2, "ppo.ppo.batch_size": 16,
    "ppo.sampling.max_new_tokens": 8, "ppo.train.checkpoint_every": 1, "ppo.train.keep_checkpoints": 10,
    "sft.train.progress_bar": False, "rm.train.progress_bar": False, "ppo.train.progress_bar": False,
    "rm.data.eval_fraction": 0.0, "sft.optimizer.warmup_steps": 0, "rm.optimizer.warmup_steps": 0,
    "best_of_n.n": 2, "labeler.noise": 0.0,
}
PROMPTS = [f"Describe the {noun}:" for noun in ("cat", "dog", "day", "room", "song", "town", "meal", "tree", "lake",
                                                "road", "book", "car", "house", "garden", "river", "friend", "hill",
                                                "bird", "cup", "door", "lamp", "ship", "park", "sky")]
GOLD = textwrap.dedent("""
    from rlhf_jax.tasks import get_task

    TASK = get_task("word_sentiment")

    def kind_words(prompts, responses):
        return [TASK.gold(p, r) for p, r in zip(prompts, responses)]
""")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An SFT file, a prompts file (with a repeat) and a gold function module, as a user has them."""
    d = tmp_path_factory.mktemp("user_files")
    task = get_task("word_sentiment")
    (d / "demos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in task.demonstrations(64, seed=3)))
    prompts = PROMPTS + PROMPTS[:2]  # repeats are dropped
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (d / "user_gold.py").write_text(GOLD)
    return d


def _config(files: Path, **fields):
    cfg = load_config(ROOT / "experiments" / "quickstart.py")
    cfg.mesh.num_devices = 1
    cfg.update_from_flattened_dict(SMALL)
    cfg.task = ""
    cfg.data.sft_path = str(files / "demos.jsonl")
    cfg.data.prompts_path = str(files / "prompts.jsonl")
    cfg.labeler.kind = "function"
    cfg.labeler.function = "user_gold:kind_words"
    cfg.update_from_flattened_dict(fields)
    return cfg


def test_user_files_function_labeler_win_rate_and_overoptimisation(files, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(files))
    cfg = _config(files)
    cfg.eval.overoptimisation = True
    cfg.eval.overoptimisation_ns = (1, 2)
    s = run_rlhf(cfg, tmp_path / "run")
    run = tmp_path / "run"
    assert s["task"] is None and s["gold"] == "user_gold:kind_words"
    # 24 distinct prompts: the last 8 held out, the rest trained on (16 collected, 2 responses each)
    train = [json.loads(line)["prompt"] for line in (run / "data" / "prompts.jsonl").read_text().splitlines()]
    assert train == PROMPTS[:16] and s["comparisons"] == 16 and s["labels"] == 16
    assert json.loads((run / "sft" / "config.json").read_text())["data"]["path"] == cfg.data.sft_path
    assert s["gold_score_sft"] is not None and s["gold_score_policy"] is not None
    assert 0.0 <= s["win_rate_vs_sft"] <= 1.0 and s["win_rate_n"] == 8
    lo, hi = s["win_rate_ci"]
    assert lo <= s["win_rate_vs_sft"] <= hi
    over = json.loads((run / "overoptimisation" / "summary.json").read_text())
    assert [p["step"] for p in over["rl"]] == [0, 1, 2] and [p["n"] for p in over["best_of_n"]] == [1, 2]
    assert over["rl"][0]["kl"] == 0.0 and (run / "overoptimisation" / "overoptimisation.png").exists()
    assert s["overoptimisation_plot"] == over["plot"]

    # The trained RM as the labeler and the gold, the SFT model given as the policy (no SFT stage).
    cfg2 = _config(files, **{"data.sft_path": "", "policy_path": str(run / "sft" / "model"),
                             "labeler.kind": "rm", "labeler.rm_path": str(run / "round_1" / "rm" / "model"),
                             "algorithm": "best_of_n"})
    s2 = run_rlhf(cfg2, tmp_path / "run2")
    assert not (tmp_path / "run2" / "sft").exists() and s2["gold"] == cfg2.labeler.rm_path
    assert s2["labels"] == 16 and s2["gold_score_policy"] is not None and "win_rate_vs_sft" in s2
    assert s2["alignment_tax"] == {}  # no demonstrations, no pretrain text: nothing held out to measure


def test_a_policy_against_itself_wins_half_the_time():
    scores = np.array([0.1, -0.3, 0.7, 0.2])
    w = _win_rate(scores, scores)
    assert w["win_rate_vs_sft"] == 0.5 and w["win_rate_n"] == 4 and w["win_rate_ci"][0] < 0.5 < w["win_rate_ci"][1]


@pytest.mark.parametrize("fields, message", [
    ({"data.prompts_path": ""}, "set data.prompts_path"),
    ({"labeler.kind": "gold"}, "task='' has none"),
    ({"labeler.function": ""}, "needs labeler.function"),
    ({"labeler.kind": "rm"}, "needs labeler.rm_path"),
    ({"data.sft_path": ""}, "no SFT data"),
    ({"labeler.kind": "rm", "labeler.rm_path": "no/such/rm"}, "labeler.rm_path='no/such/rm': no config.json"),
    ({"labeler.function": "no_such_module:score"}, "labeler.function='no_such_module:score': .*cannot be imported"),
    ({"labeler.function": "user_gold:no_such_function"}, "labeler.function='user_gold:no_such_function'"),
    ({"policy_path": "no/such/model.gguf"}, "policy_path='no/such/model.gguf': no such .gguf file"),
])
def test_user_mistakes_are_named_before_any_stage_runs(files, tmp_path, monkeypatch, fields, message):
    monkeypatch.syspath_prepend(str(files))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run_rlhf(_config(files, **fields), tmp_path)
    assert not (tmp_path / "sft").exists()


def test_holding_out_every_prompt_is_refused(files, tmp_path):
    """Prompts are rendered with the SFT policy's tokenizer, so this one is found after SFT."""
    with pytest.raises(ValueError, match="data.num_eval_prompts=24: .* has 24 distinct prompts"):
        run_rlhf(_config(files, **{"data.num_eval_prompts": 24, "sft.train.num_steps": 1}), tmp_path)
