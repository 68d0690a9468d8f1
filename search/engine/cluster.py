"""Ray as every command uses it: connected for a block of work, its errors in one line each, and
whether a task fits a node.

Example:
    >>> with connected(None):                       # a local Ray, shut down after the block
    ...     check_fits(1, 0, task="run a trial", flags="--cpus-per-trial / --gpus-per-trial", cluster=False)
"""
from __future__ import annotations

import logging
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import ray

from core.errors import UserError
from core.formatting import duration
from search.engine.ray_internals import use_token_if_available

# a node that can run a trial may take this long to join a cluster (an autoscaler launching a GPU instance)
NODE_WAIT = 1200


@contextmanager
def connected(address: str | None):
    """Ray for the block: the one already running, or joined (`address`) or started here and shut
    down after the block."""
    if ray.is_initialized():
        yield
        return
    if address:
        _check_reachable(address)
        use_token_if_available()
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=True,
                 logging_level="ERROR")
    except ConnectionError as exc:
        raise UserError(f"cannot join a Ray cluster at --address {address}: {str(exc).strip().splitlines()[0][:200].rstrip('.')}. "
                        f"Start one first (ray start --head, or ray up cluster.yaml) and give its head's host:6379; if "
                        f"it uses token authentication, this machine needs its token (~/.ray/auth_token, or "
                        f"RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH)") from None
    try:
        yield
    finally:
        ray.shutdown()


def _check_reachable(address: str, timeout: float = 5) -> None:
    """Fail at once when nothing listens at a `host:port` address (Ray itself retries for minutes).

    Raises:
        UserError: naming the address and how to start a cluster there.
    """
    host, _, port = address.rpartition(":")
    if address == "auto" or "://" in address or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise UserError(f"cannot join a Ray cluster at --address {address}: nothing answers there ({exc.strerror or exc}). "
                        f"Start one first (ray start --head, or ray up cluster.yaml) and give its head's host:6379, or "
                        f"leave --address out to run on this machine") from None


@contextmanager
def engine_messages(folder: Path):
    """For the block: each error Ray's trial controller logs (a trial's worker died, a retry, a
    failing callback) is one `engine:` line on the console, its full text and trace in
    `folder/engine.log` (Ray's own output would repeat every trace on the console)."""
    logger = logging.getLogger("ray.tune.execution.tune_controller")
    to_file = _QuietFileHandler(folder / "engine.log", delay=True)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    to_console = logging.StreamHandler(sys.stderr)
    to_console.setFormatter(_FirstLine(f" (details: {folder / 'engine.log'})"))
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.ERROR)
    logger.propagate = False
    logger.addHandler(to_file)
    logger.addHandler(to_console)
    try:
        yield
    finally:
        for handler in (to_file, to_console):
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(level)
        logger.propagate = propagate


class _QuietFileHandler(logging.FileHandler):
    """engine.log that never raises nor prints a "Logging error" trace: on a full or read-only disk
    the console's `engine:` line is what remains."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            super().emit(record)
        except OSError:  # opening the file (delay=True) is outside logging's own guard
            pass

    def handleError(self, record: logging.LogRecord) -> None:
        pass


class _FirstLine(logging.Formatter):
    def __init__(self, suffix: str):
        super().__init__()
        self.suffix = suffix

    def format(self, record: logging.LogRecord) -> str:
        return f"engine: {record.getMessage().strip().splitlines()[0][:300]}{self.suffix}"


def check_fits(cpus: float, gpus: float, *, task: str, flags: str, cluster: bool, wait: float = NODE_WAIT) -> None:
    """Fail when no live node has `cpus` and `gpus` for one `task`. On a cluster (`cluster`) ask the
    autoscaler for such a node and wait up to `wait` seconds for it to join (a line each minute): a
    cluster without an autoscaler never gets one, and its trials would wait in PENDING for ever.

    Raises:
        UserError: naming what was asked, what the nodes have, and the `flags` that change it.
    """
    if _fits(cpus, gpus):
        return
    need = f"{cpus:g} CPU and {gpus:g} GPU"
    if not cluster:
        raise UserError(f"no node can {task} with {need} (nodes: {_nodes_line()}); lower {flags} or add nodes")
    from ray.autoscaler.sdk import request_resources
    request_resources(bundles=[{"CPU": cpus, "GPU": gpus}])
    print(f"no node can {task} with {need} yet (nodes: {_nodes_line()}); asked the autoscaler for one, waiting up "
          f"to {duration(wait)}", flush=True)
    started = last = time.time()
    try:
        while time.time() - started < wait:
            time.sleep(min(5.0, wait / 4))
            if _fits(cpus, gpus):
                print(f"a node that can {task} joined after {time.time() - started:.0f} s", flush=True)
                return
            if time.time() - last >= 60:
                last = time.time()
                print(f"  still waiting for a node with {need} ({last - started:.0f} s)", flush=True)
    finally:
        request_resources(bundles=[])  # the trials' own demand keeps such a node from now on
    raise UserError(f"no node that can {task} with {need} joined in {duration(wait)} (nodes: {_nodes_line()}); "
                    f"a cluster without an autoscaler gets none: start one there (ray start --address <head>) or "
                    f"lower {flags}")


def _fits(cpus: float, gpus: float) -> bool:
    return any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus
               for r in (n["Resources"] for n in ray.nodes() if n.get("Alive")))


def _nodes_line() -> str:
    return "; ".join(f"CPU {r.get('CPU', 0):g}, GPU {r.get('GPU', 0):g}"
                     for r in (n["Resources"] for n in ray.nodes() if n.get("Alive")))


def slots(cpus: float, gpus: float) -> int:
    """How many tasks of `cpus` and `gpus` the cluster holds at once (GPUs decide when asked for)."""
    resources = ray.cluster_resources()
    return max(1, int(resources.get("GPU", 0) / gpus if gpus else resources.get("CPU", 1) / cpus))
