"""A labeling web page over a ComparisonStore, on the standard library only.

    python -m rlhf_jax.feedback.server --store DIR [--port 8000] [--labeler NAME]

then open http://127.0.0.1:8000/ (or /?labeler=NAME). The page shows the prompt and the K
responses side by side in a random order and records a choice, a full ranking, a tie or
a skip for the labeler, then loads that labeler's next unlabeled item.

JSON endpoints:

- GET  /api/config             → {"labeler": default labeler name or null}
- GET  /api/next?labeler=NAME  → {"item": null | {"id", "prompt",
                                   "responses": [{"index": original index, "text"}, ...]},
                                   "remaining": int}; responses come shuffled, "index" is
                                   the position in the stored item
- POST /api/label  {"item_id", "labeler", "kind", "ranking"}  (ranking in ORIGINAL
                   indices, best first) → {"label": stored label}; 400 {"error"} names
                   the bad field

The server binds to 127.0.0.1. Bound to any other address it needs a shared token
(`--token` or RLHF_JAX_LABEL_TOKEN), which every /api/ request must carry in the
`X-Label-Token` header (the page takes it from its URL: `/?token=...`). Labeler ids are
1-64 characters of letters, digits and `._@-`.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import ipaddress
import json
import os
import random
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from rlhf_jax.feedback.store import ComparisonStore

__all__ = ["LabelServer", "main", "make_server", "start_in_thread"]

MAX_BODY_BYTES = 1 << 20
LABELER_ID = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
TOKEN_ENV = "RLHF_JAX_LABEL_TOKEN"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_labeler(labeler) -> str:
    """A labeler id as stored in every label: short and of safe characters, or ValueError."""
    if not isinstance(labeler, str) or not LABELER_ID.fullmatch(labeler):
        shown = labeler[:40] + "..." if isinstance(labeler, str) and len(labeler) > 40 else labeler
        raise ValueError(f"labeler: {shown!r} must be 1-64 characters of letters, digits and ._@-")
    return labeler


def _page_html() -> tuple[bytes, str]:
    """The labeling page and a Content-Security-Policy that allows only its own code.

    The page's one script and one style block are inline, so the policy names them by
    hash: even if escaping failed somewhere, injected markup could not run scripts or
    load anything.
    """
    page = resources.files("rlhf_jax.feedback").joinpath("static/label.html").read_text(
        encoding="utf-8")

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.DOTALL)
        digests = (hashlib.sha256(b.encode("utf-8")).digest() for b in blocks)
        return " ".join(f"'sha256-{base64.b64encode(d).decode()}'" for d in digests)

    csp = (f"default-src 'none'; script-src {hashes('script')}; "
           f"style-src {hashes('style')}; connect-src 'self'; base-uri 'none'; "
           "form-action 'none'; frame-ancestors 'none'")
    return page.encode("utf-8"), csp


class LabelServer(ThreadingHTTPServer):
    """An HTTP server holding the store, the default labeler and the shuffling RNG."""

    daemon_threads = True  # a browser's open keep-alive connection must not block exit

    def __init__(self, address: tuple[str, int], store: ComparisonStore,
                 labeler: str | None = None, seed: int | None = None, token: str | None = None):
        if not is_loopback(address[0]) and not token:
            raise ValueError(f"--host {address[0]} is not a loopback address: pass --token (or set {TOKEN_ENV}) "
                             "so that only people given the token can read and write labels")
        if labeler is not None:
            check_labeler(labeler)
        self.token = token or None
        super().__init__(address, _Handler)
        self.store = store
        self.default_labeler = labeler
        self.page, self.csp = _page_html()
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.server_address[0]}:{self.port}/"

    def shuffled_order(self, k: int) -> list[int]:
        with self._rng_lock:  # random.Random is not safe to share across threads
            order = list(range(k))
            self._rng.shuffle(order)
            return order

    def stop(self) -> None:
        """Stops serving (and joins the thread if `start_in_thread` started it)."""
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join()


class _Handler(BaseHTTPRequestHandler):
    server: LabelServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        # One line per request on stderr is noise in tests; errors still reach the client.
        pass

    def _send(self, status: int, body: bytes, content_type: str,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False).encode(),
                   "application/json; charset=utf-8")

    def _authorised(self) -> bool:
        """Every /api/ request carries the server's token, when it has one (else 403)."""
        token = self.server.token
        if token is None or hmac.compare_digest(self.headers.get("X-Label-Token", ""), token):
            return True
        self.close_connection = True
        self._json(HTTPStatus.FORBIDDEN, {"error": "X-Label-Token: missing or wrong (open the link with ?token=)"})
        return False

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path.startswith("/api/") and not self._authorised():
            return
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if url.path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, self.server.page, "text/html; charset=utf-8",
                       {"Content-Security-Policy": self.server.csp})
        elif url.path == "/api/config":
            self._json(HTTPStatus.OK, {"labeler": self.server.default_labeler})
        elif url.path == "/api/next":
            labeler = (query.get("labeler") or self.server.default_labeler or "").strip()
            if not labeler:
                self._json(HTTPStatus.BAD_REQUEST, {"error": "labeler: missing"})
                return
            try:
                check_labeler(labeler)
            except ValueError as e:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
                return
            todo = self.server.store.unlabeled(labeler)
            if not todo:
                self._json(HTTPStatus.OK, {"item": None, "remaining": 0})
                return
            item = todo[0]
            order = self.server.shuffled_order(len(item["responses"]))
            self._json(HTTPStatus.OK, {
                "item": {
                    "id": item["id"],
                    "prompt": item["prompt"],
                    "responses": [{"index": i, "text": item["responses"][i]} for i in order],
                },
                "remaining": len(todo),
            })
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such path {url.path}"})

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        # On the refusals below the body stays unread, so the connection cannot be reused:
        # its next bytes would be parsed as a request.
        if url.path != "/api/label":
            self.close_connection = True
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such path {url.path}"})
            return
        if not self._authorised():
            return
        # Requiring a JSON content type forces a CORS preflight on cross-site requests, so
        # another web page open in the same browser cannot post labels here.
        if self.headers.get_content_type() != "application/json":
            self.close_connection = True
            self._json(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                       {"error": "Content-Type must be application/json"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True
            self._json(HTTPStatus.BAD_REQUEST if length < 0 else
                       HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                       {"error": f"Content-Length: must be 0 to {MAX_BODY_BYTES} bytes"})
            return
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            self._json(HTTPStatus.BAD_REQUEST, {"error": f"body: invalid JSON ({e})"})
            return
        if not isinstance(body, dict):
            self._json(HTTPStatus.BAD_REQUEST, {"error": "body: expected a JSON object"})
            return
        unknown = set(body) - {"item_id", "labeler", "kind", "ranking"}
        if unknown:
            self._json(HTTPStatus.BAD_REQUEST, {"error": f"body: unknown field(s) "
                                                         f"{sorted(unknown)}"})
            return
        labeler = body.get("labeler") or self.server.default_labeler
        try:
            check_labeler(labeler)
            label = self.server.store.add_label(body.get("item_id"), labeler,
                                                body.get("kind"), body.get("ranking"))
        except ValueError as e:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
            return
        self._json(HTTPStatus.OK, {"label": label})


def make_server(store: ComparisonStore | str, host: str = "127.0.0.1", port: int = 0,
                labeler: str | None = None, seed: int | None = None, token: str | None = None) -> LabelServer:
    """Builds (binds, does not start) a server; port 0 picks a free port.

    `seed` fixes the order responses are shown in, for reproducible tests.
    """
    if not isinstance(store, ComparisonStore):
        store = ComparisonStore(store)
    return LabelServer((host, port), store, labeler=labeler, seed=seed, token=token)


def start_in_thread(store: ComparisonStore | str, host: str = "127.0.0.1", port: int = 0,
                    labeler: str | None = None, seed: int | None = None, token: str | None = None) -> LabelServer:
    """Starts a server in a daemon thread and returns it once it accepts connections.

    The bound port is `server.port` (port 0 picks a free one), the address `server.url`;
    `server.stop()` shuts it down.
    """
    server = make_server(store, host, port, labeler, seed, token)
    # Binding happened in the constructor, so connections queue up even before the loop
    # runs; nothing to wait for.
    # A short poll interval keeps stop() fast; shutdown waits for the loop's next poll.
    server._thread = threading.Thread(target=server.serve_forever, args=(0.05,),
                                      name="label-server", daemon=True)
    server._thread.start()
    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True, help="comparison store directory")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind; anything but loopback needs --token")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                        help=f"shared secret every request must carry (default: ${TOKEN_ENV})")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--labeler", default=None,
                        help="default labeler name (the page can override it)")
    args = parser.parse_args(argv)
    try:
        server = make_server(args.store, args.host, args.port, args.labeler, token=args.token)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    link = server.url + (f"?token={args.token}" if args.token else "")
    print(f"labeling {len(server.store)} items from {args.store} at {link}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
