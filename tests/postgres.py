"""The bank set-up's servers for tests: a real PostgreSQL 15 (Debian's binaries) on a temp dir, and a real
`mlflow server` subprocess, both on 127.0.0.1 and a free port, stopped when the session (or block) ends.

Fixtures (import them into a test module: `from tests.postgres import postgres, mlflow_postgres  # noqa: F401`):
- `postgres` (session): a running `PostgresServer`: `create_database(name)` makes a fresh database, `dagster_env(db)`
  the DAGSTER_PG_* variables deploy/dagster.yaml reads, `url(db)` an MLflow backend store URI (no password in it)
  and `secret_env()` the PGPASSWORD that goes with it, `connect(db)` a psycopg2 connection.
- `mlflow_postgres` (session): an `MlflowServer` (`url`, `root`, `backend_store_uri`) whose backend store is a fresh
  database of `postgres`; `running_mlflow_server(root, store, secret_env)` starts another one for a block.
The MLflow server is started with the command of deploy/systemd/mlflow-server.service (`unit_command`).

Why not pytest-postgresql's `postgresql_proc`: it runs initdb/pg_ctl as the current user and keeps the data
directory under pytest's basetemp (mode 0700). CI runs the tests as root, which initdb and pg_ctl refuse, and a
`postgres` user could not enter a root-only basetemp; here they run as `postgres` (created when missing) on a
temp dir that user owns.
"""

import configparser
import glob
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.conftest import missing_component

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DEPLOYED_BIN = "/opt/tagml/venv/bin/"  # where the systemd units expect tagml's virtual environment
ENTRY_POINTS = {"mlflow": "mlflow", "dagster": "dagster", "dagster-daemon": "dagster._daemon"}  # the units the tests start
HOST_FILES = {"/etc/tagml/workspace.yaml": str(DEPLOY / "workspace.yaml")}  # files the units name on the host -> their example in deploy/
SERVER_USER = "postgres"  # the system user that runs initdb/pg_ctl when the tests run as root
ROLE = "tagml"  # the database superuser the tests connect as, with a password (as a bank's services would)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> Path | None:
    """The newest Debian PostgreSQL's bin directory (/usr/lib/postgresql/<major>/bin), or None."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")]
    return max(found, key=lambda p: int(p.parent.name), default=None) if found else None


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str
    password: str

    def url(self, database: str) -> str:
        """A SQLAlchemy URL as MLflow's --backend-store-uri takes it, without the password (libpq reads PGPASSWORD, `secret_env`);
        psycopg2 named (a bare postgresql:// is psycopg 3 under SQLAlchemy 2.1)."""
        return f"postgresql+psycopg2://{quote(self.user)}@{self.host}:{self.port}/{quote(database)}"

    def secret_env(self) -> dict[str, str]:
        """The password as a deployed MLflow server gets it: an environment variable, never in its URI or command line."""
        return {"PGPASSWORD": self.password}

    def dagster_env(self, database: str) -> dict[str, str]:
        """The variables deploy/dagster.yaml reads its storage from."""
        return {
            "DAGSTER_PG_HOST": self.host,
            "DAGSTER_PG_PORT": str(self.port),
            "DAGSTER_PG_USER": self.user,
            "DAGSTER_PG_PASSWORD": self.password,
            "DAGSTER_PG_DB": database,
        }

    def connect(self, database: str = "postgres"):
        import psycopg2

        return psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password, dbname=database)

    def create_database(self, name: str) -> str:
        """A new, empty database `name` (a plain identifier); returns the name."""
        from psycopg2 import sql

        connection = self.connect()
        try:
            connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with connection.cursor() as cursor:
                cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        finally:
            connection.close()
        return name


def _as_server_user(command: list[str]) -> list[str]:
    """initdb and pg_ctl refuse to run as root: as root, run them as the `postgres` system user."""
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", SERVER_USER, "--", *command]


def _ensure_server_user() -> None:
    if os.geteuid() != 0:
        return
    if subprocess.run(["id", "-u", SERVER_USER], capture_output=True, check=False).returncode != 0:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVER_USER], check=True, capture_output=True)


def _run(command: list[str], root: Path) -> None:
    env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    done = subprocess.run(_as_server_user(command), capture_output=True, text=True, env=env, cwd=root, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"{Path(command[0]).name} {command[1] if len(command) > 1 else ''} failed ({done.returncode}): {(done.stderr or done.stdout)[-1500:]}"
        )


@contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """initdb on a fresh temp dir, start on 127.0.0.1 (password auth), yield, stop and remove the dir."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        missing_component("PostgreSQL", "no /usr/lib/postgresql/*/bin/pg_ctl (Debian package postgresql)")
    _ensure_server_user()
    root = Path(tempfile.mkdtemp(prefix="tagml-postgres-"))
    data, password = root / "data", secrets.token_hex(16)
    (root / "pwfile").write_text(password + "\n")
    if os.geteuid() == 0:
        shutil.chown(root, SERVER_USER)
        shutil.chown(root / "pwfile", SERVER_USER)
    server = PostgresServer("127.0.0.1", free_port(), ROLE, password)
    started = False
    try:
        try:
            _start(bin_dir, root, data, server)
        except RuntimeError as exc:
            missing_component("PostgreSQL", exc)
        started = True
        yield server
    finally:
        if started:
            _run([str(bin_dir / "pg_ctl"), "stop", "-D", str(data), "-m", "fast", "-w"], root)
        shutil.rmtree(root, ignore_errors=True)


def _start(bin_dir: Path, root: Path, data: Path, server: PostgresServer) -> None:
    _run([str(bin_dir / "initdb"), "-D", str(data), "-U", ROLE, "--pwfile", str(root / "pwfile"), "--auth", "scram-sha-256", "-E", "UTF8"], root)
    # fsync off: a test server's data is thrown away at the end
    options = f"-c listen_addresses={server.host} -p {server.port} -c unix_socket_directories={root} -c fsync=off -c full_page_writes=off"
    try:
        _run([str(bin_dir / "pg_ctl"), "start", "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "-o", options], root)
    except RuntimeError as exc:
        log = (root / "server.log").read_text()[-1500:] if (root / "server.log").exists() else ""
        raise RuntimeError(f"{exc}\n{log}") from None


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    with running_postgres() as server:
        yield server


# ---- the MLflow tracking server ----


@dataclass(frozen=True)
class MlflowServer:
    url: str
    root: Path  # holds the served artifact root (root / "served") and the server's log
    backend_store_uri: str


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a systemd EnvironmentFile (blank lines and # comments skipped)."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def unit_command(unit: str, env: Mapping[str, str]) -> list[str]:
    """The ExecStart of deploy/systemd/<unit>, its ${VAR}s expanded from `env` as systemd does and the host's files
    replaced by their examples, with this interpreter running the program's module instead of the deployed venv's entry point."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(DEPLOY / "systemd" / unit)
    program, *args = shlex.split(parser["Service"]["ExecStart"])
    module = ENTRY_POINTS[program.removeprefix(DEPLOYED_BIN)]
    return [sys.executable, "-m", module, *(HOST_FILES.get(arg) or re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], arg) for arg in args)]


def deployed_tagml_env(root: Path) -> dict[str, str]:
    """deploy/tagml.env.example with this machine's locations under `root` (and the shipped catalog) instead of the host's,
    and a free code server port."""
    from tagml.core.settings import DEFAULT_CATALOG

    local = {name: str(root / folder) for name, folder in (("TAGML_HOME", "home"), ("TAGML_WAREHOUSE_DIR", "warehouse"), ("TAGML_RAW_DIR", "raw"))}
    return (
        read_env_file(DEPLOY / "tagml.env.example")
        | local
        | {
            "TAGML_REPORTS_DIR": str(root / "reports"),
            "TAGML_CATALOG": str(DEFAULT_CATALOG),
            "DAGSTER_HOME": str(root / "dagster"),
            "DAGSTER_CODE_SERVER_PORT": str(free_port()),
        }
    )


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def running_unit(unit: str, env: Mapping[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """The command of deploy/systemd/<unit> as a process (its own session, output to `log`) until the block ends."""
    with log.open("a") as out:
        process = subprocess.Popen(unit_command(unit, env), env=dict(env), stdout=out, stderr=subprocess.STDOUT, cwd=log.parent, start_new_session=True)
        try:
            yield process
        finally:
            _stop(process)


@contextmanager
def running_mlflow_server(root: Path, backend_store_uri: str, secret_env: Mapping[str, str] | None = None) -> Iterator[MlflowServer]:
    """deploy/systemd/mlflow-server.service's `mlflow server` on 127.0.0.1 (served artifacts under root/served, one worker,
    telemetry off; `secret_env`: extra environment such as PGPASSWORD) until the block ends.

    Starting it again on the same store and root continues where the last one stopped (a restart)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    home = root / "server_home"
    home.mkdir(parents=True, exist_ok=True)
    # the deployed unit's environment, with this test's store, artifact root, port and one worker
    deployed = read_env_file(DEPLOY / "mlflow-server.env.example") | {
        "MLFLOW_BACKEND_STORE_URI": backend_store_uri,
        "MLFLOW_ARTIFACTS_DESTINATION": str(root / "served"),
        "MLFLOW_PORT": str(port),
        "MLFLOW_WORKERS": "1",
        "MLFLOW_ALLOWED_HOSTS": f"127.0.0.1:{port}",
    }
    env = {**os.environ, **deployed, **(secret_env or {}), "HOME": str(home)}
    with (root / "server.log").open("a") as log:
        # its own session: uvicorn's workers go with it when the group is stopped
        process = subprocess.Popen(unit_command("mlflow-server.service", env), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and process.poll() is None and not _healthy(url):
                time.sleep(0.5)
            if not _healthy(url):
                missing_component("mlflow server", f"it did not start on {url}: " + (root / "server.log").read_text()[-2000:])
            yield MlflowServer(url, root, backend_store_uri)
        finally:
            _stop(process)


@pytest.fixture(scope="session")
def mlflow_postgres(postgres, tmp_path_factory) -> Iterator[MlflowServer]:
    """One MLflow tracking server for the session, its backend store a fresh Postgres database `mlflow`."""
    root = tmp_path_factory.mktemp("mlflow_postgres")
    with running_mlflow_server(root, postgres.url(postgres.create_database("mlflow")), postgres.secret_env()) as server:
        yield server
