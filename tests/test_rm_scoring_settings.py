"""An RM's scoring settings travel with it: the RM stage saves its training truncation and
layout in `model/rlhf_jax.json`, and `RMScorer`, `RMLabeler` and PPO's RM with its own
tokenizer use them unless told otherwise (a given value wins, and a difference is logged once).
"""

import json
import logging
import types
from pathlib import Path

import pytest
from test_train_loop import data_dir, tiny_config  # noqa: F401  (data_dir is a fixture)

from rlhf_jax.config_lib import load_config
from rlhf_jax.feedback.rm_labeler import RMLabeler
from rlhf_jax.models import save_pretrained
from rlhf_jax.ppo.setup import Models, _reward_model
from rlhf_jax.reward_model import FALLBACK_MAX_LENGTH, RMScorer
from rlhf_jax.train.loop import run

ROOT = Path(__file__).resolve().parents[1]
MAX_LENGTH, MAX_PROMPT_LENGTH = 24, 10  # neither is a default anywhere
FAST = {"train.checkpoint_every": 0, "train.eval_every": 0, "train.tensorboard": False, "data.eval_fraction": 0.0,
        "train.num_steps": 1, "optimizer.warmup_steps": 0, "model.tiny.num_layers": 1}
LONG = ("say something about the weather today:", " it is sunny and warm with a light breeze from the west")


@pytest.fixture(scope="module")
def rm_dir(data_dir, tmp_path_factory):  # noqa: F811
    workdir = tmp_path_factory.mktemp("rm")
    run(tiny_config("rm", data_dir / "pref.jsonl", **FAST, **{"data.max_length": MAX_LENGTH,
                                                             "data.max_prompt_length": MAX_PROMPT_LENGTH}), workdir)
    return workdir / "model"


@pytest.fixture(scope="module")
def scorer(rm_dir, mesh):
    """An RMScorer told nothing but the directory."""
    return RMScorer(rm_dir, mesh=mesh, batch_size=2)


def test_rm_stage_saves_its_scoring_settings(rm_dir):
    meta = json.loads((rm_dir / "rlhf_jax.json").read_text())
    assert meta["scoring"] == {"max_length": MAX_LENGTH, "max_prompt_length": MAX_PROMPT_LENGTH, "add_bos": True,
                               "format": "explicit"}


def test_scorer_uses_the_saved_settings_without_being_told(scorer):
    assert (scorer.max_length, scorer.max_prompt_length) == (MAX_LENGTH, MAX_PROMPT_LENGTH)
    tok = scorer.tokenizer
    prompt, response = LONG[0], " sunny"
    ids = scorer.encode([(prompt, response)])[0].tolist()
    # [BOS] + the prompt's last MAX_PROMPT_LENGTH - 1 tokens + the whole response + [EOS].
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tok(response, add_special_tokens=False)["input_ids"]
    assert ids == [tok.bos_token_id] + p_ids[-(MAX_PROMPT_LENGTH - 1):] + r_ids + [tok.eos_token_id]
    assert len(scorer.encode([LONG])[0]) == MAX_LENGTH


def test_a_given_value_wins_and_a_mismatch_is_logged_once(scorer, rm_dir, caplog):
    pair = (scorer.model_def.merge(scorer.params), scorer.tokenizer)
    with caplog.at_level(logging.WARNING, logger="rlhf_jax.reward_model"):
        wider = RMScorer(pair, max_length=40, max_prompt_length=0, settings_from=rm_dir)
        again = RMScorer(pair, max_length=40, max_prompt_length=0, settings_from=rm_dir)
    assert (wider.max_length, wider.max_prompt_length) == (again.max_length, again.max_prompt_length) == (40, None)
    assert len(wider.encode([LONG])[0]) == 40
    messages = [r.getMessage() for r in caplog.records]
    assert sum("max_length=40 given, but the RM was trained with max_length=24" in m for m in messages) == 1
    assert sum("max_prompt_length=None given, but the RM was trained with max_prompt_length=10" in m
               for m in messages) == 1
    # The same value as saved is not a mismatch; a pair alone has no settings: the fallback.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rlhf_jax.reward_model"):
        same = RMScorer(pair, max_length=MAX_LENGTH, settings_from=rm_dir)
    assert not caplog.records and same.max_prompt_length == MAX_PROMPT_LENGTH
    alone = RMScorer(pair)
    assert (alone.max_length, alone.max_prompt_length) == (FALLBACK_MAX_LENGTH, None)


def test_an_rm_saved_without_settings_falls_back_with_a_warning(scorer, tmp_path, caplog):
    pair = (scorer.model_def.merge(scorer.params), scorer.tokenizer)
    old = save_pretrained(pair[0], tmp_path / "old_rm", tokenizer=pair[1])  # no scoring=...
    with caplog.at_level(logging.WARNING, logger="rlhf_jax.reward_model"):
        fallback = RMScorer(pair, settings_from=old)
    assert (fallback.max_length, fallback.max_prompt_length) == (FALLBACK_MAX_LENGTH, None)
    assert "no scoring settings saved with the RM" in caplog.text


def test_rm_labeler_and_ppo_score_with_the_saved_settings(rm_dir, mesh):
    labeler = RMLabeler(rm_dir, mesh=mesh, batch_size=2)
    assert (labeler.scorer.max_length, labeler.scorer.max_prompt_length) == (MAX_LENGTH, MAX_PROMPT_LENGTH)

    # PPO with an RM that reads text with its own tokenizer, configs/ppo.py's defaults.
    cfg = load_config(ROOT / "configs" / "ppo.py")
    cfg.reward.rm_path = cfg.reward.rm_tokenizer = str(rm_dir)
    cfg.ppo.batch_size = 2
    models = Models(defs={}, params={}, frozen={}, tokenizer=None, ref_def=None, ref_params={})
    _reward_model(cfg, types.SimpleNamespace(mesh=mesh, rules=None), models)
    assert (models.rm_text.max_length, models.rm_text.max_prompt_length) == (MAX_LENGTH, MAX_PROMPT_LENGTH)
