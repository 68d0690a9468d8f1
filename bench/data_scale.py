"""Both data paths at scale: a synthetic folder of N gray PNGs, decoded and searched with the
decoded images in memory (the Ray object store) and on disk (the cache, read batch by batch).

    python -m bench.data_scale --sizes 20000,200000 --benchmarks

Per N and path: decode wall and images/s with 1 and 2 Ray workers (the fastest of `--repeats` runs,
each on a fresh Ray of that many CPUs and a fresh cache, which a search decodes into on both paths;
the memory path then reads it back whole); a real one-trial search (`--space tiny --backbones
small_cnn`, one epoch on `--subset 2000` images per split after decoding all N, cold cache) with
the driver's peak RSS and the time from the command's start to the trial's first epoch; the same
search again with the cache warm and its data set-up (`timings.json` `data_seconds`: listing,
reading the cache, the audit) against the cold one (decoding and the audit); and a trial's
training throughput over a fixed number of steps on each path (small_cnn, batch 64, one thread,
rows drawn from the whole set).

The PNG folders (64-96 px, PneumoniaMNIST X-rays upscaled with a little noise so that no two files
are the same, two classes) are made once under
--work (default ~/.cache/lung-search-bench) and reused; nothing is committed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pandas as pd

from bench.common import SHARED, finish

PYTHON = sys.executable
# the searches decode every image but train their one epoch on this many images per split: the epoch over
# all of them would measure the CPU's compute (16 minutes for 160,000 images on one core), not the data path
SUBSET = 2000


def make_folder(root: Path, n: int) -> Path:
    """`root/pngs-<n>/<class>/<k>.png`, made once (a `complete` marker says it is whole)."""
    folder = root / f"pngs-{n}"
    if (folder / "complete").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    arrays = np.load(SHARED / "pneumoniamnist" / "pneumoniamnist.npz")
    images, labels = arrays["train_images"], arrays["train_labels"].ravel()
    jobs = [(folder, images, labels, start, min(start + 5000, n)) for start in range(0, n, 5000)]
    with Pool(2) as pool:
        pool.starmap(_write_pngs, jobs)
    (folder / "complete").write_text(str(n))
    return folder


def _write_pngs(folder: Path, images, labels, start: int, stop: int) -> None:
    from PIL import Image
    rng = np.random.default_rng(start)
    for k in range(start, stop):
        i = k % len(images)
        out = folder / ("normal", "pneumonia")[labels[i]] / f"{k:07d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        side = int(rng.integers(64, 97))
        image = np.asarray(Image.fromarray(images[i]).resize((side, side), Image.BILINEAR), np.int16)
        noise = rng.integers(-3, 4, image.shape)  # every file different: no exact duplicates for the audit to drop
        Image.fromarray(np.clip(image + noise, 0, 255).astype(np.uint8)).save(out)


def run_measured(command: list[str]) -> tuple[float, float, str]:
    """Run `command`; its wall seconds, its peak RSS in GB (sampled every 0.2 s), its output."""
    started, peak = time.time(), 0
    with open(os.devnull, "rb") as null:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=null, text=True)
        lines = []
        import threading
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        while proc.poll() is None:
            try:
                rss = next(int(line.split()[1]) for line in open(f"/proc/{proc.pid}/status") if line.startswith("VmRSS"))
                peak = max(peak, rss)
            except (OSError, StopIteration):
                pass
            time.sleep(0.2)
        reader.join()
    output = "".join(lines)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(command)}\n{output[-3000:]}")
    return time.time() - started, peak / 1e6, output


def decode_only(folder: str, workers: int, store: str, cache: str | None) -> None:
    """(child) Decode `folder` by Ray tasks on `workers` CPUs; print the decode seconds as JSON."""
    import ray
    from search.data.search_data import load_search_data
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    started = time.time()
    data = load_search_data(Path(folder), image_size=64, channels=1, seed=0, store=store, cache=cache)
    print(json.dumps({"decode_seconds": time.time() - started, "images": len(data.labels)}))


def throughput(folder: Path, cache: Path, steps: int) -> dict[str, float]:
    """Images per second of a trial's training steps on each path, the same rows on both."""
    import torch
    from ingest.dataset import load_dataset
    from trainables.train import Training
    torch.set_num_threads(1)
    out = {}
    for store in ("memory", "disk"):
        data = load_dataset(folder, image_size=64, cache=str(cache), store=store)
        rng = np.random.default_rng(0)
        rows = np.sort(rng.choice(data.indices("train"), 64 * steps, replace=False))
        config = {"backbone": "small_cnn", "weights": "random", "image_size": 64, "batch_size": 64, "max_epochs": 1}
        run = Training(config, data, train=rows, val=np.sort(rng.choice(data.indices("val"), 64, replace=False)))
        started = time.time()
        next(run.epochs())
        out[store] = 64 * steps / (time.time() - started)
    return out


def read_all(folder: Path) -> None:
    """Every file read once, so that every timed decode finds them in the page cache alike (the first
    decode after the folder was made, or after other work, would otherwise also time the disk)."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda p: p.read_bytes(), folder.rglob("*.png")))


def measure(n: int, work: Path, steps: int, repeats: int) -> list[dict]:
    folder = make_folder(work, n)
    read_all(folder)
    rows = {store: {"images": n, "path": store} for store in ("memory", "disk")}
    for store, row in rows.items():
        fastest = {}
        for workers in (1, 2):
            runs = []
            for _ in range(repeats):
                cache = work / f"cache-decode-{n}"
                shutil.rmtree(cache, ignore_errors=True)
                _, _, output = run_measured([PYTHON, __file__, "--decode-only", str(folder), "--workers", str(workers),
                                             "--store", store, "--cache", str(cache)])
                runs.append(json.loads(output.strip().splitlines()[-1])["decode_seconds"])
                shutil.rmtree(cache, ignore_errors=True)
            fastest[workers] = min(runs)
            row[f"decode_{workers}w_s"], row[f"decode_{workers}w_img_s"] = round(fastest[workers], 1), round(n / fastest[workers])
        row["speedup_2w"] = round(fastest[1] / fastest[2], 3)
        cache, storage = work / f"cache-search-{n}-{store}", work / f"experiments-{n}"
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(storage, ignore_errors=True)
        for name in ("cold", "warm"):
            command = [PYTHON, "-m", "search.run", "--space", "tiny", "--backbones", "small_cnn", "--data", str(folder),
                       "--data-store", store, "--data-cache", str(cache), "--num-samples", "1", "--max-epochs", "1",
                       "--folds", "1", "--weights", "random", "--no-finalize", "--storage", str(storage),
                       "--name", f"{store}-{name}", "--subset", str(SUBSET)]
            started = time.time()
            _, peak, _ = run_measured(command)
            timings = json.loads((storage / f"{store}-{name}" / "timings.json").read_text())
            if name == "cold":
                first = json.loads(next((storage / f"{store}-cold").glob("trial_*/result.json")).read_text().splitlines()[0])
                row["driver_peak_rss_gb"] = round(peak, 2)
                row["first_epoch_s"] = round(first["timestamp"] - started, 1)
                row["cold_data_s"] = round(timings["data_seconds"], 1)
            else:
                row["warm_data_s"] = round(timings["data_seconds"], 1)
                row["warm_vs_cold_decode"] = round(timings["data_seconds"] / row["cold_data_s"], 3)
        if store == "disk":
            for path, ips in throughput(folder, cache, steps).items():
                rows[path]["train_img_s"] = round(ips)
        shutil.rmtree(storage, ignore_errors=True)
    shutil.rmtree(work / f"cache-search-{n}-memory", ignore_errors=True)
    shutil.rmtree(work / f"cache-search-{n}-disk", ignore_errors=True)
    table = list(rows.values())
    table[1]["train_vs_memory"] = round(table[1]["train_img_s"] / table[0]["train_img_s"], 2)
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="20000,200000", help="comma-separated numbers of images")
    p.add_argument("--work", default=str(Path("~/.cache/lung-search-bench").expanduser()))
    p.add_argument("--steps", type=int, default=100, help="training steps for the throughput")
    p.add_argument("--repeats", type=int, default=2, help="decodes per setting, the fastest kept (this VM's "
                   "disk and page cache make single runs vary by 10%%)")
    p.add_argument("--benchmarks", action="store_true")
    p.add_argument("--decode-only", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--store", default="memory", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.repeats < 1:
        p.error(f"--repeats must be 1 or more, got {args.repeats}")
    if args.decode_only:
        decode_only(args.decode_only, args.workers, args.store, args.cache)
        return
    started, work = time.time(), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame([row for n in map(int, args.sizes.split(",")) for row in measure(n, work, args.steps, args.repeats)])
    finish("data_scale", table, started=started, benchmarks=args.benchmarks, section="Data at scale (issue 28)",
           settings=f"gray PNGs 64-96 px decoded to 64 px; decode by Ray tasks on 1 or 2 CPUs, fastest of "
                    f"{args.repeats}; search: tiny space, "
                    f"small_cnn, 1 trial x 1 epoch on --subset {SUBSET}, --no-finalize; throughput: {args.steps} steps "
                    f"of batch 64, 1 thread")


if __name__ == "__main__":
    main()
