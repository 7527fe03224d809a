"""No network at run time: the demo's steps (generate, ingest, train, score, drift, re-evaluate) on a
small bank, in a real process, make no connection or name lookup beyond loopback and write nothing
under $HOME (mlflow's and dagster's telemetry would do both).

The child process gets none of the telemetry switches from this test's environment: the CLI must
set them itself. A sitecustomize.py on its PYTHONPATH installs an audit hook (inherited by forked
children; spawned ones load it again) that records every non-loopback connect, sendto and lookup and
makes it fail before anything is sent.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

AUDIT_HOOK = """
import ipaddress
import os
import socket
import sys

_LOG = os.environ["NO_NETWORK_LOG"]


def _loopback(host):
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    host = str(host)
    if host in ("", "localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False  # any other name means a DNS lookup


def _hook(event, args):
    if event in ("socket.connect", "socket.sendto"):
        sock, address = args[0], args[1]
        if getattr(sock, "family", None) == socket.AF_UNIX:
            return
        host = address[0] if isinstance(address, tuple) else address
    elif event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr"):
        host = args[0]
    else:
        return
    if not _loopback(host):
        with open(_LOG, "a") as log:
            log.write(f"pid {os.getpid()}: {event} {host!r}\\n")
        # and stop it: the call fails before any packet (or DNS query) leaves this machine
        raise OSError(f"network use blocked by the no-network test: {event} {host!r}")


sys.addaudithook(_hook)
"""

# what the CLI must set by itself (this test process has them from tests/conftest.py)
SWITCHES = ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "DAGSTER_DISABLE_TELEMETRY", "MLFLOW_TRACKING_URI", "DAGSTER_HOME", "MPLCONFIGDIR")


def test_the_demo_makes_no_network_call_and_writes_nothing_under_home(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(AUDIT_HOOK)
    user_home = tmp_path / "user"
    user_home.mkdir()
    log = tmp_path / "network.log"
    source = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TAGML_", "XDG_")) and k not in SWITCHES}
    env.update(
        HOME=str(user_home),
        TAGML_HOME=str(tmp_path / "tagml_home"),
        TAGML_THREADS="1",
        NO_NETWORK_LOG=str(log),
        PYTHONPATH=os.pathsep.join([str(site), str(source)]),
    )
    # the hook is live in the child: a lookup of a public name is recorded and blocked (no query is sent)
    probe = subprocess.run(
        [sys.executable, "-c", "import socket\ntry:\n socket.getaddrinfo('example.org', 443)\nexcept OSError:\n pass"],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    assert "example.org" in log.read_text()
    log.unlink()

    demo = subprocess.run(
        [sys.executable, "-m", "tagml.cli", "demo", "--customers", "3000"], check=False, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1500
    )
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "[8/8]" in demo.stdout and "re-scored customer_tags" in demo.stdout and "verified: 0 hits" in demo.stdout
    assert "$ tagml tags C" in demo.stdout and "lineage: tagml-risk_appetite/" in demo.stdout  # the example lookup ran
    assert not log.exists(), f"non-loopback network use:\n{log.read_text()}"
    written = sorted(str(p.relative_to(user_home)) for p in user_home.rglob("*"))
    assert written == [], f"written under $HOME: {written}"
