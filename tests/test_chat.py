"""Chatting with a policy (`rlhf_jax.chat`): the cached-prefix engine against the compiled
sampler on the full conversation, context overflow, two-answer turns into the store and out
through the export, the templates, and the terminal chat driven by a stdin script.

One tiny random byte-level Llama per module, saved as a Hugging Face directory (the CLI and
the chat page load it by path). Its kernels are scaled up from the N(0, 0.02) init so that
greedy answers depend on the context (with the raw init every answer repeats one token).
"""

import io
import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from rlhf_jax import sharding
from rlhf_jax.chat import cli, engine
from rlhf_jax.chat.engine import ChatModel
from rlhf_jax.chat.session import ChatSession, ContextError, save_comparison
from rlhf_jax.chat.template import (
    comparison_renderer,
    comparison_texts,
    encode,
    render,
    stop_token_ids,
    template_messages,
)
from rlhf_jax.data import load_tokenizer, preference_dataset
from rlhf_jax.feedback import ComparisonStore
from rlhf_jax.models import ModelDef, load_model, save_pretrained
from rlhf_jax.sampling import SamplingConfig, make_generate

TINY = dict(model_type="llama", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
            max_position_embeddings=256, tie_embeddings=False)
CONTEXT = 160  # tokens: three short turns fit, five long ones do not
MAX_NEW = 10


def make_model_dir(path: Path) -> Path:
    """A tiny random byte-level policy with context-dependent greedy answers, saved as an HF dir."""
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    model, tok = load_model({"init": "tiny", "tiny": TINY}, mesh=mesh, seed=1)
    model_def, params, rest = ModelDef.split(model)
    scaled = {k: v * (6.0 if k.endswith("kernel") or k == "embed" else 1.0) for k, v in params.items()}
    save_pretrained(model_def.merge(scaled, rest), path, tokenizer=tok)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("chat_policy"))


@pytest.fixture(scope="module")
def chat_model(model_dir):
    return ChatModel(str(model_dir), max_context=CONTEXT)


@pytest.fixture(scope="module")
def reference(chat_model):
    """Greedy answer of the compiled batch sampler to a whole conversation, encoded from scratch."""
    tok = chat_model.tokenizer
    config = SamplingConfig(max_new_tokens=MAX_NEW, temperature=0.0, stop_token_ids=stop_token_ids(tok),
                            pad_token_id=tok.pad_token_id)
    generate = make_generate(chat_model.model_def, chat_model.mesh, config)

    def answer(messages):
        ids = np.asarray([encode(tok, render(tok, messages))], np.int32)
        out = generate(chat_model.params, ids, np.ones_like(ids), jax.random.key(0))
        return tuple(np.asarray(out.tokens)[0, :int(out.lengths[0])].tolist())

    return answer


def test_incremental_chat_equals_full_reencode(chat_model, reference):
    chat = ChatSession(chat_model, system="You are terse.", temperature=0.0, max_new_tokens=MAX_NEW)
    streamed = []
    traces = []
    for text in ("Hi there!", "What is 2+2?", "And 3+3?"):
        reply = chat.send(text, on_text=streamed.append)
        prompt = chat.context()[:-1]  # the conversation the answer continued
        assert reply.generated.tokens == reference(prompt), text
        assert "".join(streamed) == reply.text == chat.messages[-1]["content"]
        streamed.clear()
        assert reply.dropped_turns == 0 and reply.notice is None
        traces.append(sum(engine.TRACES.values()))
        if len(traces) > 1:
            # The system message and the first turn come from the cache: only the new part runs.
            assert reply.generated.prefilled_tokens < reply.generated.prompt_tokens - 10
    # Turns 1 and 2 compiled prefill for 32 and 64 new tokens (and decode); turn 3 (26 new
    # tokens: the 32 bucket) reuses them.
    assert traces[2] == traces[1]
    assert [m["role"] for m in chat.messages] == ["system"] + ["user", "assistant"] * 3

    # Without the prefix cache every turn prefills everything, and answers the same.
    again = ChatSession(chat_model, system="You are terse.", temperature=0.0, max_new_tokens=MAX_NEW,
                        prefix_cache=False)
    for user, bot in zip(chat.messages[1::2], chat.messages[2::2]):
        reply = again.send(user["content"])
        assert reply.text == bot["content"] and reply.generated.prefilled_tokens == reply.generated.prompt_tokens


def test_cache_grows_with_the_conversation(chat_model):
    """A conversation that outgrows its cache moves to a bigger one with its slots copied: the
    answer equals a fresh prefill of the whole prompt."""
    kw = dict(max_new_tokens=MAX_NEW, temperature=0.0, stop_ids=(), key=jax.random.key(0))
    short = list(range(60, 65))
    first, state = chat_model.generate(chat_model.new_state(), short, **kw)
    assert state.cache.max_length == 256
    # 136 new tokens go in a 256-wide prefill after the 14 cached: more than 256 slots.
    longer = short + list(first.tokens) + list(range(100, 235))
    grown, state = chat_model.generate(state, longer, **kw)
    assert state.cache.max_length == CONTEXT + chat_model.prefill_chunk
    assert grown.prefilled_tokens == len(longer) - len(short) - len(first.tokens) + 1
    fresh, _ = chat_model.generate(chat_model.new_state(), longer, **dict(kw, key=jax.random.key(1)))
    assert grown.tokens == fresh.tokens


def test_context_overflow_drops_oldest_turns(chat_model, reference):
    chat = ChatSession(chat_model, system="Sys.", temperature=0.0, max_new_tokens=MAX_NEW)
    long = [f"message number {i}: " + "lorem ipsum " * 3 for i in range(5)]
    replies = [chat.send(text) for text in long]
    dropped = [r.dropped_turns for r in replies]
    assert dropped[0] == 0 and sum(dropped) >= 2, dropped
    first_drop = next(r for r in replies if r.dropped_turns)
    assert "dropped the" in first_drop.notice and "system message is kept" in first_drop.notice
    context = chat.context()
    assert context[0] == {"role": "system", "content": "Sys."}
    assert context[1]["role"] == "user" and long[0] not in [m["content"] for m in context]
    assert chat.first_turn == sum(dropped)
    # The model still answers, and the answer is the one to the shortened conversation.
    assert replies[-1].generated.tokens and replies[-1].generated.tokens == reference(context[:-1])
    n_tokens = len(encode(chat.tokenizer, render(chat.tokenizer, context[:-1])))
    assert n_tokens + MAX_NEW <= CONTEXT
    assert len(chat.messages) == 1 + 2 * len(long)  # the transcript keeps everything

    before = list(chat.messages)
    with pytest.raises(ContextError, match="does not fit"):
        chat.send("x" * CONTEXT)
    assert chat.messages == before


def test_two_answers_are_stored_and_exported(chat_model, tmp_path):
    tok = chat_model.tokenizer
    chat = ChatSession(chat_model, temperature=1.0, max_new_tokens=MAX_NEW, seed=3, policy_name="tiny-policy")
    first = chat.send("Hello")
    two = chat.send_two("Tell me a story")
    assert [a.prompt_tokens for a in two.answers] == [two.answers[0].prompt_tokens] * 2
    with pytest.raises(ValueError, match="pick one of the two answers"):
        chat.send("too early")
    assert chat.choose(1) == two.texts[1] == chat.messages[-1]["content"]

    store = ComparisonStore(tmp_path / "store")
    item_id, label = save_comparison(store, two, choice=1, labeler="alice", meta=chat.meta())
    (item,) = store.items()
    assert item["prompt"] == [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first.text},
                              {"role": "user", "content": "Tell me a story"}]
    assert item["responses"] == two.texts and item["meta"]["policy"] == "tiny-policy"
    assert (label["kind"], label["ranking"], label["labeler"]) == ("choice", [1, 0], "alice")

    out = tmp_path / "prefs.jsonl"
    with pytest.raises(ValueError, match="render="):
        store.export_preferences(out)
    if two.texts[0] == two.texts[1]:
        pytest.skip("the two sampled answers are identical: no preference to export")
    counts = store.export_preferences(out, render=comparison_renderer(tok))
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert counts["rows"] == 1
    assert row["prompt"] == render(tok, item["prompt"]) and row["prompt"].endswith("<|assistant|>\n")
    assert (row["chosen"], row["rejected"]) == (two.texts[1] + "<eos>", two.texts[0] + "<eos>")
    ds = preference_dataset(str(out), tok, max_length=128)
    assert len(ds.examples) == 1


def test_store_checks_conversation_prompts(tmp_path):
    store = ComparisonStore(tmp_path)
    with pytest.raises(ValueError, match=r"items\[0\].prompt\[1\]"):
        store.add_items([{"prompt": [{"role": "user", "content": "a"}, {"role": "user"}], "responses": ["x", "y"]}])
    with pytest.raises(ValueError, match=r"items\[0\].prompt: the conversation is empty"):
        store.add_items([{"prompt": [], "responses": ["x", "y"]}])
    (item_id,) = store.add_items([{"prompt": [{"role": "user", "content": "a"}], "responses": ["x", "y"]}])
    store.get_item(item_id)["prompt"].append("mutated")
    assert store.get_item(item_id)["prompt"] == [{"role": "user", "content": "a"}]


def test_templates():
    tok = load_tokenizer("byte")
    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert stop_token_ids(tok) == (tok.eos_token_id,)
    # plain: contents as written, each assistant turn ended by EOS; answers exported as written.
    plain = conv + [{"role": "assistant", "content": " A"}, {"role": "user", "content": " Q2"}]
    assert render(tok, plain, template="plain") == "SQ A<eos> Q2"
    assert comparison_texts(tok, conv, ["a", "b"], "plain") == ("SQ", ["a", "b"])
    assert encode(tok, "hi")[0] == tok.bos_token_id and encode(tok, "<bos>hi").count(tok.bos_token_id) == 1

    # A ChatML template: its end-of-turn token stops answers too.
    chatml = load_tokenizer("byte")
    chatml.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chatml.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    im_end = chatml.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(chatml) == tuple(sorted({chatml.eos_token_id, im_end}))
    assert comparison_texts(chatml, conv, ["a"])[1] == ["a<|im_end|>\n"]

    # A template that refuses system messages gets the system text in the first user turn.
    strict = load_tokenizer("byte")
    strict.chat_template = ("{% if messages[0].role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
                            "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    fitted, note = template_messages(strict, conv)
    assert fitted == [{"role": "user", "content": "S\n\nQ"}] and "system" in note
    assert template_messages(tok, conv) == (conv, None)


def test_terminal_chat_reads_a_script_from_stdin(model_dir, tmp_path, monkeypatch, capsys):
    """Three turns from a script, the second with two answers (the second picked); the
    history file and the store get the conversation. In process, so that it reuses the
    programs the other tests compiled (`python -m rlhf_jax.chat` calls the same `main`)."""
    script = "Hello there\n/temp 0.5\n/two How are you?\n2\n/temp 0\nGood bye\n"
    history, store_dir = tmp_path / "history.jsonl", tmp_path / "store"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))  # not a TTY: read as a script
    cli.main(["--model", str(model_dir), "--temperature", "0", "--max-new-tokens", str(MAX_NEW), "--context",
              str(CONTEXT), "--system", "Be kind.", "--history", str(history), "--store", str(store_dir),
              "--labeler", "tester"])
    out = capsys.readouterr()
    assert "error" not in out.err, out.err
    lines = out.out.splitlines()
    assert [line for line in lines if line.startswith("you> ")] == [
        "you> Hello there", "you> /temp 0.5", "you> /two How are you?", "you> /temp 0", "you> Good bye"]
    assert sum(line.startswith("assistant> ") for line in lines) == 2
    assert any(line.startswith("[1] ") for line in lines) and any(line.startswith("[2] ") for line in lines)
    assert any("which is better?" in line and line.endswith("> 2") for line in lines)

    (row,) = [json.loads(line) for line in history.read_text().splitlines()]
    messages = row["messages"]
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * 3
    assert messages[0]["content"] == "Be kind."
    assert [m["content"] for m in messages if m["role"] == "user"] == ["Hello there", "How are you?", "Good bye"]

    store = ComparisonStore(store_dir)
    (item,) = store.items()
    (label,) = store.labels()
    assert item["prompt"] == messages[:4]  # system, the first turn, the two-answer turn's question
    assert item["responses"][1] == messages[4]["content"]  # the conversation went on with answer 2
    assert (label["labeler"], label["kind"], label["ranking"]) == ("tester", "choice", [1, 0])
    assert item["meta"]["temperature"] == 0.5 and item["meta"]["template"] == "auto"


def test_terminal_chat_user_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--model", str(tmp_path / "nothing")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "config.json" in err and "Traceback" not in err
