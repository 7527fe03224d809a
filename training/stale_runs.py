"""The runs a killed training left RUNNING.

A training tags its runs with its pid and host; the next training of the tag (holding the tag's
training lock, tagml.training.train) marks the runs of a process that is gone KILLED.
"""

import os
import socket

from mlflow.tracking import MlflowClient

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
