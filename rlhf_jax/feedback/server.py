"""A labeling web page over a ComparisonStore, and a chat page that adds to it; standard library only.

    python -m rlhf_jax.feedback.server --store DIR [--port 8000] [--labeler NAME]
    python -m rlhf_jax.feedback.server --chat --model PATH --store DIR [--two-prob 0.25]
    python -m rlhf_jax.feedback.server --store DIR --export prefs.jsonl [--model PATH]

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

An item whose prompt is a conversation (a chat comparison) comes with "messages" (the list)
and "prompt" (the same as text, one "role: content" block per message).

With `--chat`, / is the chat page (the labeling page moves to /label): people talk to the
policy (`--model`: an HF directory, a stage's workdir/model, or a .gguf file), the answer
streams in, and a turn shows two sampled answers side by side when asked (or at random, with
probability `--two-prob`); the choice (or tie) is stored with the conversation so far as the
item's `messages` prompt (`rlhf_jax.chat.service`). Endpoints:

- GET  /api/config  → also {"chat": the chat settings}
- POST /api/chat    {"conversation": id or null (a new one), "text", "two": true/false/null
                    (null: drawn with --two-prob)} → a stream of JSON lines (chunked):
                    {"conversation", "two"}, then {"delta"} or {"answer": 0|1, "delta"} as
                    text is produced, then {"done": true, "text" | "answers" + "item_id",
                    "notice"} or {"error"}
- POST /api/choose  {"conversation", "item_id", "choice": 0|1|"tie", "labeler"} →
                    {"label"}; the conversation continues with the chosen answer

`--export OUT` writes the store's preferences (`ComparisonStore.export_preferences`) and
exits; chat comparisons are rendered with the chat template of `--model` (default: the
policy the chat recorded), the format the RM, DPO and PPO stages read.

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
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import parse_qs, urlsplit

from rlhf_jax.chat import options
from rlhf_jax.feedback.store import ComparisonStore

if TYPE_CHECKING:  # the labeling page alone needs no JAX: main() imports the chat side for --chat
    from rlhf_jax.chat.service import ChatService

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


def check_host(host: str, token: str | None) -> None:
    """Anything but a loopback address needs a token (ValueError saying so)."""
    if not is_loopback(host) and not token:
        raise ValueError(f"--host {host} is not a loopback address: pass --token (or set {TOKEN_ENV}) "
                         "so that only people given the token can read and write labels")


def check_labeler(labeler) -> str:
    """A labeler id as stored in every label: short and of safe characters, or ValueError."""
    if not isinstance(labeler, str) or not LABELER_ID.fullmatch(labeler):
        shown = labeler[:40] + "..." if isinstance(labeler, str) and len(labeler) > 40 else labeler
        raise ValueError(f"labeler: {shown!r} must be 1-64 characters of letters, digits and ._@-")
    return labeler


def display_prompt(prompt: str | list) -> str:
    """A prompt as the pages show it: a conversation as "role: content" blocks."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def _page_html(name: str = "label.html") -> tuple[bytes, str]:
    """A page (the labeling or the chat page) and a Content-Security-Policy that allows only
    its own code.

    The page's one script and one style block are inline, so the policy names them by
    hash: even if escaping failed somewhere, injected markup could not run scripts or
    load anything.
    """
    page = resources.files("rlhf_jax.feedback").joinpath(f"static/{name}").read_text(encoding="utf-8")

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
                 labeler: str | None = None, seed: int | None = None, token: str | None = None,
                 chat: ChatService | None = None):
        check_host(address[0], token)
        if labeler is not None:
            check_labeler(labeler)
        self.token = token or None
        super().__init__(address, _Handler)
        self.store = store
        self.default_labeler = labeler
        self.page, self.csp = _page_html()
        self.chat = chat
        self.chat_page = _page_html("chat.html") if chat is not None else None
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
        chat = self.server.chat
        if url.path in ("/", "/index.html") or (chat is not None and url.path == "/label"):
            page, csp = (self.server.chat_page if chat is not None and url.path != "/label"
                         else (self.server.page, self.server.csp))
            self._send(HTTPStatus.OK, page, "text/html; charset=utf-8", {"Content-Security-Policy": csp})
        elif url.path == "/api/config":
            config = {"labeler": self.server.default_labeler}
            if chat is not None:
                config["chat"] = chat.config()
            self._json(HTTPStatus.OK, config)
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
            shown = {
                "id": item["id"],
                "prompt": display_prompt(item["prompt"]),
                "responses": [{"index": i, "text": item["responses"][i]} for i in order],
            }
            if not isinstance(item["prompt"], str):
                shown["messages"] = item["prompt"]
            self._json(HTTPStatus.OK, {"item": shown, "remaining": len(todo)})
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such path {url.path}"})

    def _read_json(self, fields: set[str]) -> dict | None:
        """The request's JSON object, or None after answering with the error."""
        # Requiring a JSON content type forces a CORS preflight on cross-site requests, so
        # another web page open in the same browser cannot post here.
        if self.headers.get_content_type() != "application/json":
            self.close_connection = True
            self._json(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                       {"error": "Content-Type must be application/json"})
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True
            self._json(HTTPStatus.BAD_REQUEST if length < 0 else
                       HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                       {"error": f"Content-Length: must be 0 to {MAX_BODY_BYTES} bytes"})
            return None
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            self._json(HTTPStatus.BAD_REQUEST, {"error": f"body: invalid JSON ({e})"})
            return None
        if not isinstance(body, dict):
            self._json(HTTPStatus.BAD_REQUEST, {"error": "body: expected a JSON object"})
            return None
        unknown = set(body) - fields
        if unknown:
            self._json(HTTPStatus.BAD_REQUEST, {"error": f"body: unknown field(s) "
                                                         f"{sorted(unknown)}"})
            return None
        return body

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        routes: dict[str, tuple[set[str], Callable[[dict], None]]] = {
            "/api/label": ({"item_id", "labeler", "kind", "ranking"}, self._post_label)}
        if self.server.chat is not None:
            routes["/api/chat"] = ({"conversation", "text", "two"}, self._post_chat)
            routes["/api/choose"] = ({"conversation", "item_id", "choice", "labeler"}, self._post_choose)
        # On the refusals below the body stays unread, so the connection cannot be reused:
        # its next bytes would be parsed as a request.
        if url.path not in routes:
            self.close_connection = True
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such path {url.path}"})
            return
        if not self._authorised():
            return
        fields, handler = routes[url.path]
        body = self._read_json(fields)
        if body is not None:
            handler(body)

    def _post_label(self, body: dict) -> None:
        labeler = body.get("labeler") or self.server.default_labeler
        try:
            check_labeler(labeler)
            label = self.server.store.add_label(body.get("item_id"), labeler,
                                                body.get("kind"), body.get("ranking"))
        except ValueError as e:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
            return
        self._json(HTTPStatus.OK, {"label": label})

    def _post_chat(self, body: dict) -> None:
        from rlhf_jax.chat.service import ConversationBusy  # only reached with --chat

        conversation, text, two = body.get("conversation"), body.get("text"), body.get("two")
        if conversation is not None and not isinstance(conversation, str):
            self._json(HTTPStatus.BAD_REQUEST, {"error": "conversation: expected a string or null"})
            return
        if two is not None and not isinstance(two, bool):
            self._json(HTTPStatus.BAD_REQUEST, {"error": "two: expected true, false or null"})
            return
        started = False

        def emit(event: dict) -> None:
            # The status line goes out with the first event: errors found before it (a
            # busy or unknown conversation, an empty message) are plain JSON replies.
            nonlocal started
            if not started:
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", "application/x-ndjson; charset=utf-8")
                self.send_header("Transfer-Encoding", "chunked")
                self.send_header("Cache-Control", "no-store")
                self.send_header("X-Content-Type-Options", "nosniff")
                self.end_headers()
                started = True
            data = (json.dumps(event, ensure_ascii=False) + "\n").encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

        try:
            emit(self.server.chat.turn(conversation, text, two=two, on_event=emit))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the reader left; the session is unchanged
            return
        except ValueError as e:
            if not started:
                status = HTTPStatus.CONFLICT if isinstance(e, ConversationBusy) else HTTPStatus.BAD_REQUEST
                self._json(status, {"error": str(e)})
                return
            emit({"error": str(e)})
        self.wfile.write(b"0\r\n\r\n")

    def _post_choose(self, body: dict) -> None:
        from rlhf_jax.chat.service import ConversationBusy  # only reached with --chat

        labeler = body.get("labeler") or self.server.default_labeler
        try:
            check_labeler(labeler)
            if not isinstance(body.get("conversation"), str) or not isinstance(body.get("item_id"), str):
                raise ValueError("conversation, item_id: expected the strings /api/chat gave")
            label = self.server.chat.choose(body["conversation"], body["item_id"], body.get("choice"), labeler)
        except ValueError as e:
            status = HTTPStatus.CONFLICT if isinstance(e, ConversationBusy) else HTTPStatus.BAD_REQUEST
            self._json(status, {"error": str(e)})
            return
        self._json(HTTPStatus.OK, {"label": label})


def make_server(store: ComparisonStore | str, host: str = "127.0.0.1", port: int = 0,
                labeler: str | None = None, seed: int | None = None, token: str | None = None,
                chat: ChatService | None = None) -> LabelServer:
    """Builds (binds, does not start) a server; port 0 picks a free port.

    `seed` fixes the order responses are shown in, for reproducible tests. `chat` (a
    `ChatService` over the same store) adds the chat page.
    """
    if not isinstance(store, ComparisonStore):
        store = ComparisonStore(store)
    return LabelServer((host, port), store, labeler=labeler, seed=seed, token=token, chat=chat)


def start_in_thread(store: ComparisonStore | str, host: str = "127.0.0.1", port: int = 0,
                    labeler: str | None = None, seed: int | None = None, token: str | None = None,
                    chat: ChatService | None = None) -> LabelServer:
    """Starts a server in a daemon thread and returns it once it accepts connections.

    The bound port is `server.port` (port 0 picks a free one), the address `server.url`;
    `server.stop()` shuts it down.
    """
    server = make_server(store, host, port, labeler, seed, token, chat)
    # Binding happened in the constructor, so connections queue up even before the loop
    # runs; nothing to wait for.
    # A short poll interval keeps stop() fast; shutdown waits for the loop's next poll.
    server._thread = threading.Thread(target=server.serve_forever, args=(0.05,),
                                      name="label-server", daemon=True)
    server._thread.start()
    return server


def _chat_service(args: argparse.Namespace, store: ComparisonStore) -> ChatService:
    # Imported here: the labeling page alone must start without JAX.
    from rlhf_jax.chat.engine import ChatModel
    from rlhf_jax.chat.service import ChatService

    model = ChatModel(args.model, **options.model_kwargs(args))
    return ChatService(model, store, two_prob=args.two_prob, seed=args.seed, policy_name=args.model,
                       **options.session_kwargs(args))


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
    parser.add_argument("--chat", action="store_true",
                        help="serve the chat page (needs --model): conversations whose two-answer turns "
                             "become comparisons in --store")
    parser.add_argument("--two-prob", type=float, default=0.25,
                        help="with --chat: probability that a turn shows two answers to choose from")
    parser.add_argument("--export", metavar="OUT", default=None,
                        help="write the store's preferences as JSONL (what the RM/DPO stages read) and exit")
    parser.add_argument("--export-format", choices=("pairs", "ranked"), default="pairs")
    options.add_chat_args(parser)
    args = parser.parse_args(argv)
    if args.export:
        from rlhf_jax.chat.export import export_store  # the labeling page alone needs no JAX

        try:
            counts = export_store(ComparisonStore(args.store), args.export, model=args.model,
                                  tokenizer=args.tokenizer, format=args.export_format)
        except (ValueError, FileNotFoundError) as e:
            parser.exit(2, f"error: {e}\n")
        print(f"exported {counts['rows']} rows ({counts['pairs']} pairs from {counts['labels']} labels; "
              f"{counts['no_preference']} ties/skips) to {args.export}", flush=True)
        return
    if args.chat and not args.model:
        parser.exit(2, "error: --chat needs --model (an HF directory, a stage's workdir/model or a .gguf file)\n")
    try:
        check_host(args.host, args.token)  # before the model loads: a refusal should not wait for it
        store = ComparisonStore(args.store)
        chat = _chat_service(args, store) if args.chat else None
        server = make_server(store, args.host, args.port, args.labeler, token=args.token, chat=chat)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"error: {e}\n")
    link = server.url + (f"?token={args.token}" if args.token else "")
    if chat is not None:
        print(f"chat with {args.model} at {link} (comparisons go to {args.store}; labeling page at "
              f"{server.url}label)", flush=True)
    else:
        print(f"labeling {len(server.store)} items from {args.store} at {link}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
