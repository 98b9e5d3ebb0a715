"""benchmarks/side_by_side.py without running a benchmark: its FLOP counts against the real
models' parameter counts, its --ours-set parsing, and its table layout."""

import importlib
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sbs():
    # benchmarks/_common.py appends a thread flag to XLA_FLAGS at import: keep the tests' own.
    saved = os.environ.get("XLA_FLAGS")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        yield importlib.import_module("side_by_side")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
        if saved is not None:
            os.environ["XLA_FLAGS"] = saved


def test_forward_and_train_flops(sbs):
    shape = sbs.Shape(trunk=1000, lm_head=500, layers=2, d_attn=8)
    got = sbs.forward_flops(shape.lm, shape, [3, 5])
    assert got == 2 * 1500 * 3 + 4 * 2 * 8 * 9 + 2 * 1500 * 5 + 4 * 2 * 8 * 25
    assert sbs.train_flops(shape.lm, shape, [3, 5]) == 3 * got
    # SFT / DPO: the head only at the 4 positions a loss reads, the trunk at all 8 tokens.
    assert sbs.lm_train_flops(shape, [3, 5], reads=4) == 3 * (got - 2 * 500 * 8 + 2 * 500 * 4)
    assert sbs.mean_reads([4.0, None, 6.0]) == 5.0 and sbs.mean_reads([None, None]) == 0.0  # RM steps: None
    ppo = sbs.ppo_flops(shape, [4], epochs=4)
    rm = sbs.forward_flops(1001, shape, [4])
    assert ppo["generation"] == sbs.forward_flops(1500, shape, [4])
    assert ppo["scoring"] == ppo["generation"] + 2 * rm
    assert ppo["optimisation"] == 4 * 3 * (ppo["generation"] + rm)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_model_shape_counts_matmul_parameters(sbs, arch):
    import transformers
    config = sbs.hf_config(arch, hidden=128, layers=2, max_positions=64)
    config.vocab_size, config.pad_token_id = 300, 0
    model = transformers.AutoModelForCausalLM.from_config(config)
    shape = sbs.model_shape(model)
    total = sum(p.numel() for p in model.parameters())  # tied GPT-2 counts its table once
    embeddings = 300 * 128 + (64 * 128 if arch == "gpt2" else 0)
    head = 0 if arch == "gpt2" else 300 * 128
    assert shape.trunk == total - embeddings - head
    assert (shape.lm_head, shape.layers, shape.d_attn) == (300 * 128, 2, 128)


def test_scale_shape_matches_our_model(sbs):
    from flax import nnx

    from rlhf_jax.models import ModelConfig, ModelDef, Transformer
    hidden = 128
    cfg = ModelConfig(vocab_size=sbs.VOCAB, model_type="llama", hidden_size=hidden, num_layers=4, num_heads=2,
                      num_kv_heads=1, head_dim=64, mlp_dim=4 * hidden, tie_embeddings=False,
                      max_position_embeddings=256)
    _, params, rest = ModelDef.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), heads=("lm",))))
    sizes = {k: math.prod(v.shape) for k, v in {**params, **rest}.items()}
    shape = sbs.scale_shape(hidden, 256)
    assert shape.trunk == sum(v for k, v in sizes.items() if k not in ("embed", "lm_head.kernel"))
    assert shape.lm_head == sizes["lm_head.kernel"]


def test_ours_set_parsing_and_routing(sbs):
    overrides = sbs.split_overrides(["model.dtype=bfloat16", "sft:data.max_length=512", "train.remat=true"])
    assert overrides == [(None, "model.dtype", "bfloat16"), ("sft", "data.max_length", 512),
                         (None, "train.remat", True)]
    opts = dict(warmup=1, steps=1, new_tokens=8, hidden=256, seq_len=256, tokens_per_step=2048)
    sft, rm = sbs.our_config("sft", Path("m"), opts), sbs.our_config("rm", Path("m"), opts)
    assert sbs.apply_overrides(sft, "sft", overrides[:2]) == ["model.dtype='bfloat16'", "data.max_length=512"]
    assert sbs.apply_overrides(rm, "rm", overrides[:2]) == ["model.dtype='bfloat16'"]
    assert (sft.data.max_length, rm.data.max_length, rm.model.dtype) == (512, 256, "bfloat16")
    with pytest.raises(ValueError, match="no workload config has this field"):
        sbs.check_overrides(overrides[2:], {"sft": sft, "rm": rm})
    with pytest.raises(ValueError, match="the rm config has no field data.nope"):
        sbs.apply_overrides(rm, "rm", sbs.split_overrides(["rm:data.nope=1"]))
    with pytest.raises(ValueError, match="expected key=value"):
        sbs.split_overrides(["model.dtype"])


def test_tables(sbs):
    side = dict(rate=200.0, flops=2e10, first_s=16.1, rss_mib=2900.0)
    rows = [dict(model="m", peak=8e10, sides={"ours": side, "trl": dict(side, rate=400.0, flops=4e10),
                                               "torch": dict(side, rate=100.0, flops=1e10)})]
    table = sbs.training_table("SFT", "tok/s", rows, ("ours", "trl", "torch")).splitlines()
    assert table[2].startswith("| model | ours tok/s | TRL tok/s | PyTorch loop tok/s | ours / TRL |")
    cells = [c.strip() for c in table[4].strip("|").split("|")]
    assert cells[:9] == ["m", "200", "400", "100", "0.50×", "2.00×", "20.00 (25.0%)", "40.00 (50.0%)",
                         "10.00 (12.5%)"]
    assert len(cells) == len(table[2].strip("|").split("|"))
    summary = sbs.summarize_steps([dict(times=[5.0, 2.0, 4.0], units=[9.0, 8.0, 8.0], rows=[[9], [8], [8]],
                                        rss_mib=1.0)], warmup=1)
    assert (summary["step_s"], summary["rate"], summary["first_s"], summary["rows"]) == (3.0, 3.0, 5.0, [[8], [8]])
    assert np.isclose(sbs.summarize_steps([dict(times=[1.0, 2.0], new_tokens=64, rss_mib=1.0)], 1)["rate"], 32.0)


def test_sequence_lengths_count_each_packed_sequence(sbs):
    mask = np.array([[[0, 1, 1, 1], [1, 1, 0, 0]]])
    assert sbs._sequence_lengths({"attention_mask": mask}) == [3, 2]
    seg = np.array([[[1, 1, 2, 0], [1, 2, 2, 3]]])
    assert sbs._sequence_lengths({"attention_mask": (seg > 0).astype(int), "segment_ids": seg}) == [2, 1, 1, 2, 1]


def test_a_run_of_some_workloads_rewrites_only_their_tables(sbs, tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    sbs.write_tables(out, {"sft": "SFT table 1", "rm": "RM table 1"}, "cmd 1", "machine 1")
    sbs.write_tables(out, {"rm": "RM table 2"}, "cmd 2", "machine 2")
    text = out.read_text()
    assert text.count("## Side by side") == 1
    assert "SFT table 1" in text and "cmd 1" in text and "RM table 2" in text and "cmd 2" in text
    assert "RM table 1" not in text
    assert text.index("## Side by side") < text.index("SFT table 1") < text.index("RM table 2")
