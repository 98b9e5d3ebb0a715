"""Tests for the labeling server: its JSON endpoints (urllib) and the page (headless Chromium).

The browser tests need Debian's `chromium` and `chromium-driver` and pip's `selenium`; they
are skipped, saying which is missing, when any is absent.
"""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from rlhf_jax.feedback import ComparisonStore
from rlhf_jax.feedback.server import start_in_thread

CHROMIUM = os.environ.get("CHROMIUM_BIN", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER_BIN", "/usr/bin/chromedriver")
XSS = '<img src=x onerror="document.body.dataset.pwned=1"><b>bold</b> & <script>x()</script>'


def make_store(path, ks):
    store = ComparisonStore(path)
    store.add_items([{"id": f"item{n}", "prompt": f"prompt {n} <i>not italic</i>",
                      "responses": [f"response {n}.{i}" for i in range(k)]}
                     for n, k in enumerate(ks)])
    return store


@pytest.fixture
def server(tmp_path):
    servers = []

    def start(store, **kwargs):
        srv = start_in_thread(store, **kwargs)
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()


def get(url):
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.headers, resp.read()


def post(url, body, content_type="application/json"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# ---- JSON endpoints, no browser ----


def test_json_endpoints(tmp_path, server):
    store = make_store(tmp_path, [4, 2])
    srv = server(store, labeler="default-name", seed=0)
    assert srv.server_address[0] == "127.0.0.1" and srv.port > 0
    assert json.loads(get(srv.url + "api/config")[2]) == {"labeler": "default-name"}

    status, headers, page = get(srv.url)
    assert status == 200 and headers.get_content_type() == "text/html"
    assert b"<script>" in page and "script-src 'sha256-" in headers["Content-Security-Policy"]

    nxt = json.loads(get(srv.url + "api/next?labeler=alice")[2])
    assert nxt["remaining"] == 2 and nxt["item"]["id"] == "item0"
    shown = nxt["item"]["responses"]
    assert sorted(r["index"] for r in shown) == [0, 1, 2, 3]
    assert all(r["text"] == f"response 0.{r['index']}" for r in shown)

    # The label refers to the original index, whatever position it was shown at.
    status, body = post(srv.url + "api/label", {"item_id": "item0", "labeler": "alice",
                                                "kind": "choice", "ranking": [shown[-1]["index"]]})
    assert status == 200 and body["label"]["ranking"][0] == shown[-1]["index"]
    assert store.labels()[0]["ranking"][0] == shown[-1]["index"]

    nxt = json.loads(get(srv.url + "api/next?labeler=alice")[2])
    assert nxt["remaining"] == 1 and nxt["item"]["id"] == "item1"
    # Without a labeler in the request the server's --labeler is used.
    status, body = post(srv.url + "api/label", {"item_id": "item1", "kind": "tie"})
    assert status == 200 and body["label"]["labeler"] == "default-name"
    status, body = post(srv.url + "api/label",
                        {"item_id": "item1", "labeler": "alice", "kind": "skip"})
    assert status == 200
    assert json.loads(get(srv.url + "api/next?labeler=alice")[2]) == {"item": None,
                                                                      "remaining": 0}
    assert json.loads(get(srv.url + "api/next?labeler=bob")[2])["remaining"] == 2


def test_json_endpoint_errors(tmp_path, server):
    srv = server(make_store(tmp_path, [3]))
    label = srv.url + "api/label"
    cases = [
        ({"item_id": "nope", "labeler": "a", "kind": "choice", "ranking": [0]}, "item_id"),
        ({"item_id": "item0", "labeler": "a", "kind": "ranking", "ranking": [0, 0, 1]},
         "ranking"),
        ({"item_id": "item0", "labeler": "a", "kind": "ranking", "ranking": [0, 1]},
         "ranking"),
        ({"item_id": "item0", "labeler": "a", "kind": "meh"}, "kind"),
        ({"item_id": "item0", "kind": "tie"}, "labeler"),  # no default labeler here
        ({"item_id": "item0", "labeler": "a", "kind": "tie", "extra": 1}, "extra"),
        ([1, 2], "body"),
    ]
    for body, field in cases:
        status, reply = post(label, body)
        assert status == 400 and field in reply["error"], (body, reply)
    assert post(label, b"{not json")[0] == 400
    # A form post (what another site could send without a CORS preflight) is refused.
    assert post(label, b"item_id=item0", "application/x-www-form-urlencoded")[0] == 415
    assert post(srv.url + "api/other", {})[0] == 404
    with pytest.raises(urllib.error.HTTPError) as e:
        get(srv.url + "api/next")
    assert e.value.code == 400
    with pytest.raises(urllib.error.HTTPError) as e:
        get(srv.url + "nothing-here")
    assert e.value.code == 404
    assert ComparisonStore(tmp_path).labels() == []


# ---- the page in headless Chromium ----


@pytest.fixture(scope="module")
def browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (Debian: apt-get install chromium "
                    "chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver",
                                    reason="needs selenium (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(15)
    yield driver
    driver.quit()


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def page_state(driver):
    return driver.find_element("tag name", "body").get_attribute("data-state")


def press(driver, key):
    from selenium.webdriver.common.action_chains import ActionChains
    ActionChains(driver).send_keys(key).perform()


def shown_indices(driver):
    cards = driver.find_elements("css selector", ".response")
    return cards, [int(c.get_attribute("data-index")) for c in cards]


def test_page_click_records_original_index(tmp_path, server, browser):
    store = make_store(tmp_path, [4, 2])
    store.add_items([{"id": "xss", "prompt": XSS, "responses": [XSS, "plain"]}])
    srv = server(store, seed=3)
    browser.get(srv.url + "?labeler=alice")
    wait_for(lambda: page_state(browser) == "ready", what="first item")
    assert browser.find_element("id", "labeler").get_attribute("value") == "alice"

    cards, indices = shown_indices(browser)
    assert sorted(indices) == [0, 1, 2, 3]
    # Seed 3 shows the responses out of order, so a position/index mix-up would fail.
    assert indices != [0, 1, 2, 3]
    pos = next(p for p, i in enumerate(indices) if p != i)
    assert cards[pos].find_element("css selector", ".text").text == f"response 0.{indices[pos]}"
    cards[pos].find_element("css selector", "button.choose").click()
    wait_for(lambda: store.labels(labeler="alice"), what="label in store")
    (label,) = store.labels(labeler="alice")
    assert (label["item_id"], label["kind"]) == ("item0", "choice")
    assert label["ranking"][0] == indices[pos]

    # The next item loads by itself; the keyboard works too (2 = second position).
    wait_for(lambda: browser.find_element("tag name", "body").get_attribute("data-item-id")
             == "item1" and page_state(browser) == "ready", what="second item")
    _, indices = shown_indices(browser)
    press(browser, "2")
    wait_for(lambda: len(store.labels(labeler="alice")) == 2, what="keyboard label")
    assert store.labels(labeler="alice")[1]["ranking"][0] == indices[1]

    # Model output is shown as text: no markup from it reaches the DOM.
    wait_for(lambda: browser.find_element("tag name", "body").get_attribute("data-item-id")
             == "xss" and page_state(browser) == "ready", what="xss item")
    cards, _ = shown_indices(browser)
    texts = [c.find_element("css selector", ".text").text for c in cards]
    assert XSS in texts and browser.find_element("id", "prompt").text == XSS
    assert not browser.find_elements("css selector", "#task img, #task b, #task i")
    assert browser.find_element("tag name", "body").get_attribute("data-pwned") is None

    press(browser, "t")
    wait_for(lambda: page_state(browser) == "done", what="done state")
    assert store.labels(labeler="alice")[2]["kind"] == "tie"
    assert "Nothing left" in browser.find_element("id", "status").text
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def test_page_ranking_and_skip(tmp_path, server, browser):
    store = make_store(tmp_path, [3, 3])
    srv = server(store, labeler="from-server", seed=1)
    browser.get(srv.url)  # no ?labeler=: the server's default fills the box
    wait_for(lambda: page_state(browser) == "ready", what="first item")
    assert browser.find_element("id", "labeler").get_attribute("value") == "from-server"

    browser.find_element("css selector", 'input[name="mode"][value="ranking"]').click()
    cards, indices = shown_indices(browser)
    submit = browser.find_element("id", "submit-ranking")
    cards[2].find_element("css selector", "button.choose").click()
    assert not submit.is_enabled()
    cards[0].find_element("css selector", "button.choose").click()
    # Two of three ranked: the last is implied and the ranking can be submitted.
    assert submit.is_enabled()
    assert [c.find_element("css selector", ".badge").text for c in cards] == ["2nd", "3rd",
                                                                             "1st"]
    submit.click()
    wait_for(lambda: store.labels(), what="ranking label")
    (label,) = store.labels()
    assert label["kind"] == "ranking" and label["labeler"] == "from-server"
    assert label["ranking"] == [indices[2], indices[0], indices[1]]

    wait_for(lambda: browser.find_element("tag name", "body").get_attribute("data-item-id")
             == "item1" and page_state(browser) == "ready", what="second item")
    browser.find_element("id", "skip").click()
    wait_for(lambda: page_state(browser) == "done", what="done state")
    assert [lb["kind"] for lb in store.labels()] == ["ranking", "skip"]


def test_command_line(tmp_path):
    make_store(tmp_path, [2])
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pythonpath = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf_jax.feedback.server", "--store", str(tmp_path),
         "--port", "0", "--labeler", "cli"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=pythonpath))
    try:
        line = proc.stdout.readline()
        assert "1 items" in line and "http://127.0.0.1:" in line, line
        url = line.split()[-1]
        assert json.loads(get(url + "api/config")[2]) == {"labeler": "cli"}
        assert json.loads(get(url + "api/next")[2])["item"]["id"] == "item0"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert "Warning" not in err and "Traceback" not in err, err
