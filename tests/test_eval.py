"""The evaluations of configs/eval.py on tiny random models, with answers checkable by hand: an
RM scores accuracy 1.0 on pairs whose chosen response it prefers (0.0 reversed) and 0.5 with
every pair a tie when its scores are constant; a policy against itself wins half the time;
best-of-1 is plain sampling; MC scoring of a two-question file; the KL of a policy to itself
is 0; a PPO run's checkpoints are restored for the over-optimisation curve."""

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.best_of_n import best_of_n, rm_score_fn
from rlhf_jax.config_lib import load_config
from rlhf_jax.data import BadRowError, preference_dataset
from rlhf_jax.eval import run as run_eval
from rlhf_jax.eval.best_of_n_curve import expected_best
from rlhf_jax.eval.common import distinct_n, wilson
from rlhf_jax.feedback.collect import generate_texts
from rlhf_jax.models import ModelDef, load_model, save_pretrained
from rlhf_jax.ppo.step import PPOState
from rlhf_jax.reward_model import RMScorer
from rlhf_jax.sft import token_logprobs
from rlhf_jax.train.checkpoint import Checkpointer

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(model_type="llama", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64,
            max_position_embeddings=128, tie_embeddings=True, rope_theta=10000.0)
PROMPTS = [f"Question {i}:" for i in range(6)]
CANDIDATES = [" yes", " no", " maybe so", " perhaps not", " it depends", " sure thing"]


def a_count(prompts, responses):
    return [float(r.count("a")) for r in responses]


@pytest.fixture(scope="module")
def models(tmp_path_factory, mesh):
    """Saved tiny models: two policies, an RM, and an RM whose head ignores its input."""
    d = tmp_path_factory.mktemp("eval_models")
    spec = dict(init="tiny", path="", dtype="float32", param_dtype="float32", tiny=TINY)
    for name, seed in (("policy", 0), ("policy_b", 1)):
        m, tok = load_model(spec, heads=("lm",), mesh=mesh, seed=seed)
        save_pretrained(m, d / name, tokenizer=tok)
    rm, tok = load_model(spec, heads=("reward",), mesh=mesh, seed=2)
    save_pretrained(rm, d / "rm", tokenizer=tok)
    rm.reward_head.kernel[...] = jnp.zeros_like(rm.reward_head.kernel[...])
    save_pretrained(rm, d / "rm_flat", tokenizer=tok)
    return {name: str(d / name) for name in ("policy", "policy_b", "rm", "rm_flat")}


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval_prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return str(path)


def config(kind, **fields):
    c = load_config(ROOT / "configs" / "eval.py", kind)
    c.mesh.num_devices = 1
    c.eval.batch_size = 8
    if "sampling" in c:
        c.sampling.max_new_tokens = 8
        c.sampling.temperature = 1.0
        c.data.max_prompt_length = 16
    c.update_from_flattened_dict(fields)
    return c


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ----------------------------------------------------------------------------- RM accuracy


@pytest.fixture(scope="module")
def rm_pairs(models, mesh):
    """Per prompt, two candidate responses ordered by the RM's own preference (RMScorer: text
    re-encoded with the RM's tokenizer, the other code path), and its scores."""
    scorer = RMScorer(models["rm"], max_length=64, mesh=mesh)
    out = []
    for i, p in enumerate(PROMPTS):
        a, b = CANDIDATES[i], CANDIDATES[(i + 1) % len(CANDIDATES)]
        sa, sb = scorer([(p, a), (p, b)])
        out.append((p, a, b, float(sa), float(sb)) if sa > sb else (p, b, a, float(sb), float(sa)))
    return out


def test_rm_that_prefers_the_chosen_response_scores_one_and_reversed_zero(models, rm_pairs, tmp_path):
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "chosen": c, "rejected": r}
                                                    for p, c, r, _, _ in rm_pairs])
    s = run_eval(config("rm_accuracy", **{"model.path": models["rm"], "data.path": pairs, "data.max_length": 64}),
                 tmp_path / "fwd")
    diffs = np.array([sc - sr for *_, sc, sr in rm_pairs])
    assert s["eval/accuracy"] == 1.0 and s["eval/pairs"] == 6 and s["eval/wins"] == 6 and s["eval/ties"] == 0
    # A fresh RM has gain 1 and bias 0: its normalised scores are the raw ones the loss reads.
    assert s["eval/margin"] == pytest.approx(diffs.mean(), rel=1e-4)
    assert s["eval/loss"] == pytest.approx(np.mean(np.log1p(np.exp(-diffs))), rel=1e-4)
    assert sum(v for k, v in s.items() if k.endswith("/pairs") and "bucket" in k) == 6
    assert s["eval/bucket_0-31/pairs"] == 6  # every response is under 32 byte tokens
    assert (tmp_path / "fwd" / "results.md").read_text().count("|") > 10
    assert len((tmp_path / "fwd" / "pairs.jsonl").read_text().splitlines()) == 6

    reversed_ = _write_jsonl(tmp_path / "rev.jsonl", [{"prompt": p, "chosen": r, "rejected": c}
                                                      for p, c, r, _, _ in rm_pairs])
    s = run_eval(config("rm_accuracy", **{"model.path": models["rm"], "data.path": reversed_,
                                          "data.max_length": 64}), tmp_path / "rev")
    assert s["eval/accuracy"] == 0.0 and s["eval/losses"] == 6
    assert s["eval/accuracy_ci_high"] < 0.5


def test_ranked_hh_and_oasst_files_are_read_as_the_rm_stage_reads_them(models, mesh, tmp_path):
    scorer = RMScorer(models["rm"], max_length=64, mesh=mesh)
    rows = []
    for p in PROMPTS[:3]:
        s = scorer([(p, c) for c in CANDIDATES[:3]])
        rows.append({"prompt": p, "ranked": [CANDIDATES[k] for k in np.argsort(-s)]})
    path = _write_jsonl(tmp_path / "ranked.jsonl", rows)
    # On all 8 (fake) devices, 5 rows per call rounded up to 8.
    s = run_eval(config("rm_accuracy", **{"model.path": models["rm"], "data.path": path, "data.max_length": 64,
                                          "mesh.num_devices": 0, "eval.batch_size": 5}), tmp_path / "out")
    assert s["eval/pairs"] == 9 and s["eval/accuracy"] == 1.0 and s["format"] == "ranked"
    # Every format the RM stage reads: Anthropic HH dialogues, OpenAssistant ranked chat rows.
    _, tok = load_model(models["rm"], heads=("reward",), mesh=mesh)
    for fixture, fmt in (("pref_hh.jsonl", "implicit"), ("pref_oasst.json", "alpaca_ranked")):
        path = ROOT / "tests" / "fixtures" / fixture
        s = run_eval(config("rm_accuracy", **{"model.path": models["rm"], "data.path": str(path),
                                              "data.max_length": 64}), tmp_path / fixture)
        assert s["format"] == fmt and s["eval/pairs"] == preference_dataset(path, tok, max_length=64).num_pairs()
        assert s["eval/wins"] + s["eval/ties"] + s["eval/losses"] == s["eval/pairs"]


def test_constant_rm_ties_every_pair_and_counts_them_a_half(models, rm_pairs, tmp_path):
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "chosen": c, "rejected": r}
                                                    for p, c, r, _, _ in rm_pairs])
    s = run_eval(config("rm_accuracy", **{"model.path": models["rm_flat"], "data.path": pairs,
                                          "data.max_length": 64}), tmp_path)
    assert s["eval/accuracy"] == 0.5 and s["eval/ties"] == 6 and s["eval/wins"] == 0 and s["eval/losses"] == 0
    assert s["eval/tie_fraction"] == 1.0 and s["eval/margin"] == 0.0
    assert s["eval/loss"] == pytest.approx(math.log(2))


def test_the_cli_writes_the_summary_and_the_table(models, rm_pairs, tmp_path):
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "chosen": c, "rejected": r}
                                                    for p, c, r, _, _ in rm_pairs])
    cmd = [sys.executable, "-m", "rlhf_jax.main", "--config", "configs/eval.py:rm_accuracy", "--workdir",
           str(tmp_path / "w"), f"--config.model.path={models['rm']}", f"--config.data.path={pairs}",
           "--config.data.max_length=64", "--config.mesh.num_devices=1"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "w" / "summary.json").read_text())
    assert summary["eval/accuracy"] == 1.0 and summary["eval/pairs"] == 6 and summary["kind"] == "rm_accuracy"
    assert "| pairs | accuracy |" in out.stdout and (tmp_path / "w" / "results.md").exists()


# ----------------------------------------------------------------------------- win rate


def test_wilson_interval_by_hand():
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson(50, 100, 0.9) == pytest.approx((0.4188, 0.5812), abs=1e-4)  # z = 1.6449


def test_a_policy_against_itself_wins_half_the_time(models, prompts_file, tmp_path):
    cfg = config("win_rate", **{"model.path": models["policy"], "eval.reference_path": models["policy"],
                                "eval.rm_path": models["rm"], "eval.gold": models["rm_flat"],
                                "data.path": prompts_file, "eval.num_samples": 16})
    s = run_eval(cfg, tmp_path)
    n = len(PROMPTS) * 16
    assert s["eval/n"] == n
    # The gold, an RM whose head ignores its input, ties every comparison: exactly 0.5, with
    # the interval of 48 wins in 96.
    assert s["eval/gold/ties"] == n and s["eval/gold/win_rate"] == 0.5
    assert (s["eval/gold/ci_low"], s["eval/gold/ci_high"]) == pytest.approx(wilson(n / 2, n))
    # The RM sees two independent draws of one policy: 0.5 lies inside the interval.
    w, t, l = s["eval/rm/wins"], s["eval/rm/ties"], s["eval/rm/losses"]
    assert w + t + l == n and s["eval/rm/win_rate"] == pytest.approx((w + t / 2) / n)
    assert s["eval/rm/ci_low"] <= 0.5 <= s["eval/rm/ci_high"] and s["eval/win_rate"] == s["eval/rm/win_rate"]
    rows = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == n and any(r["policy"] != r["reference"] for r in rows)


# ----------------------------------------------------------------------------- policy statistics


def test_distinct_n_by_hand():
    assert distinct_n(["a b a b"], 1) == 0.5
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n(["a", "b"], 2) == 0.0


def test_kl_of_a_policy_to_itself_is_zero_and_to_another_positive(models, tmp_path):
    # The gold is the built-in task, whose own prompts are used (data.path '').
    cfg = config("policy_stats", **{"model.path": models["policy"], "eval.reference_path": models["policy"],
                                    "eval.policies": (models["policy_b"],), "eval.gold": "word_sentiment",
                                    "eval.num_prompts": 6, "eval.num_samples": 2, "eval.rm_path": models["rm"]})
    s = run_eval(cfg, tmp_path)
    same, other = s["policies"]
    # The sampler's log-probs and a full forward pass agree token by token.
    for key in ("kl_k1_seq", "kl_k3_seq", "kl_k1_token", "kl_k3_token"):
        assert abs(same[key]) < 1e-4, (key, same[key])
    assert other["kl_k3_seq"] > 0.01 and other["kl_k3_token"] > 0  # two random models: both near uniform
    assert 1 <= same["length"] <= 8 and 0 <= same["distinct_1"] <= 1 and "rm" in same and -1 <= same["gold"] <= 1
    assert json.loads((tmp_path / "samples.jsonl").read_text().splitlines()[0])["prompt"] == "Describe the cat:"
    assert s["eval/kl_k1_seq"] == same["kl_k1_seq"]
    # Per token is the per-sequence total spread over every response token.
    lengths = [json.loads(x)["tokens"] for x in (tmp_path / "samples.jsonl").read_text().splitlines()
               if json.loads(x)["policy"] == models["policy_b"]]
    assert other["kl_k1_token"] * sum(lengths) == pytest.approx(other["kl_k1_seq"] * len(lengths), rel=1e-4)


# ----------------------------------------------------------------------------- best-of-n


def test_expected_best_by_hand():
    proxy, gold = np.array([[0.1, 0.4, 0.2, 0.3]]), np.array([[1.0, 2.0, 3.0, 4.0]])
    # n = 2: the six pairs' proxy-best golds are 2, 3, 4, 2, 2, 4.
    assert expected_best(proxy, {"gold": gold}, 2)["gold"] == pytest.approx(17 / 6)
    assert expected_best(proxy, {"gold": gold}, 1)["gold"] == 2.5 and expected_best(proxy, {"gold": gold}, 4) == {
        "proxy": 0.4, "gold": 2.0}
    assert expected_best(np.array([[1.0, 1.0]]), {"gold": np.array([[5.0, 7.0]])}, 2)["gold"] == 5.0  # ties: first


def test_best_of_one_is_plain_sampling_and_the_curve_rises(models, prompts_file, mesh, tmp_path):
    fields = {"model.path": models["policy"], "eval.rm_path": models["rm"], "data.path": prompts_file,
              "eval.gold": "test_eval:a_count"}
    s1 = run_eval(config("best_of_n", **fields, **{"eval.ns": (1,)}), tmp_path / "one")
    scorer = RMScorer(models["rm"], max_length=256, mesh=mesh)
    kw = dict(max_new_tokens=8, temperature=1.0, batch_size=8, max_prompt_length=16)
    plain = generate_texts(models["policy"], PROMPTS, seed=0, mesh=mesh, **kw)
    assert s1["eval/best_of_1/proxy"] == pytest.approx(scorer(list(zip(PROMPTS, plain))).mean(), rel=1e-5)
    assert s1["eval/best_of_1/gold"] == pytest.approx(np.mean(a_count(PROMPTS, plain)))
    bon = best_of_n(models["policy"], PROMPTS, rm_score_fn(scorer), n=1, seed=0, mesh=mesh, **kw)
    assert s1["eval/best_of_1/proxy"] == pytest.approx(bon.best_scores.mean(), rel=1e-5)

    s = run_eval(config("best_of_n", **fields, **{"eval.ns": (1, 2, 4)}), tmp_path / "curve")
    rows = [json.loads(x) for x in (tmp_path / "curve" / "samples.jsonl").read_text().splitlines()]
    proxy = np.array([r["proxy"] for r in rows]).reshape(len(PROMPTS), 4)
    p1, p2, p4 = (s[f"eval/best_of_{n}/proxy"] for n in (1, 2, 4))
    assert p1 == pytest.approx(proxy.mean()) and p4 == pytest.approx(proxy.max(1).mean()) and p1 <= p2 <= p4
    assert [p["kl_analytic"] for p in s["best_of_n"]] == pytest.approx([0.0, math.log(2) - 0.5, math.log(4) - 0.75])
    assert (tmp_path / "curve" / "best_of_n.png").stat().st_size > 1000


# ----------------------------------------------------------------------------- multiple choice


def _logliks(model, tok, context, answers):
    """Σ log p(answer | [BOS] context) of each answer by one plain forward pass over the whole
    sequence, right-padded (causal attention: padding after a token does not change it)."""
    c = [tok.bos_token_id] + tok(context, add_special_tokens=False)["input_ids"]
    seqs = [c + tok(a, add_special_tokens=False)["input_ids"] for a in answers]
    width = max(map(len, seqs))
    ids = jnp.asarray([q + [tok.pad_token_id] * (width - len(q)) for q in seqs], jnp.int32)
    mask = jnp.asarray([[1] * len(q) + [0] * (width - len(q)) for q in seqs], jnp.int32)
    model_def, _, params = ModelDef.split(model, None)
    logp = jax.jit(lambda p: token_logprobs(model_def.merge(p)(ids, mask)[:, :-1], ids[:, 1:]))(params)
    return [float(logp[i, len(c) - 1:len(q) - 1].sum()) for i, q in enumerate(seqs)]


def test_mc_scores_a_two_question_file(models, mesh, tmp_path):
    # A random byte-level model gives every byte about log(1/262): a choice many bytes longer
    # is far less likely. Question 1's true answer is the short one, question 2's the long one.
    long_ = "no, not in any way whatsoever"
    rows = [{"question": "Is the sky blue?", "choices": ["yes", long_], "labels": [1, 0]},
            {"question": "Is fire cold?", "mc1_targets": {"choices": [long_, "yes"], "labels": [1, 0]},
             "mc2_targets": {"choices": [long_, "yes", "ok"], "labels": [1, 0, 0]}}]
    path = tmp_path / "questions.json"
    path.write_text(json.dumps(rows))
    s = run_eval(config("mc", **{"model.path": models["policy"], "data.path": str(path), "mesh.num_devices": 0,
                                 "eval.batch_size": 3}), tmp_path / "out")  # 8 devices, 3 rows rounded up to 8
    assert s["eval/questions"] == 2 and s["eval/mc1_questions"] == 2 and s["eval/mc2_questions"] == 2
    assert s["eval/mc1"] == 0.5 and s["eval/mc2"] == pytest.approx(0.5, abs=1e-6)
    # Each log-likelihood equals a plain forward pass over "Q: <question>\nA:" + " <choice>".
    model, tok = load_model(models["policy"], mesh=mesh)
    recs = [json.loads(x) for x in (tmp_path / "out" / "questions.jsonl").read_text().splitlines()]
    want = _logliks(model, tok, f"Q: {rows[1]['question']}\nA:", [" " + c for c in rows[1]["mc2_targets"]["choices"]])
    assert recs[1]["mc2_loglikelihoods"] == pytest.approx(want, rel=1e-4)
    assert recs[0]["mc1"] == 1.0 and recs[1]["mc1"] == 0.0

    path.write_text(json.dumps([rows[0], {"question": "?", "choices": ["a", "b"], "labels": [0, 0]}]))
    with pytest.raises(BadRowError, match=r"row 2: field 'labels'"):
        run_eval(config("mc", **{"model.path": models["policy"], "data.path": str(path)}), tmp_path / "bad")


# ----------------------------------------------------------------------------- over-optimisation


def _fake_ppo_run(run_dir: Path, models, mesh):
    """A PPO-stage workdir as run_ppo leaves it: config.json and Orbax checkpoints of PPOState
    (iteration 1: the initial policy itself; iteration 2: another policy), with a shared value head."""
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({
        "stage": "ppo", "seed": 0, "model": {"init": "pretrained", "path": models["policy"], "dtype": "float32",
                                             "param_dtype": "float32"}, "reward": {"rm_path": models["rm"]}}))
    ckpt = Checkpointer(run_dir / "checkpoints", async_save=False)
    for step, name in ((1, "policy"), (2, "policy_b")):
        model, _ = load_model(models[name], heads=("lm", "value"), mesh=mesh)
        _, train, rest = ModelDef.split(model, r"layers|value_head")
        state = PPOState(step=jnp.int32(step), params={"policy": train, "critic": {}},
                         frozen={"policy": rest, "critic": {}}, opt_state=optax.adam(1e-3).init(train),
                         beta=jnp.float32(0.1), key=jax.random.key_data(jax.random.key(0)))
        ckpt.save(step, state, force=True)
    ckpt.close()


def test_overoptimisation_restores_the_checkpoints_and_plots(models, prompts_file, mesh, tmp_path):
    _fake_ppo_run(tmp_path / "ppo", models, mesh)
    cfg = config("overoptimisation", **{"eval.run_dir": str(tmp_path / "ppo"), "eval.gold": "test_eval:a_count",
                                        "data.path": prompts_file, "eval.ns": (1, 2)})
    s = run_eval(cfg, tmp_path / "out")
    rl = {p["step"]: p for p in s["rl"]}
    assert sorted(rl) == [0, 1, 2] and rl[0]["kl"] == 0.0
    assert abs(rl[1]["kl"]) < 1e-4 and rl[1]["proxy"] == pytest.approx(rl[0]["proxy"])  # the same policy
    assert rl[2]["kl_k3"] > 0.01 and rl[2]["sqrt_kl"] == pytest.approx(math.sqrt(max(rl[2]["kl"], 0)))
    assert [p["n"] for p in s["best_of_n"]] == [1, 2] and s["eval/rl_gold_final"] == rl[2]["gold"]
    assert (tmp_path / "out" / "overoptimisation.png").stat().st_size > 1000

    with pytest.raises(ValueError, match=r"eval.steps=\(5,\): no checkpoint at iterations \[5\]"):
        run_eval(config("overoptimisation", **{"eval.run_dir": str(tmp_path / "ppo"), "eval.steps": (5,),
                                               "eval.gold": "test_eval:a_count"}), tmp_path / "bad")


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("kind, fields, message", [
    ("rm_accuracy", {"data.path": "x.jsonl"}, r"model.path='': set it"),
    ("rm_accuracy", {"eval.tie_tolerance": -1.0}, r"eval.tie_tolerance=-1.0"),
    ("rm_accuracy", {"eval.confidence": 1.5}, r"eval.confidence=1.5: must be in \(0, 1\)"),
    ("best_of_n", {"eval.ns": (4, 2)}, r"eval.ns=\(4, 2\): must be increasing"),
    ("win_rate", {"eval.reference_path": ""}, r"eval.reference_path='': set it"),
    ("overoptimisation", {}, r"eval.run_dir='': set it"),
    ("mc", {"data.path": "q.json", "eval.template": "Q: {question}"}, r"eval.template=.*needs \{question\}"),
])
def test_config_mistakes_name_the_field(kind, fields, message, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")  # never read: the fields are checked first
    fields = {"model.path": str(tmp_path / "model"), **fields} if "model.path" not in message else fields
    with pytest.raises(ValueError, match=message):
        run_eval(config(kind, **fields), tmp_path)


def test_a_bad_gold_and_a_missing_judge_are_named(models, prompts_file, tmp_path):
    base = {"model.path": models["policy"], "eval.reference_path": models["policy"], "data.path": prompts_file}
    with pytest.raises(ValueError, match=r"eval.rm_path='' and eval.gold='': set a judge"):
        run_eval(config("win_rate", **base), tmp_path)
    with pytest.raises(ValueError, match=r"eval.gold='nonsense': not a task"):
        run_eval(config("win_rate", **base, **{"eval.gold": "nonsense"}), tmp_path)
    with pytest.raises(ValueError, match=r"eval.kind='nope' is not one of"):
        run_eval(config("win_rate", **{"eval.kind": "nope"}), tmp_path)
