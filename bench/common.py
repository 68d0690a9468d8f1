"""What every benchmark shares: where the data is, and how a result table is recorded (printed,
written as `bench/results/<name>-<stamp>.csv`
(or under $BENCH_RESULTS), and with `--benchmarks` put at the top of its section
of BENCHMARKS.md with the date, machine, command and commit; older tables stay below it)."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SHARED_DATA", str(ROOT.parent / "shared" / "data")))


def default_data() -> str:
    return os.environ.get("SEARCH_DATA", str(SHARED / "pneumoniamnist" / "pneumoniamnist.npz"))


def machine() -> str:
    import torch
    if torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES") != "":
        return torch.cuda.get_device_name(0)
    return f"CPU {os.cpu_count()} cores ({platform.processor() or platform.machine()})"


def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return (out.stdout.strip() or "unknown") + ("+changes" if dirty else "")


def clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def to_markdown(table: pd.DataFrame, *, settings: str, elapsed: float) -> str:
    lines = [f"### {time.strftime('%Y-%m-%d')}, commit {commit()}, {machine()}, total {clock(elapsed)}", "",
             f"Command: `python {' '.join(sys.argv)}`", "", f"Settings: {settings}", "",
             "| " + " | ".join(map(str, table.columns)) + " |", "|" + " --- |" * len(table.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def finish(name: str, table: pd.DataFrame, *, settings: str, started: float, benchmarks: bool,
           section: str) -> str:
    """Print `table`, write its CSV, and with `benchmarks` add it to `section` of BENCHMARKS.md."""
    out = Path(os.environ.get("BENCH_RESULTS", ROOT / "bench" / "results"))
    out.mkdir(parents=True, exist_ok=True)
    csv = out / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.csv"
    table.to_csv(csv, index=False)
    markdown = to_markdown(table, settings=settings, elapsed=time.time() - started)
    print(f"\n{markdown}\nwritten: {csv}")
    if benchmarks:
        mark = f"<!-- {name}: newest first; bench/{name}.py --benchmarks adds a table here -->"
        path = ROOT / "BENCHMARKS.md"
        text = path.read_text()
        if mark not in text:
            text = text.rstrip("\n") + f"\n\n## {section}\n\n{mark}\n"
        path.write_text(text.replace(mark, f"{mark}\n\n{markdown}", 1))
    return markdown
