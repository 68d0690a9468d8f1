"""What every benchmark shares: where the data is, and how a result table is recorded (printed,
written as `bench/results/<name>-<stamp>.csv`
(or under $BENCH_RESULTS), and with `--benchmarks` put at the top of its section
of BENCHMARKS.md with the date, machine, command and commit; older tables stay below it)."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from core.formatting import clock  # noqa: F401  (the benchmarks' tables write their walls with it)

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SHARED_DATA", str(ROOT.parent / "shared" / "data")))


def default_data() -> str:
    return os.environ.get("SEARCH_DATA", str(SHARED / "pneumoniamnist" / "pneumoniamnist.npz"))


def machine() -> str:
    import torch
    if torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES") != "":
        return torch.cuda.get_device_name(0)
    return f"CPU {os.cpu_count()} cores ({platform.processor() or platform.machine()})"


def commit(root: Path = ROOT) -> str:
    """The commit checked out at `root`, with "+changes" when the tree differs from it (tracked or new
    files, outside bench/results/, which the benchmarks themselves append to)."""
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    return (out.stdout.strip() or "unknown") + ("+changes" if changes(root) else "")


def changes(root: Path = ROOT) -> list[str]:
    """The paths where the tree at `root` differs from its commit, bench/results/ left out."""
    status = subprocess.run(["git", "status", "--porcelain", "--", ".", ":(exclude)bench/results"], cwd=root,
                            capture_output=True, text=True).stdout
    return [line[3:] for line in status.splitlines() if line.strip()]


def provenance(*, allow_dirty: bool = False, root: Path = ROOT) -> dict:
    """What a benchmark row carries of where it came from: the commit, the CPU model, cores and GPU,
    and the library versions.

    Raises:
        SystemExit: the tree has changes its commit does not hold, unless `allow_dirty` (then the
            commit reads "<hash>+changes"): a row must name code that can be checked out again.
    """
    dirty = changes(root)
    if dirty and not allow_dirty:
        raise SystemExit(f"the tree at {root} has changes no commit holds ({', '.join(dirty[:5])}"
                         f"{', ...' if len(dirty) > 5 else ''}): commit them first, or pass --allow-dirty to "
                         f"mark the rows '+changes'")
    import torch
    from importlib.metadata import version

    from trainables.execution import device_name
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES") != "" else ""
    return {"commit": commit(root), "cpu": device_name(torch.device("cpu")), "cores": os.cpu_count(), "gpu": gpu,
            "versions": " ".join(f"{name} {version(name)}" for name in ("torch", "timm", "ray", "optuna"))}


def add_arm_flags(parser, *, results: str, work: str) -> None:
    """The flags every benchmark of search arms takes: `--out` (its rows, `bench/results/<results>-<date>.csv`),
    `--work` (its experiments, under ~/.cache/lung-search-bench/<work>), `--allow-dirty`, `--benchmarks`,
    and more `search.run` flags for every arm after `--`."""
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / f"{results}-{time.strftime('%Y%m%d')}.csv"))
    parser.add_argument("--work", default=str(Path(f"~/.cache/lung-search-bench/{work}").expanduser()))
    parser.add_argument("--allow-dirty", action="store_true", help="run from a tree with uncommitted changes (rows marked)")
    parser.add_argument("--benchmarks", action="store_true", help="add the table to BENCHMARKS.md")
    parser.add_argument("extra", nargs="*", help="more search.run flags for every arm (after --)")


def run_search(folder: Path, flags: list[str], label: str) -> None:
    """One arm: `python -m search.run FLAGS --storage <folder's parent> --name <folder's name>`, its
    output in `<folder>.log` beside it. A folder left by an arm cut short is removed first: an arm runs
    whole, its budget is its measure. A failed arm ends the benchmark with a line naming its log."""
    shutil.rmtree(folder, ignore_errors=True)
    command = [sys.executable, "-m", "search.run", *flags, "--storage", str(folder.parent), "--name", folder.name]
    print(f"[{time.strftime('%H:%M:%S')}] {label}: {' '.join(command[1:])}", flush=True)
    log = folder.parent / f"{folder.name}.log"
    with open(log, "w") as out:
        done = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"{label} failed ({done.returncode}); see {log}")


def to_markdown(table: pd.DataFrame, *, settings: str, elapsed: float) -> str:
    lines = [f"### {time.strftime('%Y-%m-%d')}, commit {commit()}, {machine()}, total {clock(elapsed)}", "",
             f"Command: `python -m bench.{Path(sys.argv[0]).stem} {' '.join(sys.argv[1:])}`", "", f"Settings: {settings}", "",
             "| " + " | ".join(map(str, table.columns)) + " |", "|" + " --- |" * len(table.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def results_csv(name: str) -> Path:
    """`bench/results/<name>-<date>-<time>.csv` (or under $BENCH_RESULTS), its folder made."""
    out = Path(os.environ.get("BENCH_RESULTS", ROOT / "bench" / "results"))
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.csv"


def finish(name: str, table: pd.DataFrame, *, settings: str, started: float, benchmarks: bool,
           section: str, csv: Path | None = None) -> str:
    """Print `table`, write its CSV (`csv`: the one its rows were written to as they landed), and with
    `benchmarks` add it to `section` of BENCHMARKS.md."""
    csv = csv or results_csv(name)
    table.to_csv(csv, index=False)
    markdown = to_markdown(table, settings=settings, elapsed=time.time() - started)
    print(f"\n{markdown}\nwritten: {csv}")
    if benchmarks:
        mark = f"<!-- {name}: newest first; bench/{Path(sys.argv[0]).stem}.py --benchmarks adds a table here -->"
        path = ROOT / "BENCHMARKS.md"
        text = path.read_text()
        if mark not in text:
            text = text.rstrip("\n") + f"\n\n## {section}\n\n{mark}\n"
        path.write_text(text.replace(mark, f"{mark}\n\n{markdown}", 1))
    return markdown
