"""Config files: every file under configs/ and experiments/ loads (each variant, by our loader and
by the CLI's), `parse_arg` types values and names bad ones, experiments compose the stage files."""

import inspect
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from rlhf_jax.config_lib import import_config_module, load_config, parse_arg

ROOT = Path(__file__).resolve().parents[1]

CONFIG_FILES = sorted([*ROOT.glob("configs/*.py"), *ROOT.glob("experiments/*.py")])
VARIANTS = {"configs/sft.py": ["smollm2", "variant=tiny"], "configs/rm.py": ["smollm2"],
            "configs/dpo.py": ["smollm2"], "configs/pretrain.py": ["smollm2"], "configs/rloo.py": ["k=8"],
            "configs/grpo.py": ["k=4,scale_by_std=false"],
            "experiments/quickstart.py": ["rounds=2", "2", "algorithm=rloo", "algorithm=grpo,rounds=2",
                                          "algorithm=best_of_n", "ptx=1.0"],
            "experiments/shakespeare_recipe.py": ["ptx=0.5", "algorithm=rloo"],
            "experiments/algorithms.py": ["algorithms=ppo+best_of_n,rounds=2"],
            "configs/eval.py": ["win_rate", "policy_stats", "best_of_n", "mc", "kind=overoptimisation"]}
STAGES = {"configs/common.py": "sft", "configs/sft.py": "sft", "configs/rm.py": "rm", "configs/dpo.py": "dpo",
          "configs/ppo.py": "ppo", "configs/rloo.py": "ppo", "configs/grpo.py": "ppo", "configs/pretrain.py": "pretrain",
          "experiments/quickstart.py": "rlhf", "experiments/algorithms.py": "algorithms",
          "experiments/shakespeare_recipe.py": "rlhf", "experiments/sft_smollm2.py": "sft",
          "experiments/rm_hh_smollm2.py": "rm", "experiments/hh_loop_smollm2.py": "rlhf", "configs/eval.py": "eval"}


def _name(path):
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=_name)
def test_every_config_file_loads_with_each_variant(path):
    module = import_config_module(path)
    assert str(inspect.signature(module.get_config)) == "(arg=None)"
    assert module.__doc__, "a config file's docstring gives its command"
    for arg in [None, "", *VARIANTS.get(_name(path), [])]:
        cfg = load_config(path, arg)
        assert cfg.stage == STAGES[_name(path)]
    with pytest.raises(ValueError, match="no_such_option"):
        load_config(path, "no_such_option=1")


def test_the_cli_loader_composes_relative_to_the_file(monkeypatch):
    """ml_collections loads `--config experiments/quickstart.py:rounds=2` from the repo root; the
    stage files it loads are found relative to the experiment file, not to the current directory."""
    monkeypatch.chdir(ROOT)
    argv = ["main", "--config=experiments/quickstart.py:rounds=2", "--config.ppo.ppo.num_updates=2"]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv)
    flag_values(argv)
    cfg = flag_values.config
    assert cfg.rounds == 2 and cfg.ppo.stage == "ppo" and cfg.ppo.ppo.num_updates == 2 and cfg.is_locked
    expected = load_config(ROOT / "experiments" / "quickstart.py", "rounds=2")
    expected.ppo.ppo.num_updates = 2
    assert cfg.to_dict() == expected.to_dict()


def test_parse_arg_types_values_from_the_defaults():
    spec = dict(variant="tiny", rounds=1, lr=1e-3, fast=False)
    assert parse_arg(None, **spec).to_dict() == spec
    assert parse_arg("", **spec).to_dict() == spec
    a = parse_arg("smollm2,rounds=3, lr=2e-5,fast=True", **spec)
    assert (a.variant, a.rounds, a.lr, a.fast) == ("smollm2", 3, 2e-5, True)
    assert type(a.rounds) is int and type(a.lr) is float and type(a.fast) is bool
    assert parse_arg("fast=false", **spec).fast is False and parse_arg("fast=1", **spec).fast is True
    assert parse_arg("lr=3", **spec).lr == 3.0 and type(parse_arg("lr=3", **spec).lr) is float
    assert parse_arg("variant=a=b", **spec).variant == "a=b"
    assert parse_arg(None).to_dict() == {}


@pytest.mark.parametrize("arg, message", [
    ("steps=3", r"unknown config argument 'steps'.*options: variant, rounds, fast"),
    ("rounds=two", r"rounds='two'.*not a int"),
    ("rounds=2.5", r"rounds='2.5'"),
    ("fast=maybe", r"fast='maybe'"),
    ("rounds=2,rounds=3", r"'rounds' is given twice"),
    ("rounds=2,smollm2", r"'smollm2'.*is not key=value"),
])
def test_parse_arg_names_the_bad_key_or_value(arg, message):
    with pytest.raises(ValueError, match=message):
        parse_arg(arg, variant="tiny", rounds=1, fast=False)


def test_parse_arg_rejects_arguments_where_there_are_no_options():
    with pytest.raises(ValueError, match=r"unknown config argument 'smollm2'.*options: none"):
        parse_arg("smollm2=1")
    with pytest.raises(ValueError, match=r"'smollm2'.*is not key=value.*options: none"):
        parse_arg("smollm2")
    with pytest.raises(TypeError, match="default of 'path'"):
        parse_arg(None, path=None)


def test_unknown_variant_is_an_error():
    with pytest.raises(ValueError, match="unknown variant 'small'.*tiny, smollm2"):
        load_config(ROOT / "configs" / "sft.py", "small")


def test_experiments_equal_the_stage_variants_they_compose():
    for experiment, stage in (("sft_smollm2.py", "sft.py:smollm2"), ("rm_hh_smollm2.py", "rm.py:smollm2")):
        path, variant = stage.split(":")
        assert load_config(ROOT / "experiments" / experiment).to_dict() == \
            load_config(ROOT / "configs" / path, variant).to_dict()


def test_quickstart_composes_the_stage_configs():
    qs = load_config(ROOT / "experiments" / "quickstart.py")
    assert qs.rounds == 1 and load_config(ROOT / "experiments" / "quickstart.py", "rounds=2").rounds == 2
    for name in ("sft", "rm", "ppo"):
        stage = load_config(ROOT / "configs" / f"{name}.py")
        assert qs[name].stage == name
        assert qs[name].data.path == ""  # set by the pipeline: the task's data, the round's comparisons
        assert set(qs[name].keys()) == set(stage.keys())  # the same fields as the stage file
        assert qs[name].optimizer.eps == stage.optimizer.eps  # untouched fields keep the stage's value
    assert qs.sft.tokenizer == "byte" and qs.sft.model.tiny.mlp_dim == 192 and qs.sft.train.num_steps == 400
    assert qs.rm.data.on_bad_row == "skip" and qs.rm.rm.max_pairs == 32 and qs.rm.train.num_epochs == 4
    assert qs.ppo.ppo.num_updates == 40 and qs.ppo.ppo.kl_target == 0.0 and qs.ppo.optimizer.lr == 1e-3


def test_shakespeare_recipe_is_the_quickstart_after_a_pretrain_stage_with_ptx_on_its_text():
    recipe = load_config(ROOT / "experiments" / "shakespeare_recipe.py")
    qs = load_config(ROOT / "experiments" / "quickstart.py", "ptx=1.0")
    pretrain = load_config(ROOT / "configs" / "pretrain.py")  # stage 0 as configs/pretrain.py runs it
    for part in ("model", "optimizer"):
        assert recipe.pretrain[part].to_dict() == pretrain[part].to_dict()
    assert recipe.pretrain.train.num_steps == pretrain.train.num_steps and recipe.pretrain.stage == "pretrain"
    assert Path(recipe.pretrain.data.path) == ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
    assert (recipe.ptx.coef, recipe.ptx.format, qs.ptx.format, qs.ptx.coef) == (1.0, "pretrain", "sft", 1.0)
    assert recipe.ppo.to_dict() == qs.ppo.to_dict() and recipe.rm.to_dict() == qs.rm.to_dict()
    assert load_config(ROOT / "experiments" / "shakespeare_recipe.py", "ptx=0.5").ptx.coef == 0.5
    assert load_config(ROOT / "experiments" / "quickstart.py").ptx.coef == 0.0  # no PPO-ptx run by default
    with pytest.raises(ValueError, match="algorithm='dpo' is not one of ppo, rloo, grpo"):
        load_config(ROOT / "experiments" / "shakespeare_recipe.py", "algorithm=dpo")
