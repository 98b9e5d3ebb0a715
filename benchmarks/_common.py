"""What the benchmark scripts share: the environment JAX must see before it starts, the
machine's description, and writing one section of BENCHMARKS.md.

Import this module before `jax`: XLA reads its flags when JAX starts, so `--threads 1`
(the default) is applied here, from the command line, before any script imports JAX.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


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
