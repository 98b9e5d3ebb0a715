"""What the benchmark scripts share: the environment JAX must see before it starts, the
machine's description, running one measurement in a fresh process, and writing one section
of BENCHMARKS.md.

Import this module before `jax`: XLA reads its flags when JAX starts, so `--threads 1`
(the default) is applied here, from the command line, before any script imports JAX.
"""

from __future__ import annotations

import argparse
import os
import platform
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def _threads_from_argv() -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--threads", type=int, default=1)
    return pre.parse_known_args()[0].threads


if _threads_from_argv() == 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()


def cpu_description() -> str:
    """'N CPU cores (model name)'."""
    cpu = platform.processor() or platform.machine()
    try:
        names = re.findall(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = names[0].strip() if names else cpu
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({cpu})"


def write_section(path: Path, name: str, body: str) -> None:
    """Replaces the section of benchmark `name` in BENCHMARKS.md (between its markers, so other
    sections are kept), creating the file if needed."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    section = f"{begin}\n{body}\n{end}"
    header = "# Benchmarks\n\nMeasured numbers only; each section says how to reproduce it.\n"
    text = path.read_text() if path.exists() else header
    if begin in text and end in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def command_line(script: str, argv: list[str] | None = None) -> str:
    """The command of this run (`script` with `argv`, default the process's arguments), as
    BENCHMARKS.md quotes it."""
    return f"python benchmarks/{Path(script).name}" + "".join(" " + shlex.quote(a) for a in (argv or sys.argv[1:]))


def provenance(command: str, machine: str, elapsed_s: float | None = None) -> str:
    """The "Command:" and "Machine:" paragraphs that say where a BENCHMARKS.md table came from."""
    took = f" The whole run took {elapsed_s:.0f} s." if elapsed_s is not None else ""
    return f"Command: `{command}`\n\nMachine: {machine}.{took}"


def run_in_fresh_process(script: str, flags: list[str], spec: dict, marker: str, what: str, **env_extra) -> dict:
    """Runs `script --worker SPEC` (plus `flags`) in a fresh Python process, without a
    persistent compilation cache (every measurement compiles from scratch), and returns the
    dict its worker printed on the line starting with `marker`; a failed worker raises with
    `what` and the tail of its output."""
    cmd = [sys.executable, str(Path(script).resolve()), *flags, "--worker", json.dumps(spec)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               TOKENIZERS_PARALLELISM="false", **env_extra)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith(marker):
            return json.loads(line[len(marker):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    raise RuntimeError(f"worker {what} failed (exit {proc.returncode}):\n" + "\n".join(tail))
