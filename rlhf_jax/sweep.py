"""Sweeps: a grid (and/or a list) of config overrides and seeds, run one after another here or
printed as one launch command per run for a cluster scheduler, then gathered into one table.

    python -m rlhf_jax.sweep --config experiments/quickstart.py --workdir runs/sweep_kl \\
        --grid ppo.ppo.kl_target=6.0,0 --seeds 0,1,2 --metrics gold_score_policy,kl_to_sft

Each run is `python -m rlhf_jax.main --config CONFIG --workdir WORKDIR/NAME --config.F=V ...` in a
fresh process; NAME derives from the overrides (`ppo.ppo.kl.adaptive=False,seed=1`). A run that
already finished (its run.json says so) is skipped. `--set FIELD=V` fixes a field for every run
(it is passed on, but kept out of the run names and the table). `--list FILE.json` adds runs given as a list
of {field: value} objects (crossed with --grid and --seeds). `--print` prints the commands
instead of running them; `--gather` only gathers. Gathering writes, in WORKDIR:
  runs.csv     one row per finished run: its overrides and every scalar of its summary.json
  sweep.md     mean ± std over seeds of --metrics for every setting of the other overrides
  sweep.png    those means with their std as error bars, one panel per metric
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

from rlhf_jax.train import workdir as workdir_lib

SEED_FIELD = "seed"


def _parse_value(text: str):
    """'3' -> 3, '1e-3' -> 0.001, 'True' -> True, anything else stays a string."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"True": True, "False": False, "None": None}.get(text, text)


def parse_grid(items: list[str]) -> dict[str, list]:
    """['a.b=1,2', 'c=x'] -> {'a.b': [1, 2], 'c': ['x']}."""
    grid = {}
    for item in items:
        field, sep, values = item.partition("=")
        if not sep or not field or not values:
            raise ValueError(f"--grid {item!r}: expected FIELD=V1,V2,...")
        grid[field] = [_parse_value(v) for v in values.split(",")]
    return grid


def expand(grid: dict[str, list], runs: list[dict] | None = None, seeds: list[int] | None = None) -> list[dict]:
    """Every combination of the grid's values, crossed with each listed run and each seed; the
    overrides of one run as {field: value}, in a stable order."""
    base = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else [{}]
    out = [{**r, **b} for r in (runs or [{}]) for b in base]
    if seeds:
        out = [{**o, SEED_FIELD: s} for o in out for s in seeds]
    return out


def run_name(overrides: dict) -> str:
    """A directory name from the overrides: 'lr=0.001,seed=1' (unsafe characters become '_')."""
    if not overrides:
        return "default"
    text = ",".join(f"{k}={v}" for k, v in overrides.items())
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", text)[:200]


def command(config: str, workdir: Path, overrides: dict, fixed: dict | None = None) -> list[str]:
    return [sys.executable, "-m", "rlhf_jax.main", "--config", config, "--workdir", str(workdir),
            *(f"--config.{k}={v}" for k, v in {**(fixed or {}), **overrides}.items())]


def _scalars(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def gather(workdir: Path, runs: list[dict], metrics: list[str]) -> tuple[list[dict], str]:
    """Reads every finished run's summary.json; writes runs.csv, sweep.md (and sweep.png when
    metrics are asked for); returns (rows, markdown)."""
    rows = []
    for overrides in runs:
        path = workdir / run_name(overrides) / "summary.json"
        if path.exists():
            rows.append({"run": run_name(overrides), **overrides, **_scalars(json.loads(path.read_text()))})
    if rows:
        columns = list(dict.fromkeys(k for r in rows for k in r))
        with (workdir / "runs.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    fields = [k for k in dict.fromkeys(k for o in runs for k in o) if k != SEED_FIELD]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in fields), []).append(r)
    metrics = metrics or sorted({k for r in rows for k in _scalars(r)} - set(fields) - {SEED_FIELD})[:6]
    header = [*fields, "seeds", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    stats = []
    for key, members in groups.items():
        cells = []
        row_stats = []
        for m in metrics:
            vals = [r[m] for r in members if isinstance(r.get(m), (int, float))]
            mean = sum(vals) / len(vals) if vals else math.nan
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
            cells.append(f"{mean:.3f} ± {std:.3f}" if len(vals) > 1 else (f"{mean:.3f}" if vals else "-"))
            row_stats.append((mean, std))
        lines.append("| " + " | ".join([*map(str, key), str(len(members)), *cells]) + " |")
        stats.append((key, row_stats))
    text = "\n".join(lines)
    (workdir / "sweep.md").write_text(text + "\n")
    if stats and metrics:
        _plot(workdir / "sweep.png", fields, metrics, stats)
    return rows, text


def _plot(out: Path, fields: list[str], metrics: list[str], stats) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.5), squeeze=False)
    labels = [",".join(f"{f.split('.')[-1]}={v}" for f, v in zip(fields, key)) or "default" for key, _ in stats]
    for i, (ax, metric) in enumerate(zip(axes[0], metrics)):
        ax.bar(range(len(stats)), [s[i][0] for _, s in stats], yerr=[s[i][1] for _, s in stats], capsize=3)
        ax.set_xticks(range(len(stats)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(metric)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rlhf_jax.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="config file (configs/*.py or experiments/*.py[:arg])")
    ap.add_argument("--workdir", required=True, help="the sweep's directory: one subdirectory per run")
    ap.add_argument("--grid", action="append", default=[], help="FIELD=V1,V2,... (repeatable: the grid is crossed)")
    ap.add_argument("--set", action="append", default=[], help="FIELD=V for every run (not in names or the table)")
    ap.add_argument("--list", help="a JSON file: a list of {field: value} runs, crossed with --grid and --seeds")
    ap.add_argument("--seeds", default="", help="comma-separated seeds (the `seed` field)")
    ap.add_argument("--metrics", default="", help="comma-separated summary.json keys for the table and plot")
    ap.add_argument("--print", action="store_true", help="print one launch command per unfinished run and exit")
    ap.add_argument("--gather", action="store_true", help="only gather the finished runs")
    args = ap.parse_args(argv)
    try:
        runs = json.loads(Path(args.list).read_text()) if args.list else None
        if runs is not None and not (isinstance(runs, list) and all(isinstance(r, dict) for r in runs)):
            raise ValueError(f"--list {args.list}: expected a JSON list of {{field: value}} objects")
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        overrides = expand(parse_grid(args.grid), runs, seeds)
        fixed = {}
        for item in args.set:
            (field, values), = parse_grid([item]).items()
            if len(values) != 1:
                raise ValueError(f"--set {item!r}: one value (use --grid for several)")
            fixed[field] = values[0]
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    metrics = [m for m in args.metrics.split(",") if m]
    if not args.gather:
        for i, o in enumerate(overrides):
            run_dir = workdir / run_name(o)
            cmd = command(args.config, run_dir, o, fixed)
            if workdir_lib.finished(run_dir):
                if not args.print:
                    print(f"[sweep] {i + 1}/{len(overrides)} {run_dir.name}: finished, skipped")
                continue
            if args.print:
                print(shlex.join(cmd))
                continue
            print(f"[sweep] {i + 1}/{len(overrides)} {run_dir.name} ...", flush=True)
            out = subprocess.run(cmd, capture_output=True, text=True)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "stdout.log").write_text(out.stdout + out.stderr)
            if out.returncode != 0:
                last = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
                print(f"[sweep] {run_dir.name} failed (exit {out.returncode}): {last}; log: {run_dir / 'stdout.log'}")
        if args.print:
            return 0
    rows, text = gather(workdir, overrides, metrics)
    print(f"\n{len(rows)} of {len(overrides)} runs finished; {workdir / 'runs.csv'}, {workdir / 'sweep.md'}\n")
    print(text)
    return 0 if len(rows) == len(overrides) else 1


if __name__ == "__main__":
    sys.exit(main())
