"""Chat with a policy in the terminal.

    python -m rlhf_jax.chat --model runs/quickstart/round_1/ppo/model --template plain
    python -m rlhf_jax.chat --model model.gguf --system "Be brief." --temperature 0.7
    printf 'Hello!\\n/two What is RLHF?\\n2\\nThanks.\\n' | python -m rlhf_jax.chat --model DIR --store DIR

Each line is a message, answered as it is produced. Commands:

  /reset        start a new conversation (the finished one goes to the history file)
  /system TEXT  set the system message (/system alone removes it)
  /temp X       set the temperature (0 = greedy)
  /two [TEXT]   two answers to TEXT (or to the next message): pick the better one (1 or 2),
                t for a tie or s to skip; the comparison goes to --store with the
                conversation so far as its prompt, and the chat goes on with the pick
  /help, /quit

When stdin is not a terminal the lines are read from it (a script; a /two choice is the next
line) and echoed, so the transcript reads as a conversation. The conversation is appended to
--history as a `messages` row (what SFT reads) on /reset and at exit.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path
from typing import IO, Callable, Iterator

from rlhf_jax.chat import options
from rlhf_jax.chat.session import ChatSession, save_comparison
from rlhf_jax.feedback.server import check_labeler
from rlhf_jax.feedback.store import ComparisonStore

DEFAULT_HISTORY = "~/.rlhf_jax/chat_history.jsonl"
HELP = __doc__.split("Commands:\n\n", 1)[1].split("\n\nWhen", 1)[0]
_CHOICES = {"1": 0, "2": 1, "t": "tie", "s": "skip"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rlhf_jax.chat", description=__doc__.split("\n\n")[0])
    options.add_chat_args(parser)
    parser.add_argument("--store", default=None, help="comparison store for /two (a directory)")
    parser.add_argument("--labeler", default=None, help="your id in stored comparisons (default: your user name)")
    parser.add_argument("--history", default=DEFAULT_HISTORY, help="JSONL file the conversations are appended to "
                                                                   "('' = keep none)")
    args = parser.parse_args(argv)
    if not args.model:
        parser.error("--model is required (an HF directory, a stage's workdir/model or a .gguf file)")
    return args


class TerminalChat:
    """The command loop over a `ChatSession`, reading lines from `lines` and writing to `out`."""

    def __init__(self, session, lines: Iterator[str], out: IO[str], *, echo: bool, store=None,
                 labeler: str | None = None, history: str = "", err: IO[str] = sys.stderr):
        self.session, self.lines, self.out, self.err = session, lines, out, err
        self.echo, self.store, self.labeler, self.history = echo, store, labeler, history
        self.two_next = False

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def read(self, prompt: str) -> str | None:
        if not self.echo:
            self.write(prompt)
        line = next(self.lines, None)
        if line is not None and self.echo:
            self.write(prompt + line + "\n")
        return line

    def save_history(self) -> None:
        if not self.history or not any(m["role"] == "assistant" for m in self.session.messages):
            return
        path = Path(self.history).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(self.session.transcript(), ensure_ascii=False) + "\n")
        self.err.write(f"history saved to {path}\n")

    def run(self) -> None:
        while True:
            line = self.read("you> ")
            if line is None:
                break
            line = line.strip()
            if not line:
                continue
            try:
                if line.startswith("/"):
                    if not self.command(line):
                        break
                elif self.two_next:
                    self.two_next = False
                    self.two(line)
                else:
                    self.answer(line)
            except ValueError as e:  # ContextError included: the conversation is unchanged
                self.err.write(f"error: {e}\n")
            except KeyboardInterrupt:
                self.err.write("\n(interrupted: the answer is dropped)\n")
        self.save_history()

    def command(self, line: str) -> bool:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            self.write(HELP + "\n")
        elif name == "/reset":
            self.save_history()
            self.session.reset()
            self.write("(new conversation)\n")
        elif name == "/system":
            self.session.set_system(arg or None)
            self.write(f"(system message {'set' if arg else 'removed'})\n")
        elif name == "/temp":
            try:
                value = float(arg)
            except ValueError:
                raise ValueError(f"/temp: expected a number, got {arg!r}") from None
            self.session.set_sampling(temperature=value)
            self.write(f"(temperature {value})\n")
        elif name == "/two":
            if self.store is None:
                raise ValueError("/two needs --store DIR (where the comparison is kept)")
            if arg:
                self.two(arg)
            else:
                self.two_next = True
                self.write("(the next message gets two answers)\n")
        else:
            raise ValueError(f"unknown command {name}; /help lists them")
        return True

    def _stream(self, head: str) -> Callable[[str], None]:
        self.write(head)
        return self.write

    def answer(self, text: str) -> None:
        write = self._stream("assistant> ")
        reply = self.session.send(text, on_text=write)
        self.write("\n")
        if reply.notice:
            self.err.write(f"({reply.notice})\n")

    def two(self, text: str) -> None:
        shown = [-1]

        def on_text(i: int, delta: str) -> None:
            if shown[0] != i:
                self.write(("\n" if i else "") + f"[{i + 1}] ")
                shown[0] = i
            self.write(delta)

        pair = self.session.send_two(text, on_text=on_text)
        for i in range(shown[0] + 1, 2):  # an answer that was empty printed nothing yet
            self.write(("\n" if i else "") + f"[{i + 1}] ")
        self.write("\n")
        if pair.notice:
            self.err.write(f"({pair.notice})\n")
        while True:
            line = self.read("which is better? 1, 2, t (tie), s (skip)> ")
            choice = _CHOICES.get((line or "s").strip().lower())
            if choice is not None:
                break
            self.err.write("answer 1, 2, t or s\n")
        item_id, _ = save_comparison(self.store, pair, choice=choice, labeler=self.labeler,
                                     meta=self.session.meta())
        self.session.choose(choice if choice in (0, 1) else 0)
        self.write(f"(comparison {item_id} stored: {choice if choice not in (0, 1) else choice + 1}; "
                   f"going on with answer {choice + 1 if choice in (0, 1) else 1})\n")


def _lines(stream: IO[str], interactive: bool) -> Iterator[str]:
    if interactive:
        while True:
            try:
                yield input()
            except EOFError:
                return
    else:
        for line in stream:
            yield line.rstrip("\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    interactive = sys.stdin.isatty()
    try:
        labeler = check_labeler(args.labeler or os.environ.get("USER") or getpass.getuser())
        store = ComparisonStore(args.store) if args.store else None
        session = ChatSession(args.model, seed=args.seed, **options.session_kwargs(args), **options.model_kwargs(args))
    except (ValueError, FileNotFoundError, TypeError) as e:  # a user's mistake: one line, status 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if interactive:
        print(f"chatting with {args.model} (context {session.model.max_context} tokens); /help lists the commands",
              file=sys.stderr)
    chat = TerminalChat(session, _lines(sys.stdin, interactive), sys.stdout, echo=not interactive, store=store,
                        labeler=labeler, history=args.history)
    try:
        chat.run()
    except KeyboardInterrupt:
        chat.save_history()
