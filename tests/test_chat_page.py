"""The chat page (`python -m rlhf_jax.feedback.server --chat`): its streaming JSON API
(urllib), its token rule, and a three-turn conversation in headless Chromium whose
two-answer turn becomes a comparison that the export turns into RM training data.

The browser test needs Debian's `chromium` and `chromium-driver` and pip's `selenium`, and
is skipped, saying which is missing, without them (see test_feedback_page.py).
"""

import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from test_chat import CONTEXT, MAX_NEW, make_model_dir
from test_feedback_page import XSS, browser, page_state, wait_for  # noqa: F401  (browser is a fixture)
from test_train_loop import tiny_config

from rlhf_jax.chat.engine import ChatModel
from rlhf_jax.chat.service import ChatService
from rlhf_jax.feedback import ComparisonStore
from rlhf_jax.chat.export import export_store
from rlhf_jax.feedback.server import main as server_main
from rlhf_jax.feedback.server import start_in_thread
from rlhf_jax.train.logging import read_metrics
from rlhf_jax.train.loop import run


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("chat_policy"))


@pytest.fixture(scope="module")
def chat_model(model_dir):
    return ChatModel(str(model_dir), max_context=CONTEXT)


@pytest.fixture
def chat_server(tmp_path, chat_model, model_dir):
    servers = []

    def start(two_prob=0.0, **kwargs):
        store = ComparisonStore(tmp_path / "store")
        service = ChatService(chat_model, store, two_prob=two_prob, temperature=1.0, max_new_tokens=MAX_NEW, seed=0,
                              policy_name=str(model_dir))
        srv = start_in_thread(store, chat=service, **kwargs)
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()


def call(url, body=None, token=None):
    """(status, parsed reply): a JSON object, or the list of events of a stream."""
    headers = {"Content-Type": "application/json", **({"X-Label-Token": token} if token else {})}
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            if resp.headers.get_content_type() == "application/x-ndjson":
                return resp.status, [json.loads(line) for line in resp]
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_chat_api_streams_and_stores_two_answer_turns(chat_server, tmp_path, model_dir, capsys):
    srv = chat_server()
    status, config = call(srv.url + "api/config")
    assert status == 200 and config["chat"]["two_prob"] == 0.0 and config["chat"]["policy"] == str(model_dir)
    with urllib.request.urlopen(srv.url) as resp:
        assert b"<title>Chat</title>" in resp.read() and "sha256-" in resp.headers["Content-Security-Policy"]
    with urllib.request.urlopen(srv.url + "label") as resp:
        assert b"Which response is better?" in resp.read()

    status, events = call(srv.url + "api/chat", {"conversation": None, "text": "Hello"})
    assert status == 200 and events[0]["two"] is False
    conversation = events[0]["conversation"]
    deltas = [e["delta"] for e in events[1:-1]]
    assert events[-1]["done"] and events[-1]["text"] == "".join(deltas) and events[-1]["notice"] is None
    first = events[-1]["text"]

    status, events = call(srv.url + "api/chat", {"conversation": conversation, "text": "More", "two": True})
    assert status == 200 and events[0] == {"conversation": conversation, "two": True}
    done = events[-1]
    for i in (0, 1):
        assert "".join(e["delta"] for e in events[1:-1] if e["answer"] == i) == done["answers"][i]
    (item,) = srv.store.items()
    assert item["id"] == done["item_id"] and srv.store.labels() == []  # stored before the choice
    assert item["prompt"] == [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first},
                              {"role": "user", "content": "More"}]
    assert item["responses"] == done["answers"] and item["meta"]["source"] == "chat"

    # Until a choice is made the conversation waits; bad choices are refused by name.
    assert call(srv.url + "api/chat", {"conversation": conversation, "text": "x"}) == (
        400, {"error": "choose one of the two answers first"})
    choose = srv.url + "api/choose"
    base = {"conversation": conversation, "item_id": item["id"], "labeler": "alice"}
    for body, field in (({**base, "item_id": "nope"}, "item_id"), ({**base, "choice": 5}, "choice"),
                        ({**base, "choice": 0, "labeler": "a b"}, "labeler"),
                        ({**base, "choice": 0, "extra": 1}, "extra")):
        status, reply = call(choose, body)
        assert status == 400 and field in reply["error"], (body, reply)
    status, reply = call(choose, {**base, "choice": 1})
    assert status == 200 and reply["label"]["ranking"] == [1, 0] and reply["label"]["labeler"] == "alice"
    assert srv.chat.messages(conversation)[-1] == {"role": "assistant", "content": done["answers"][1]}
    status, _ = call(srv.url + "api/chat", {"conversation": conversation, "text": "Go on"})
    assert status == 200

    assert call(srv.url + "api/chat", {"conversation": "gone", "text": "x"})[0] == 400
    assert call(srv.url + "api/chat", {"conversation": None, "text": "  "})[0] == 400
    # The labeling page shows a chat item's conversation as text, and the messages too.
    status, nxt = call(srv.url + "api/next?labeler=bob")
    assert nxt["item"]["messages"] == item["prompt"]
    assert nxt["item"]["prompt"] == f"user: Hello\n\nassistant: {first}\n\nuser: More"

    counts = export_store(srv.store, tmp_path / "prefs.jsonl")  # the tokenizer of the policy in the items' meta
    assert counts["rows"] == 1
    server_main(["--store", str(srv.store.path), "--export", str(tmp_path / "cli.jsonl")])
    assert "exported 1 rows" in capsys.readouterr().out
    assert (tmp_path / "cli.jsonl").read_text() == (tmp_path / "prefs.jsonl").read_text()


def test_several_users_at_once_lose_nothing(chat_server):
    """Four people chat at the same time, each through a two-answer turn and a choice: every
    comparison and every label is stored, with its own conversation as the prompt."""
    srv = chat_server()
    errors = []

    def user(n):
        try:
            _, events = call(srv.url + "api/chat", {"conversation": None, "text": f"I am user {n}"})
            conversation = events[0]["conversation"]
            _, events = call(srv.url + "api/chat", {"conversation": conversation, "text": "Two please", "two": True})
            status, _ = call(srv.url + "api/choose", {"conversation": conversation, "item_id": events[-1]["item_id"],
                                                      "choice": n % 2, "labeler": f"user{n}"})
            assert status == 200
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=user, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    items = {item["id"]: item for item in srv.store.items()}
    labels = srv.store.labels()
    assert len(items) == len(labels) == 4
    for label in labels:
        n = int(label["labeler"][4:])
        assert items[label["item_id"]]["prompt"][0] == {"role": "user", "content": f"I am user {n}"}
        assert label["ranking"][0] == n % 2


def test_chat_needs_the_token_beyond_loopback(chat_server):
    srv = chat_server(host="0.0.0.0", port=0, token="s3cret")
    base = f"http://127.0.0.1:{srv.port}/"
    assert call(base + "api/chat", {"conversation": None, "text": "Hi"})[0] == 403
    assert call(base + "api/choose", {"conversation": "c", "item_id": "i", "choice": 0})[0] == 403
    status, events = call(base + "api/chat", {"conversation": None, "text": "Hi"}, token="s3cret")
    assert status == 200 and events[-1]["done"]


def test_page_three_turns_one_comparison_trains_an_rm(chat_server, browser, tmp_path, model_dir):  # noqa: F811
    srv = chat_server()
    browser.get(srv.url + "?labeler=alice")
    wait_for(lambda: page_state(browser) == "ready", what="page ready")

    def say(text):
        box = browser.find_element("id", "input")
        box.send_keys(text)
        browser.find_element("id", "send").click()

    def texts(selector):
        return [browser.execute_script("return arguments[0].textContent", el)
                for el in browser.find_elements("css selector", selector)]

    say("Hello")
    wait_for(lambda: page_state(browser) == "ready" and texts(".msg.assistant .text"), what="first answer")
    browser.find_element("id", "two").click()
    say("Tell me more")
    wait_for(lambda: page_state(browser) == "choosing", what="two answers")
    shown = texts(".answer .text")
    assert len(shown) == 2
    browser.find_elements("css selector", ".answer button.choose")[1].click()
    wait_for(lambda: srv.store.labels() and page_state(browser) == "ready", what="the choice stored")
    say(XSS)  # a user message is shown as text too
    wait_for(lambda: page_state(browser) == "ready" and len(browser.find_elements("css selector", ".msg.assistant"))
             == 3, what="third answer")

    (item,) = srv.store.items()
    (label,) = srv.store.labels()
    first = texts(".msg.assistant .text")[0]
    assert item["prompt"] == [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first},
                              {"role": "user", "content": "Tell me more"}]
    assert item["responses"] == shown
    assert (label["item_id"], label["labeler"], label["kind"], label["ranking"]) == (item["id"], "alice", "choice",
                                                                                    [1, 0])
    conversation = browser.find_element("tag name", "body").get_attribute("data-conversation")
    messages = srv.chat.messages(conversation)
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3
    assert messages[3]["content"] == shown[1] and messages[4]["content"] == XSS  # went on with the pick
    assert not browser.find_elements("css selector", "#log img, #log b")
    assert browser.find_element("tag name", "body").get_attribute("data-pwned") is None
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]

    # The export is explicit preference rows (the chat template rendered), which the RM stage
    # trains on. The RM loop drops a last partial batch, so a one-pair batch needs a second
    # comparison: another conversation's two-answer turn, through the API.
    status, events = call(srv.url + "api/chat", {"conversation": None, "text": "Hi again", "two": True})
    assert call(srv.url + "api/choose", {"conversation": events[0]["conversation"], "item_id": events[-1]["item_id"],
                                         "choice": 0, "labeler": "bob"})[0] == 200
    prefs = tmp_path / "prefs.jsonl"
    assert export_store(srv.store, prefs)["rows"] == 2
    rows = [json.loads(line) for line in prefs.read_text().splitlines()]
    assert rows[0]["prompt"] == (f"<|user|>\nHello<eos><|assistant|>\n{first}<eos>"
                                 "<|user|>\nTell me more<eos><|assistant|>\n")
    assert (rows[0]["chosen"], rows[0]["rejected"]) == (shown[1] + "<eos>", shown[0] + "<eos>")
    cfg = tiny_config("rm", prefs, **{
        "model.init": "pretrained", "model.path": str(model_dir), "train.num_steps": 1, "optimizer.warmup_steps": 0,
        "rm.max_responses": 2, "rm.max_pairs": 1, "data.max_length": 128, "data.eval_fraction": 0.0,
        "train.eval_every": 0, "train.checkpoint_every": 0, "train.tensorboard": False})
    run(cfg, tmp_path / "rm")
    (step,) = [m for m in read_metrics(tmp_path / "rm") if "train/loss" in m]
    assert step["step"] == 1 and np.isfinite(step["train/loss"])
    assert (tmp_path / "rm" / "model" / "config.json").exists()


def test_chat_command_line(tmp_path, model_dir, capsys):
    for argv, words in ((["--chat"], "--chat needs --model"),
                        (["--chat", "--model", "never-loaded", "--host", "0.0.0.0"], "--token")):
        with pytest.raises(SystemExit) as e:
            server_main(["--store", str(tmp_path / "store")] + argv)
        assert e.value.code == 2 and words in capsys.readouterr().err

    # The real command: it loads the model, then serves the chat page and its settings.
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf_jax.feedback.server", "--chat", "--model", str(model_dir), "--store",
         str(tmp_path / "store"), "--port", "0", "--two-prob", "0.5", "--temperature", "0.3", "--max-new-tokens", "16"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"chat with {model_dir} at http://127.0.0.1:"), line
        url = line.split(" at ")[1].split()[0]
        status, config = call(url + "api/config")
        assert config["chat"]["two_prob"] == 0.5 and config["chat"]["temperature"] == 0.3
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "Traceback" not in err, err
