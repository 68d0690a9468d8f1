"""A day of faults, compressed (issue 39): one seeded search on the packaged data, on real Ray nodes
that `ray start` runs on this machine (a head and worker nodes of one CPU each, token authentication:
docs/cluster.md's manual flow, as written), run undisturbed and then through faults of every kind at random moments
drawn from a fixed seed; the two compared.

    python -m bench.soak --benchmarks                   # 24 trials at 40 px through 24 faults (about 25 minutes on 2 cores)
    python -m bench.soak --trials 6 --faults 6          # short: one fault of each kind
    python -m bench.soak --paired --benchmarks          # two faults at once, 12 times

The faults: a trial's worker process killed (SIGKILL) while it trains (`worker_train`) or while its
checkpoint is being saved (`worker_save`); a worker node lost, its raylet killed, and a new node
joining (`node_lost`); the driver interrupted (SIGINT, `driver_sigint`) or killed (SIGKILL,
`driver_sigkill`), then `--resume`; the experiment moved to another storage folder while the driver
is down and resumed there (`moved`). With `--paired`, two faults land within one trial's epoch: its
worker killed and its node lost at once (`worker_and_node`), or the driver killed while a trial's
checkpoint is being saved (`driver_during_save`). A kill aimed at a save counts only where it
landed there: the checkpoint folder it found unregistered was never registered (`save_kills_landed`
of `worker_save` + `driver_during_save`; the rest landed just after the save). Every trial may be
struck by every fault, one at a time, so the search runs with `--max-retries` faults + 2 (the
default, 2, would fail a trial struck a third time, as designed); the row records it. Trials run one at a time, so the sampler and ASHA see the same
results in the same order in both runs and their decisions can be compared exactly.

One row per soak in `bench/results/soak-<stamp>.csv`: `faults` and the count of each kind, `trials`,
`lost` (asked for but not ended), `duplicated` (a trial in the leaderboard twice, or an Optuna trial
not one to one with a leaderboard row), `journal_ok` (optuna.journal replays with JournalStorage
after every fault, one JournalStorage held open by another process reads it every second without
an error, as optuna-dashboard does, and at the end holds every trial COMPLETE or PRUNED, none RUNNING, each with its
epochs 1..n), `orphans` (trial folders the search does not hold: a driver killed between starting
a trial and recording it; the resumed search runs that config again under a new id, and their MLflow
runs are deleted), `continuity_ok` (every trial's epochs 1..n, at most the epoch in flight trained again
per fault, its checkpoint at its last epoch), `asha_same` (the same trials stopped at the same
epochs as undisturbed, none past max_t), `wall_ratio` and `max_stall_s` (the longest time without a
new epoch while a driver ran).
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from bench import common
from bench.soak_checks import compare, epochs_seen, results
from bench.soak_cluster import Nodes, trial_workers

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("worker_train", "worker_save", "node_lost", "driver_sigint", "driver_sigkill", "moved")
# two faults within one trial's epoch: its worker killed while its node is being lost; the driver killed
# while a trial's checkpoint is being saved
PAIRED = ("worker_and_node", "driver_during_save")
READER = """
import sys
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
storage = JournalStorage(JournalFileBackend(sys.argv[1]))
while sys.stdin.readline().strip() == "read":
    trials = sum(len(storage.get_all_trials(s._study_id, deepcopy=False)) for s in storage.get_all_studies())
    print(trials, flush=True)
"""
STALL_LIMIT = 240  # seconds a search may go without a new epoch while its driver runs (a resume included)


class JournalReader:
    """One JournalStorage held by another process for the whole search, as optuna-dashboard holds it,
    reading the journal again while the drivers append to it and cut torn lines off (issue 38)."""

    def __init__(self, path: Path):
        self.process = subprocess.Popen([sys.executable, "-c", READER, str(path)], text=True, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def read(self) -> str | None:
        """None when it read the journal; else the reader's last words."""
        try:
            self.process.stdin.write("read\n")
            self.process.stdin.flush()
            if self.process.stdout.readline():
                return None
        except BrokenPipeError:
            pass
        return self.process.stderr.read()[-2000:]

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


class Soak:
    """One search run through faults (none: the undisturbed run) on `nodes`, its driver started and
    restarted here; `struck_at` holds when each fault struck."""

    def __init__(self, nodes: Nodes, storages: list[Path], name: str, search: list[str], log: Path):
        self.nodes, self.storages, self.name, self.search, self.log = nodes, storages, name, search, open(log, "a")
        self.storage, self.driver = storages[0], None
        self.struck_at: list[float] = []
        self.journal_ok, self.max_stall, self.started = True, 0.0, time.time()
        self.exits_ok, self.torn_appends = True, 0  # every driver stop ended as it should; half lines appended
        self._progress = (0, time.time())
        self.reader, self._read_at = None, 0.0
        self.aimed_saves: list[tuple[str, str]] = []  # (trial, checkpoint) a kill aimed at, found mid-save

    @property
    def folder(self) -> Path:
        return self.storage / self.name

    def start(self, resume: bool = False) -> None:
        command = [sys.executable, "-m", "search.run", "--address", self.nodes.address, "--storage", str(self.storage),
                   "--name", self.name, *self.search, *(["--resume"] if resume else [])]
        self.log.write(f"\n[{time.strftime('%H:%M:%S')}] {' '.join(command[1:])}\n")
        self.log.flush()
        self.driver = subprocess.Popen(command, cwd=ROOT, env=self.nodes.env, stdout=self.log, stderr=subprocess.STDOUT)

    def watch(self) -> bool:
        """Record progress and stalls; whether the driver still runs (a driver that failed stops the soak)."""
        seen = epochs_seen(self.folder) if self.folder.is_dir() else 0
        if seen > self._progress[0]:
            self._progress = (seen, time.time())
        self.max_stall = max(self.max_stall, time.time() - self._progress[1])
        self._read_journal()
        code = self.driver.poll()
        if code not in (None, 0):
            raise SystemExit(f"the search's driver failed ({code}); see {self.log.name}")
        return code is None

    def wait_for_epochs(self, more: int, timeout: float = 900) -> bool:
        """Until `more` new epochs are reported (whether the driver still runs)."""
        goal, deadline = epochs_seen(self.folder) + more if self.folder.is_dir() else more, time.time() + timeout
        while self.watch() and time.time() < deadline:
            if self.folder.is_dir() and epochs_seen(self.folder) >= goal and trial_workers():
                return True
            time.sleep(0.2)
        return self.driver.poll() is None

    def _read_journal(self) -> None:
        journal = self.folder / "optuna.journal"
        if self.reader is None and journal.is_file():
            self.reader = JournalReader(journal)
        if self.reader is not None and time.time() - self._read_at >= 1:
            failed, self._read_at = self.reader.read(), time.time()
            if failed is not None:
                self.journal_ok = False
                self.log.write(f"the long-lived journal reader failed: {failed}\n")
                self.reader.close()
                self.reader = None

    def check_journal(self) -> None:
        from search.engine.tuner import load_study
        try:
            if (self.folder / "optuna.journal").is_file():
                load_study(self.folder)
        except Exception as exc:  # whatever Optuna raises for a journal it cannot replay
            self.journal_ok = False
            self.log.write(f"journal not readable: {type(exc).__name__}: {exc}\n")

    def inject(self, kind: str) -> bool:
        """One fault (with `PAIRED` kinds, two at once); whether it struck (a worker fault needs a trial
        running, a fault aimed at a save a save under way)."""
        if kind in ("worker_train", "worker_save", "node_lost", "worker_and_node"):
            if not trial_workers():
                self.log.write(f"soak: no trial running for {kind}; the next epoch\n")
                return False
            if kind == "worker_save" and not self._aim_at_a_save(timeout=60):
                return False
            if kind in ("node_lost", "worker_and_node"):
                workers = {pid for pid, head in self.nodes.raylets().values() if not head}
                on_workers = {pid: raylet for pid, raylet in trial_workers().items() if raylet in workers}
                if not on_workers:
                    self.log.write(f"soak: no trial running on a worker node for {kind} ({trial_workers()} "
                                   f"{self.nodes.raylets()}); the next epoch\n")
                    return False
                pid, raylet = next(iter(on_workers.items()))
                if kind == "worker_and_node":
                    os.kill(pid, signal.SIGKILL)  # the worker first, its node a moment later: one epoch, two faults
                self.nodes.lose_node(raylet)
            else:
                for pid in trial_workers():
                    os.kill(pid, signal.SIGKILL)
            self.struck_at.append(time.time())
            self.check_journal()
            return True
        if kind == "driver_during_save" and not self._aim_at_a_save(timeout=60):
            return False
        killed = kind in ("driver_sigkill", "driver_during_save")
        self.driver.send_signal(signal.SIGKILL if killed else signal.SIGINT)
        code = self.driver.wait(timeout=300)
        self.exits_ok &= code == (-signal.SIGKILL if killed else 130)
        self.struck_at.append(time.time())
        self.check_journal()
        journal_file = self.folder / "optuna.journal"
        if killed and journal_file.is_file() and journal_file.read_bytes().endswith(b"\n"):
            with open(journal_file, "a") as journal:  # a kill in the middle of an append
                journal.write('{"op_code": 5, "worker_id": "0-1", "trial_id": 1, "state": 1, "val')
            self.torn_appends += 1
        if kind == "moved":
            other = self.storages[1] if self.storage == self.storages[0] else self.storages[0]
            other.mkdir(parents=True, exist_ok=True)
            if self.reader is not None:  # a dashboard follows a journal's path, not its folder
                self.reader.close()
                self.reader = None
            shutil.move(str(self.folder), str(other / self.name))
            self.storage = other
        self.start(resume=True)
        return True

    def _aim_at_a_save(self, timeout: float) -> bool:
        """Until a trial's checkpoint folder exists that its result.json does not name yet (Ray copies the
        checkpoint before it registers it): whether one was found, and it is noted to check at the end
        that the kill landed before its registration."""
        deadline, stale = time.time() + timeout, set(self._unregistered())  # left by an earlier fault: no save
        while time.time() < deadline and self.watch():
            under_way = [found for found in self._unregistered() if found not in stale]
            if under_way:
                self.aimed_saves.append(under_way[0])
                return True
            time.sleep(0.02)
        self.log.write("soak: no save under way in time; the next epoch\n")
        return False

    def _unregistered(self) -> list[tuple[str, str]]:
        """(trial, checkpoint folder) of every checkpoint folder its trial's result.json does not name."""
        found, rows = [], results(self.folder)
        for trial in self.folder.glob("trial_*"):
            named = {r.get("checkpoint_dir_name") for r in rows.get(trial.name[6:], [])}
            found += [(trial.name[6:], c.name) for c in trial.glob("checkpoint_*") if c.name not in named]
        return found

    def save_kills_landed(self) -> int:
        """The kills aimed at a save whose checkpoint was never registered: they landed in the save."""
        registered = {(t, r.get("checkpoint_dir_name")) for t, rows in results(self.folder).items() for r in rows}
        return sum(aimed not in registered for aimed in self.aimed_saves)

    def finish(self) -> float:
        while self.watch():
            time.sleep(0.5)
        self.check_journal()
        if self.reader is not None:
            self._read_at = 0.0
            self._read_journal()
            if self.reader is not None:
                self.reader.close()
        return time.time() - self.started

    def console(self) -> dict:
        """What the drivers printed: every Ctrl-C named the command that continues, every half line
        appended was cut off on resume, and Ray's errors came as one `engine:` line each."""
        self.log.flush()
        text = Path(self.log.name).read_text()
        lines = text.splitlines()
        return {"interrupted_lines": sum("interrupted: continue with python -m search.run --resume --name" in ln
                                         for ln in lines),
                "cut_short_lines": text.count("ended in a line cut short"),
                "engine_lines": sum(ln.startswith("engine: ") and "(details: " in ln for ln in lines)}


def schedule(faults: int, rng: random.Random, kinds_of: tuple[str, ...] = KINDS) -> list[str]:
    """Every kind at least once (when there are as many faults), the rest drawn, in a drawn order."""
    kinds = list(kinds_of[:faults]) + [rng.choice(kinds_of) for _ in range(faults - len(kinds_of))]
    rng.shuffle(kinds)
    return kinds


def run(work: Path, *, trials: int, faults: int, max_epochs: int, workers: int, seed: int, fault_seed: int,
        gap: tuple[int, int] = (1, 2), subset: int | None = 400, image_size: int = 28,
        kinds: tuple[str, ...] = KINDS) -> dict:
    """The undisturbed search and the soaked one, on one cluster; the comparison's row. `subset`: images
    per split (None: the whole packaged set, whose epochs outweigh a restart as a real search's do). `gap`: the
    fewest and most epochs reported between two faults (drawn). `kinds`: of `KINDS` and `PAIRED`, each struck
    once before any is drawn again."""
    max_retries = faults + 2
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = ROOT / "search" / "default_data" / "pneumoniamnist.npz"
    search = ["--data", str(data), "--space", "tiny", "--num-samples", str(trials), "--max-epochs", str(max_epochs),
              "--grace-period", "1", "--max-concurrent", "1", "--cpus-per-trial", "1", "--max-retries", str(max_retries),
              *(["--subset", str(subset)] if subset else []), "--image-size", str(image_size), "--folds", "1", "--no-finalize", "--no-stop-rule",
              "--seed", str(seed), "--mlflow"]
    nodes = Nodes(work, workers)
    try:
        whole = Soak(nodes, [work / "a"], "whole", search, work / "whole.log")
        whole.start()
        whole_s = whole.finish()
        soak = Soak(nodes, [work / "a", work / "b"], "soak", search, work / "soak.log")
        rng, struck = random.Random(fault_seed), []
        soak.start()
        for kind in schedule(faults, rng, kinds):
            for _ in range(3):  # a worker fault finds no trial running now and then: the next epoch, again
                if not soak.wait_for_epochs(rng.randint(*gap)):
                    break  # the search ended before this fault
                if soak.inject(kind):
                    struck.append(kind)
                    print(f"[{common.clock(time.time() - soak.started)}] fault {len(struck)}/{faults}: {kind}", flush=True)
                    break
        soak_s = soak.finish()
    finally:
        nodes.stop()
    mode = "single" if set(kinds) <= set(KINDS) else "paired" if set(kinds) <= set(PAIRED) else "single + paired"
    row = {"mode": mode, "faults": len(struck), **{k: struck.count(k) for k in kinds},
           "save_kills_landed": soak.save_kills_landed(), "max_retries": max_retries}
    row.update(compare(whole.folder, soak.folder, trials=trials, max_epochs=max_epochs, struck_at=soak.struck_at))
    console = soak.console()
    row["journal_ok"] = (row["journal_ok"] and soak.journal_ok and console["cut_short_lines"] == soak.torn_appends)
    row["drivers_ok"] = soak.exits_ok and console["interrupted_lines"] == row.get("driver_sigint", 0) + row.get("moved", 0)
    row["engine_lines"] = console["engine_lines"]
    row.update(wall_ratio=round(soak_s / whole_s, 2), max_stall_s=round(max(soak.max_stall, whole.max_stall)),
               undisturbed_s=round(whole_s), soak_s=round(soak_s), seed=seed, fault_seed=fault_seed,
               machine=common.machine(), commit=common.commit())
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--faults", type=int, default=24)
    p.add_argument("--max-epochs", type=int, default=4)
    p.add_argument("--workers", type=int, default=3, help="worker nodes (the head runs no trial)")
    p.add_argument("--subset", type=int, default=0, help="images per split (0: the whole packaged set)")
    p.add_argument("--image-size", type=int, default=40, help="pixels (the packaged files are 28 px: upsampled)")
    p.add_argument("--seed", type=int, default=0, help="the search's seed")
    p.add_argument("--fault-seed", type=int, default=0, help="seed of the faults' kinds and moments")
    p.add_argument("--paired", action="store_true", help="two faults at once: " + ", ".join(PAIRED))
    p.add_argument("--work", default=str(Path("~/.cache/lung-search-bench/soak").expanduser()))
    p.add_argument("--benchmarks", action="store_true")
    args = p.parse_args()
    started = time.time()
    row = run(Path(args.work), trials=args.trials, faults=args.faults, max_epochs=args.max_epochs,
              workers=args.workers, seed=args.seed, fault_seed=args.fault_seed, subset=args.subset or None, image_size=args.image_size,
              kinds=PAIRED if args.paired else KINDS)
    row.update(subset=args.subset or "all", image_size=args.image_size)
    common.finish("soak", pd.DataFrame([row]), started=started, benchmarks=args.benchmarks,
                  section="A search through many faults (issue 39)",
                  settings=f"{args.trials} trials of --space tiny ({args.image_size} px, {args.subset or 'all'} images a split, at most {args.max_epochs} "
                           f"epochs, ASHA grace 1, one at a time) on a head and {args.workers} worker nodes of 1 CPU "
                           f"started by `ray start`; {'paired' if args.paired else 'single'} faults; the search's "
                           f"--max-retries {row['max_retries']} (faults + 2: one trial may be struck by all); "
                           f"stall limit {STALL_LIMIT} s")
    ok = (row["lost"] == 0 and row["duplicated"] == 0 and row["journal_ok"] and row["continuity_ok"] and row["asha_same"]
          and row["mlflow_ok"] and row["drivers_ok"] and row["wall_ratio"] <= 2.5 and row["max_stall_s"] <= STALL_LIMIT)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
