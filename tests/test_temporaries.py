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
import pytest

from tagml.core.settings import Settings, write_manifest
from tagml.core.storage import (
    atomic_replace,
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


def _temporaries_of(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.glob(f".{target.name}.*"))


def test_two_writers_of_one_target_never_share_a_temporary_and_a_dead_ones_write_never_lands(tmp_path):
    target = tmp_path / "home.json"
    target.write_text("old")
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            sys.path.insert(0, {str(ROOT)!r})
            from tagml.core.storage import atomic_replace
            with atomic_replace(Path({str(target)!r})) as tmp:
                tmp.write_text("the other writer's half")
                Path({str(ready)!r}).write_text(tmp.name)
                time.sleep(600)
            """),
        ],
        start_new_session=True,
    )
    try:
        theirs = _wait(ready)
        with atomic_replace(target) as ours:
            assert ours.name != theirs and (tmp_path / theirs).exists()
            ours.write_text("new")
        assert target.read_text() == "new"
        assert (tmp_path / theirs).read_text() == "the other writer's half"  # a live writer's temporary is left alone
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert target.read_text() == "new"  # the killed writer never replaced it
    with atomic_replace(target) as again:
        again.write_text("newer")
    assert target.read_text() == "newer" and _temporaries_of(target) == []


def test_a_failed_write_leaves_the_old_target_and_no_temporary(tmp_path):
    target = tmp_path / "report.html"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="failed half way"), atomic_replace(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("failed half way")
    assert target.read_text() == "old" and _temporaries_of(target) == []


def test_the_home_manifest_is_written_like_every_other_target_live_writers_kept_dead_ones_cleaned(tmp_path):
    settings = Settings.from_env({"TAGML_HOME": str(tmp_path)})
    dead = settings.manifest_path.with_name(f".{settings.manifest_path.name}.{'0' * 32}.tmp")
    with locked_temporary(settings.manifest_path) as live:
        live.write_text("{}")
        dead.write_text("{")  # a writer killed mid-write, its lock released with the process
        write_manifest(settings)
        assert live.read_text() == "{}" and not dead.exists()
    assert '"path"' in settings.manifest_path.read_text() and _temporaries_of(settings.manifest_path) == []
