"""The soak's cluster (bench/soak.py): a head and worker nodes started by docs/cluster.md's manual flow
as written, on this machine, and the processes that run its trials."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NODE_SIZE = "--disable-usage-stats --object-store-memory=200000000"


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
