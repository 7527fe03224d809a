"""Temporary files beside partitions: a re-run removes those of dead writers at once, and never a
live concurrent writer's (real processes, real flocks)."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq

from tagml.core.storage import (
    locked_temporary,
    remove_stale_temporaries,
    write_parquet_atomically,
)
from tests.conftest import make_connection

ROOT = Path(__file__).resolve().parents[1]


def _writer(target: Path, ready: Path) -> subprocess.Popen:
    """A writer of `target` that stops mid-write (temporary half written, lock held) until killed."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {str(ROOT)!r})
        from tagml.core.storage import locked_temporary
        with locked_temporary(Path({str(target)!r})) as tmp:
            tmp.write_bytes(b"PAR1 half a file")
            Path({str(ready)!r}).write_text(tmp.name)
            time.sleep(600)
        """
    )
    return subprocess.Popen([sys.executable, "-c", script], start_new_session=True)


def _wait(path: Path) -> str:
    deadline = time.time() + 60
    while time.time() < deadline and not (path.exists() and path.read_text()):
        time.sleep(0.05)
    return path.read_text()


def test_a_rerun_removes_dead_writers_temporaries_and_keeps_a_live_writers(tmp_path):
    target = tmp_path / "as_of=2026-10-31" / "data.parquet"
    dead, live = _writer(target, tmp_path / "dead"), _writer(target, tmp_path / "live")
    try:
        dead_tmp, live_tmp = target.parent / _wait(tmp_path / "dead"), target.parent / _wait(tmp_path / "live")
        os.killpg(dead.pid, signal.SIGKILL)
        dead.wait()
        assert dead_tmp.exists()  # a fresh file: an age rule would have kept it for hours
        con = make_connection(tmp_path)
        assert write_parquet_atomically(con, "SELECT range AS x FROM range(10)", target) == 10
        assert not dead_tmp.exists() and not dead_tmp.with_suffix(".lock").exists()
        assert live_tmp.read_bytes() == b"PAR1 half a file" and live_tmp.with_suffix(".lock").exists()
        assert pq.read_table(target).num_rows == 10
    finally:
        for proc in (dead, live):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    # once the live writer is gone too, its leftovers are garbage
    assert remove_stale_temporaries(target) == [live_tmp]
    assert sorted(p.name for p in target.parent.iterdir()) == ["data.parquet"]


def test_a_lock_file_without_its_temporary_and_a_temporary_without_a_lock_are_removed(tmp_path):
    target = tmp_path / "data.parquet"
    orphan_lock = tmp_path / f".data.parquet.{'a' * 32}.lock"
    orphan_tmp = tmp_path / f".data.parquet.{'b' * 32}.tmp"
    foreign = tmp_path / "tmp_.data.parquet.cafe.tmp"  # an engine's own scratch name: not ours to delete
    for path in (orphan_lock, orphan_tmp, foreign):
        path.write_bytes(b"x")
    with locked_temporary(target) as tmp:
        tmp.write_bytes(b"mine")
        assert remove_stale_temporaries(target) == []  # our own lock is held: kept
        assert tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [foreign.name]
