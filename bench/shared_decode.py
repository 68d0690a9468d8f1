"""Two searches started one second apart on the same new folder of N PNGs, with one --data-cache:
the first decodes, the second waits on the key's lock and reuses the first one's entry.

    python -m bench.shared_decode --images 50000 --benchmarks

Each search is the real command (`--space tiny --backbones small_cnn`, one trial of one epoch on
`--subset 2000` images per split after decoding all N, no finalize). Printed and recorded: each
search's exit status, whether it decoded, waited or reused, its data set-up seconds
(`timings.json` `data_seconds`) and wall seconds; then the cache: its entries, whether each is
whole (its record, shape and row checksums agree), and any temporary folder left behind.

The folder (the same 64-96 px PNGs as bench/data_scale.py) is made once under --work and reused;
the cache and experiments are made fresh each run.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from bench.common import ROOT, commit, finish, machine
from data_scale import SUBSET, make_folder, read_all

from ingest.decode_cache import whole_entry


def search(folder: Path, cache: Path, storage: Path, name: str) -> list:
    command = [sys.executable, "-m", "search.run", "--space", "tiny", "--backbones", "small_cnn", "--data", str(folder),
               "--data-cache", str(cache), "--num-samples", "1", "--max-epochs", "1", "--folds", "1",
               "--weights", "random", "--no-finalize", "--no-stop-rule", "--storage", str(storage), "--name", name,
               "--subset", str(SUBSET)]
    log = open(storage.parent / f"{name}.log", "w")
    return [subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL), log,
            time.time()]


def measure(n: int, work: Path, gap: float) -> dict:
    folder = make_folder(work, n)
    read_all(folder)
    run = work / f"shared-decode-{n}"
    shutil.rmtree(run, ignore_errors=True)
    cache, storage = run / "cache", run / "experiments"
    storage.mkdir(parents=True)
    first = search(folder, cache, storage, "first")
    time.sleep(gap)
    second = search(folder, cache, storage, "second")
    row = {"images": n, "gap_s": gap}
    for name, (proc, log, started) in (("first", first), ("second", second)):
        proc.wait()
        log.close()
        output = (run / f"{name}.log").read_text()
        timings = storage / name / "timings.json"
        row[f"{name}_rc"] = proc.returncode
        row[f"{name}_waited"] = "another search is decoding these files" in output
        row[f"{name}_reused"] = "decoded images: reused" in output
        row[f"{name}_data_s"] = round(json.loads(timings.read_text())["data_seconds"], 1) if timings.is_file() else None
        row[f"{name}_wall_s"] = round(time.time() - started, 1)
        if proc.returncode:
            print(f"{name} search failed ({proc.returncode}):\n{output[-3000:]}")
    entries = [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]
    row["entries"] = len(entries)
    row["whole_entries"] = sum(whole_entry(p)[0] is not None for p in entries)
    row["temporary_folders"] = sum(p.is_dir() and p.name.startswith(".") for p in cache.iterdir())
    row.update(machine=machine(), commit=commit())
    shutil.rmtree(run, ignore_errors=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=50000)
    p.add_argument("--gap", type=float, default=1.0, help="seconds between the two starts")
    p.add_argument("--work", default=str(Path("~/.cache/lung-search-bench").expanduser()))
    p.add_argument("--benchmarks", action="store_true")
    args = p.parse_args()
    if args.images < 100:
        p.error(f"--images must be 100 or more, got {args.images}")
    if args.gap < 0:
        p.error(f"--gap must be 0 or more seconds, got {args.gap}")
    started = time.time()
    row = measure(args.images, Path(args.work), args.gap)
    shared = (row["first_rc"] == row["second_rc"] == 0 and row["entries"] == row["whole_entries"] == 1
              and row["temporary_folders"] == 0 and (row["first_reused"] != row["second_reused"]))
    print(f"one decode shared: {'yes' if shared else 'NO'}")
    finish("shared_decode", pd.DataFrame([row]), settings=f"`python -m bench.shared_decode --images {args.images}`",
           started=started, benchmarks=args.benchmarks, section="Two searches of the same new data (issue 38)")
    if not shared:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
