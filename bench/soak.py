"""A day of faults, compressed (issue 39): one seeded search on the packaged data, on real Ray nodes
that `ray start` runs on this machine (a head and worker nodes of one CPU each, token authentication:
docs/cluster.md's manual flow, as written), run undisturbed and then through faults of every kind at random moments
drawn from a fixed seed; the two compared.

    python bench/soak.py --benchmarks                   # 24 trials at 40 px through 24 faults (about 25 minutes on 2 cores)
    python bench/soak.py --trials 6 --faults 6          # short: one fault of each kind

The faults: a trial's worker process killed (SIGKILL) while it trains (`worker_train`) or while its
checkpoint is being saved (`worker_save`); a worker node lost, its raylet killed, and a new node
joining (`node_lost`); the driver interrupted (SIGINT, `driver_sigint`) or killed (SIGKILL,
`driver_sigkill`), then `--resume`; the experiment moved to another storage folder while the driver
is down and resumed there (`moved`). Trials run one at a time, so the sampler and ASHA see the same
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
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import common  # noqa: E402

BIN = Path(sys.executable).parent
KINDS = ("worker_train", "worker_save", "node_lost", "driver_sigint", "driver_sigkill", "moved")
NODE_SIZE = "--disable-usage-stats --object-store-memory=200000000"
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


def manual_flow() -> list[str]:
    """The commands of docs/cluster.md's manual cluster flow, as written (the bash block after
    `<!-- manual-flow`): the token, the head, a worker, the search."""
    text = (ROOT / "docs" / "cluster.md").read_text()
    block = text.split("<!-- manual-flow", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.split(" #")[0].strip() for line in block.splitlines() if line.split(" #")[0].strip()]


class Nodes:
    """A head with no CPUs (the driver's node: trials run on workers) and worker nodes of 1 CPU,
    started by the commands of docs/cluster.md's manual flow as written (with this machine's paths,
    a free port and the nodes' sizes added); stopped together."""

    def __init__(self, work: Path, workers: int):
        home = work / "home"
        home.mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(HOME=str(home), PYTHONPATH=str(ROOT))
        self.temp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths must fit 107 characters
        port = str(6900 + os.getpid() % 300)
        self.address = f"127.0.0.1:{port}"
        token, head, self.worker, _ = [c.replace(".venv/bin/", f"{BIN}/").replace("<head-ip>", "127.0.0.1")
                                       .replace("6379", port) for c in manual_flow()]
        try:
            self._shell(token)
            self._shell(f"{head} --num-cpus=0 {NODE_SIZE} --include-dashboard=false --temp-dir={self.temp}")
            for _ in range(workers):
                self.add_worker()
        except BaseException:
            self.stop()
            raise

    def _shell(self, command: str) -> None:
        done = subprocess.run(command, shell=True, env=self.env, capture_output=True, text=True, timeout=180)
        if done.returncode:
            raise RuntimeError(f"{command} failed: {done.stdout[-1000:]} {done.stderr[-2000:]}")

    def add_worker(self) -> None:
        self._shell(f"{self.worker} --num-cpus=1 {NODE_SIZE}")

    def raylets(self) -> dict[str, tuple[int, bool]]:
        """Node id -> (its raylet's pid, whether it is the head), of this cluster's live nodes."""
        out = {}
        for pid, args in _processes():
            node = re.search(r"--node_id=(\w+)", args)
            if node and self.temp in args and args.split()[0].endswith("raylet"):
                out[node.group(1)] = (pid, "node:__internal_head__" in args)
        return out

    def lose_node(self, raylet: int) -> None:
        """A node's raylet killed (its workers go with it), and a new worker node joins."""
        os.kill(raylet, signal.SIGKILL)
        self.add_worker()

    def stop(self) -> None:
        subprocess.run(["pkill", "-9", "-f", self.temp])
        shutil.rmtree(self.temp, ignore_errors=True)


def _processes() -> list[tuple[int, str]]:
    ps = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [(int(line.split(None, 1)[0]), line.split(None, 1)[1]) for line in ps.splitlines() if len(line.split(None, 1)) == 2]


def trial_workers() -> dict[int, int]:
    """The processes running a trial (Ray names them after the function trainable's actor), each with
    its parent: the raylet of the node it runs on."""
    ps = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    rows = [line.split(None, 2) for line in ps.splitlines()]
    return {int(r[0]): int(r[1]) for r in rows if len(r) == 3 and r[2].startswith("ray::ImplicitFunc")}


def results(folder: Path) -> dict[str, list[dict]]:
    from search.checkpoints import results as trial_results
    return {t.name[len("trial_"):]: trial_results(t) for t in sorted(folder.glob("trial_*"))}


def epochs_seen(folder: Path) -> int:
    return sum(len(rows) for rows in results(folder).values())


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
        from search.tuner import load_study
        try:
            if (self.folder / "optuna.journal").is_file():
                load_study(self.folder)
        except Exception as exc:  # whatever Optuna raises for a journal it cannot replay
            self.journal_ok = False
            self.log.write(f"journal not readable: {type(exc).__name__}: {exc}\n")

    def inject(self, kind: str) -> bool:
        """One fault; whether it struck (a worker fault needs a trial running)."""
        if kind in ("worker_train", "worker_save", "node_lost"):
            if not trial_workers():
                self.log.write(f"soak: no trial running for {kind}; the next epoch\n")
                return False
            if kind == "worker_save":
                self._wait_for_a_save(timeout=60)
            if kind == "node_lost":
                workers = {pid for pid, head in self.nodes.raylets().values() if not head}
                nodes = [raylet for raylet in trial_workers().values() if raylet in workers]
                if not nodes:
                    self.log.write(f"soak: no trial running on a worker node for node_lost ({trial_workers()} "
                                   f"{self.nodes.raylets()}); the next epoch\n")
                    return False
                self.nodes.lose_node(nodes[0])
            else:
                for pid in trial_workers():
                    os.kill(pid, signal.SIGKILL)
            self.struck_at.append(time.time())
            self.check_journal()
            return True
        self.driver.send_signal(signal.SIGKILL if kind == "driver_sigkill" else signal.SIGINT)
        code = self.driver.wait(timeout=300)
        self.exits_ok &= code == (-signal.SIGKILL if kind == "driver_sigkill" else 130)
        self.struck_at.append(time.time())
        self.check_journal()
        journal_file = self.folder / "optuna.journal"
        if kind == "driver_sigkill" and journal_file.is_file() and journal_file.read_bytes().endswith(b"\n"):
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

    def _wait_for_a_save(self, timeout: float) -> None:
        """Until a trial's checkpoint folder exists that its result.json does not name yet: the save is
        under way (Ray copies the checkpoint before it registers it)."""
        deadline = time.time() + timeout
        while time.time() < deadline and self.watch():
            for trial in self.folder.glob("trial_*"):
                named = {r.get("checkpoint_dir_name") for r in results(self.folder).get(trial.name[6:], [])}
                if any(c.name not in named for c in trial.glob("checkpoint_*")):
                    return
            time.sleep(0.02)

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


def schedule(faults: int, rng: random.Random) -> list[str]:
    """Every kind at least once (when there are as many faults), the rest drawn, in a drawn order."""
    kinds = list(KINDS[:faults]) + [rng.choice(KINDS) for _ in range(faults - len(KINDS))]
    rng.shuffle(kinds)
    return kinds


def outcome(board: pd.DataFrame) -> list[tuple]:
    return sorted(zip(board["backbone"], board["lr"].round(10), board["epochs"], board["stopped_early"]))


def mlflow_runs_ok(folder: Path, board: pd.DataFrame) -> bool:
    """One MLflow run per trial under one parent, each FINISHED with one value per epoch it ran and
    ASHA's stop tagged, whatever the faults did."""
    from mlflow.tracking import MlflowClient

    from search.tracking import tracking_uri
    client = MlflowClient(tracking_uri(folder, "experiment"))
    runs = client.search_runs([client.get_experiment_by_name(folder.name).experiment_id])
    by_trial = {r.data.tags["trial_id"]: r for r in runs if "trial_id" in r.data.tags}
    if len(runs) != len(board) + 1 or set(by_trial) != set(board["trial_id"]):
        return False
    for row in board.to_dict("records"):
        run = by_trial[row["trial_id"]]
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_auc"))
        if (run.info.status != "FINISHED" or steps != list(range(1, row["epochs"] + 1))
                or run.data.tags.get("stopped_early") != str(bool(row["stopped_early"])).lower()):
            return False
    return True


def compare(whole: Path, soaked: Path, *, trials: int, max_epochs: int, struck_at: list[float]) -> dict:
    """The soaked search against the undisturbed one (see the module docstring). An epoch may be
    trained again once per fault that struck between the trial's first and last report (the epoch
    in flight, or one whose checkpoint the fault kept from being registered)."""
    from search.checkpoints import registered
    from search.tuner import load_study
    board, reference = pd.read_csv(soaked / "leaderboard.csv"), pd.read_csv(whole / "leaderboard.csv")
    ended = board[board["status"] == "TERMINATED"]
    study = load_study(soaked).get_trials(deepcopy=False)
    ray_ids = [t.user_attrs.get("ray_trial_id") for t in study]
    journal_ok = (all(t.state.name in ("COMPLETE", "PRUNED") for t in study)
                  and all(sorted(t.intermediate_values) == list(range(1, len(t.intermediate_values) + 1)) for t in study))
    duplicated = (len(board) - board["trial_id"].nunique()) + (len(ray_ids) - len(set(ray_ids))) \
        + len(set(ray_ids) ^ set(board["trial_id"]))
    continuity, held = [], set(board["trial_id"])
    trial_rows = results(soaked)
    orphans = sorted(set(trial_rows) - held)  # started by a driver killed before it recorded them
    for trial_id, rows in [(t, r) for t, r in trial_rows.items() if t in held]:
        epochs = [r["epoch"] for r in rows]
        saved = registered(soaked / f"trial_{trial_id}")  # newest first
        last_saved = max((r["epoch"] for r in rows if saved and r.get("checkpoint_dir_name") == saved[0].name), default=0)
        continuity.append(bool(epochs) and sorted(set(epochs)) == list(range(1, max(epochs) + 1))
                          and len(epochs) - len(set(epochs)) <= _faults_within(rows, struck_at)
                          and last_saved == max(epochs))
    return {"trials": int(ended["trial_id"].nunique()), "lost": trials - int(ended["trial_id"].nunique()),
            "duplicated": int(duplicated), "journal_ok": bool(journal_ok), "continuity_ok": all(continuity),
            "orphans": len(orphans),
            "asha_same": outcome(board) == outcome(reference) and int(board["epochs"].max()) <= max_epochs,
            "mlflow_ok": mlflow_runs_ok(soaked, board)}


def _faults_within(rows: list[dict], struck_at: list[float]) -> int:
    first, last = rows[0]["timestamp"] - 1, rows[-1]["timestamp"] + 1  # Ray's timestamps are whole seconds
    return sum(first <= moment <= last for moment in struck_at)


def run(work: Path, *, trials: int, faults: int, max_epochs: int, workers: int, seed: int, fault_seed: int,
        gap: tuple[int, int] = (1, 2), subset: int | None = 400, image_size: int = 28) -> dict:
    """The undisturbed search and the soaked one, on one cluster; the comparison's row. `subset`: images
    per split (None: the whole packaged set, whose epochs outweigh a restart as a real search's do). `gap`: the
    fewest and most epochs reported between two faults (drawn)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = ROOT / "search" / "default_data" / "pneumoniamnist.npz"
    search = ["--data", str(data), "--space", "tiny", "--num-samples", str(trials), "--max-epochs", str(max_epochs),
              "--grace-period", "1", "--max-concurrent", "1", "--cpus-per-trial", "1", "--max-retries", str(faults + 2),
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
        for kind in schedule(faults, rng):
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
    row = {"faults": len(struck), **{k: struck.count(k) for k in KINDS}}
    row.update(compare(whole.folder, soak.folder, trials=trials, max_epochs=max_epochs, struck_at=soak.struck_at))
    console = soak.console()
    row["journal_ok"] = (row["journal_ok"] and soak.journal_ok and console["cut_short_lines"] == soak.torn_appends)
    row["drivers_ok"] = soak.exits_ok and console["interrupted_lines"] == row["driver_sigint"] + row["moved"]
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
    p.add_argument("--work", default=str(Path("~/.cache/lung-search-bench/soak").expanduser()))
    p.add_argument("--benchmarks", action="store_true")
    args = p.parse_args()
    started = time.time()
    row = run(Path(args.work), trials=args.trials, faults=args.faults, max_epochs=args.max_epochs,
              workers=args.workers, seed=args.seed, fault_seed=args.fault_seed, subset=args.subset or None, image_size=args.image_size)
    row.update(subset=args.subset or "all", image_size=args.image_size)
    common.finish("soak", pd.DataFrame([row]), started=started, benchmarks=args.benchmarks,
                  section="A search through many faults (issue 39)",
                  settings=f"{args.trials} trials of --space tiny ({args.image_size} px, {args.subset or 'all'} images a split, at most {args.max_epochs} "
                           f"epochs, ASHA grace 1, one at a time) on a head and {args.workers} worker nodes of 1 CPU "
                           f"started by `ray start`; stall limit {STALL_LIMIT} s")
    ok = (row["lost"] == 0 and row["duplicated"] == 0 and row["journal_ok"] and row["continuity_ok"] and row["asha_same"]
          and row["mlflow_ok"] and row["drivers_ok"] and row["wall_ratio"] <= 2.5 and row["max_stall_s"] <= STALL_LIMIT)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
