"""One training per tag at a time: the tag's training lock, and the runs a killed training left RUNNING.

A training holds its tag's lock (a file lock the OS releases if the holder dies) and tags its runs with
its pid and host; the next training of the tag, holding the lock, marks the runs of a process that is
gone KILLED.
"""

import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout
from mlflow.tracking import MlflowClient

from tagml.training.tracking import sqlite_path

OWNER_PID, OWNER_HOST = "tagml.pid", "tagml.host"


def owner_tags() -> dict[str, str]:
    return {OWNER_PID: str(os.getpid()), OWNER_HOST: socket.gethostname()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def mark_stale_runs(client: MlflowClient, experiment_id: str, local: bool) -> list[str]:
    """Set KILLED the runs of the experiment left RUNNING by a process that is gone (SIGKILL, OOM, power).

    Called while holding the tag's training lock, so no live training of this tag on this host owns a
    RUNNING run. A run records its owner's pid and host: it is stale when the host is this one and the
    pid is gone. Runs without owner tags (older ones) are stale only on a local store, where every
    writer shares this lock."""
    host, stale = socket.gethostname(), []
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000)
    for run in runs:
        pid, owner_host = run.data.tags.get(OWNER_PID), run.data.tags.get(OWNER_HOST)
        if pid and owner_host:
            if owner_host != host or (int(pid) != os.getpid() and _alive(int(pid))):
                continue
        elif not local:
            continue
        client.set_tag(run.info.run_id, "tagml.stale", "its process ended without closing it; marked KILLED by a later training")
        client.set_terminated(run.info.run_id, "KILLED")
        stale.append(run.info.run_id)
    return stale


class TrainingInProgressError(RuntimeError):
    """Another training of the same tag holds the tag's training lock on this store; nothing was logged."""


def training_lock_path(tracking_uri: str, tag: str, lock_dir: Path | None = None) -> Path:
    """The lock file serialising trainings of `tag`: next to a SQLite store, else under `lock_dir` or the
    temp dir (for a server this serialises the trainings started on this machine)."""
    db = sqlite_path(tracking_uri)
    if lock_dir is None:
        lock_dir = db.parent if db is not None else Path(tempfile.gettempdir()) / "tagml-locks"
    stem = db.name if db is not None else "".join(c if c.isalnum() else "_" for c in tracking_uri)
    return Path(lock_dir) / f"{stem}.train-{tag}.lock"


@contextmanager
def training_lock(tracking_uri: str, tag: str, lock_dir: Path | None = None, timeout_seconds: float = 0) -> Iterator[Path]:
    """Hold the tag's training lock (released by the OS if the holder is killed)."""
    path = training_lock_path(tracking_uri, tag, lock_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=timeout_seconds)
    except Timeout:
        raise TrainingInProgressError(
            f"another training of tag {tag!r} is running on this MLflow store (lock {path}); wait for it to finish or stop it, then train again"
        ) from None
    try:
        yield path
    finally:
        lock.release()
