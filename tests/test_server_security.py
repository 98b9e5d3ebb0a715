"""The labeling server refuses to listen beyond loopback without a token, checks the token on
every API request, and accepts only short, safe labeler ids."""

import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from rlhf_jax.feedback import ComparisonStore
from rlhf_jax.feedback.server import make_server, start_in_thread


@pytest.fixture
def store(tmp_path):
    s = ComparisonStore(tmp_path / "store")
    s.add_items([{"id": "a", "prompt": "p", "responses": ["x", "y"]}])
    return s


def _request(url, body=None, token=None):
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["X-Label-Token"] = token
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_non_loopback_without_token_is_refused(store):
    with pytest.raises(ValueError, match="--token"):
        make_server(store, host="0.0.0.0", port=0)
    out = subprocess.run([sys.executable, "-m", "rlhf_jax.feedback.server", "--store", str(store.path),
                          "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 2 and "--token" in out.stderr and "Traceback" not in out.stderr


def test_writes_need_the_token_beyond_loopback(store):
    srv = start_in_thread(store, host="0.0.0.0", port=0, token="s3cret")
    try:
        base = f"http://127.0.0.1:{srv.port}"
        label = {"item_id": "a", "labeler": "alice", "kind": "choice", "ranking": [0]}
        assert _request(base + "/api/label", label)[0] == 403
        assert _request(base + "/api/label", label, token="wrong")[0] == 403
        assert _request(base + "/api/next?labeler=alice")[0] == 403
        assert store.labels() == []
        status, body = _request(base + "/api/label", label, token="s3cret")
        assert status == 200 and body["label"]["labeler"] == "alice"
    finally:
        srv.stop()


@pytest.mark.parametrize("name", ["../../../tmp/pwn", "x" * 65, "a b", ""])
def test_labeler_ids_are_validated(store, name):
    srv = start_in_thread(store, port=0)
    try:
        base = f"http://127.0.0.1:{srv.port}"
        status, body = _request(base + "/api/label", {"item_id": "a", "labeler": name, "kind": "choice",
                                                      "ranking": [0]})
        assert status == 400 and "labeler" in body["error"]
        assert store.labels() == []
    finally:
        srv.stop()
