"""A fault for Ray's worker processes: the copy of a trial's second checkpoint into storage writes
half the file and then hangs (a slow network share, a huge model), so the search's stop lands in
mid-copy. Ray kills a trial that does not stop within 10 s, and the half-written file stays.

    ray.init(runtime_env={"worker_process_setup_hook": slow_save.hook(log, armed)})

Installed in the workers by value (`register_pickle_by_value`): they cannot import the tests.
"""
import json
import os
import time


def hook(log: str, armed: str):
    """The setup hook: while the file `armed` exists, the second checkpoint's copy hangs half-way
    (for at most 120 s), each step logged to `log`."""
    def install():
        from ray.train._internal import storage

        copy = storage._pyarrow_fs_copy_files

        def hanging_copy(source, destination, **kwargs):
            if not os.path.exists(armed) or not destination.rstrip("/").endswith("checkpoint_000001"):
                return copy(source, destination, **kwargs)
            for name in os.listdir(source):
                data = open(os.path.join(source, name), "rb").read()
                with open(os.path.join(destination, name), "wb") as out:
                    out.write(data[:len(data) // 2])
                    out.flush()
                    _log(log, destination, "half")
                    time.sleep(120)
                    out.write(data[len(data) // 2:])
            _log(log, destination, "done")

        storage._pyarrow_fs_copy_files = hanging_copy
    return install


def _log(log: str, destination: str, event: str) -> None:
    with open(log, "a") as f:
        f.write(json.dumps({"checkpoint": destination, "event": event, "t": time.time()}) + "\n")
