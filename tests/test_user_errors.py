"""A user's mistake ends in one line naming the field or file and a non-zero exit, never a
wall of tracebacks or silent garbage (--debug shows the traceback)."""

import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from rlhf_jax import data as data_lib
from rlhf_jax import optim, sharding
from rlhf_jax.models import load_model, save_pretrained

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "rlhf_jax.main", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("override, needle", [
    ("--config.nope=1", "no such config field 'nope'"),
    ("--config.data.path=/no/such/file.json", "/no/such/file.json"),
])
def test_cli_mistakes_print_one_line(tmp_path, override, needle):
    out = _cli("--config", "configs/sft.py", "--workdir", str(tmp_path), override)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_a_malformed_jsonl_line_is_one_line_naming_the_file_and_line(tmp_path):
    bad = tmp_path / "prefs.jsonl"
    bad.write_text('{"prompt": "a", "chosen": " b", "rejected": " c"}\n{"prompt": "d", "chosen": " e",\n')
    out = _cli("--config", "configs/rm.py", "--workdir", str(tmp_path / "run"), f"--config.data.path={bad}")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: line 2: not valid JSON"), out.stderr[-2000:]


def test_debug_shows_the_traceback(tmp_path):
    out = _cli("--config", "configs/sft.py", "--workdir", str(tmp_path), "--config.nope=1", "--debug")
    assert out.returncode != 0 and "Traceback" in out.stderr


@pytest.mark.parametrize("field, value", [("lr", -1.0), ("eps", 0.0), ("b2", 1.0), ("weight_decay", -0.1)])
def test_optimizer_fields_are_validated(field, value):
    cfg = ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=0, decay="linear", final_lr_fraction=0.0, b1=0.9,
                                         b2=0.999, eps=1e-8, weight_decay=0.0, max_grad_norm=1.0))
    cfg[field] = value
    with pytest.raises(ValueError, match=f"optimizer.{field}="):
        optim.make_optimizer(cfg, 10)


def test_an_lm_is_refused_as_reward_model(tmp_path):
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    spec = dict(init="tiny", path="", dtype="float32", param_dtype="float32",
                tiny=dict(model_type="llama", hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                          mlp_dim=64, max_position_embeddings=64))
    lm, tok = load_model(spec, heads=("lm",), mesh=mesh)
    save_pretrained(lm, tmp_path / "lm", tokenizer=tok)
    with pytest.raises(ValueError, match="reward.rm_path .* has no trained reward head"):
        load_model(str(tmp_path / "lm"), heads=("reward",), mesh=mesh, require_trained=("reward",),
                   role="reward.rm_path")
    # Creating an RM from an LM (the RM stage) is still allowed: the head starts fresh.
    rm, _ = load_model(str(tmp_path / "lm"), heads=("reward",), mesh=mesh)
    ids = np.array([[5, 6, 7, 8]], np.int32)
    mask = np.ones_like(ids)
    np.testing.assert_array_equal(np.asarray(lm(ids, attention_mask=mask)), np.asarray(lm(ids, mask)))
    assert rm.heads == ("reward",)


def test_a_missing_template_package_is_not_blamed_on_the_row(monkeypatch):
    tok = data_lib.load_tokenizer("byte")

    def no_jinja(*args, **kwargs):
        raise ImportError("apply_chat_template requires jinja2 to be installed")

    monkeypatch.setattr(tok, "apply_chat_template", no_jinja)
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    with pytest.raises(ImportError, match="jinja2"):
        data_lib.sft_dataset(rows, tok, max_length=32)
