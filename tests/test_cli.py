"""The CLI's contract with its users: one-line errors with distinct exit codes, JSON on read
commands, a named error for a missing or read-only home, and no traceback when stdout goes away.

Commands run in process through `tagml.cli.main` (the console script's function) where that is
enough, and as a real `python -m tagml.cli` process where the process is the point (pipes, users).
The commands over a trained home (tags, drift, promote, export) are in tests/test_moved_home.py.
"""

import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import pytest

from tagml.cli import main
from tagml.cli.errors import EXIT_CODES, ExitCode
from tagml.core.settings import Settings
from tagml.training.catalog import load_catalog
from tagml.training.tracking import connect_tracking


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """TAGML_HOME for the test (not created), with nothing else of the process's TAGML_* leaking in."""
    for name in list(os.environ):
        if name.startswith("TAGML_") or name in ("MLFLOW_TRACKING_URI", "DAGSTER_HOME"):
            monkeypatch.delenv(name)
    path = tmp_path / "home"
    monkeypatch.setenv("TAGML_HOME", str(path))
    return path


@pytest.fixture(scope="module")
def _empty_home_template(tmp_path_factory) -> Path:
    settings = Settings.from_env({"TAGML_HOME": str(tmp_path_factory.mktemp("template") / "home")})
    settings.ensure_dirs()
    connect_tracking(settings.mlflow_tracking_uri)  # creating MLflow's tables takes seconds: once
    return settings.home


@pytest.fixture
def empty_home(home, _empty_home_template) -> Path:
    """A home with its directories and an (empty) MLflow store, as after `tagml generate` + a failed training."""
    shutil.copytree(_empty_home_template, home)
    (home / "home.json").unlink()  # written where the template was; this copy adopts its own place
    return home


def _messages(err: str) -> list[str]:
    """The CLI's own lines on stderr (library logging may add others)."""
    return [line for line in err.splitlines() if line.startswith("tagml:")]


def test_version_and_help_with_defaults(capsys, home):
    code, out, _ = _run(capsys, "--version")
    assert code == 0 and out.strip() == f"tagml {version('tagml')}"
    code, out, _ = _run(capsys, "generate", "--help")
    assert code == 0 and "--customers" in out and "default: 20000" in out and "Write a synthetic bank" in out
    for command in ("catalog", "leaderboard", "tags", "drift", "export"):
        code, out, _ = _run(capsys, command, "--help")
        assert code == 0 and "--json" in out, command
    code, out, _ = _run(capsys, "drift", "--help")
    assert "--fail-on-drift" in out
    code, out, _ = _run(capsys, "promote", "--help")
    assert "--force" in out and "--reason" in out and "--by" in out
    assert not home.exists()


def test_catalog_prints_the_resolved_catalog(capsys, home):
    code, out, _ = _run(capsys, "catalog", "--json")
    assert code == 0
    printed = {t["tag"]: t for t in json.loads(out)["tags"]}
    catalog = load_catalog()
    assert list(printed) == [t.name for t in catalog.tags]
    for spec in catalog.tags:
        row = printed[spec.name]
        assert (row["kind"], row["classes"], row["owner"], row["sensitivity"]) == (spec.kind, list(spec.classes), spec.owner, spec.sensitivity)
        assert row["features"] == (len(spec.feature_names) if spec.kind == "model" else 0)
    code, out, _ = _run(capsys, "catalog")
    assert code == 0 and all(name in out for name in printed) and "confidential" in out


@pytest.mark.parametrize(
    "args",
    [
        ("leaderboard", "risk_appetite"),
        ("tags", "C000000001"),
        ("drift",),
        ("export", "--out", "tags.parquet", "--purpose", "service"),
        ("promote", "risk_appetite", "1", "--reason", "test"),
        ("rollback", "risk_appetite"),
        ("mlflow-ui",),
    ],
)
def test_read_commands_on_a_missing_home_fail_by_name_and_create_nothing(capsys, home, args):
    # before: leaderboard created an empty MLflow store at ./.tagml and exited 0
    code, _out, err = _run(capsys, *args)
    assert code == ExitCode.CONFIG
    assert err.count("\n") == 1 and "no tagml home at" in err and str(home) in err
    assert not home.exists()


def test_bad_settings_are_one_line_with_the_configuration_code(capsys, home, monkeypatch):
    monkeypatch.setenv("TAGML_THREADS", "abc")
    code, _out, err = _run(capsys, "tags", "C000000001")
    assert code == ExitCode.CONFIG and "TAGML_THREADS='abc'" in err and "whole number" in err and err.count("\n") == 1
    monkeypatch.setenv("TAGML_THREADS", "2")
    monkeypatch.setenv("TAGML_DUCKDB_MEMORY_LIMIT", "lots")
    code, _, err = _run(capsys, "demo", "--customers", "200")
    assert code == ExitCode.CONFIG and "TAGML_DUCKDB_MEMORY_LIMIT" in err
    assert not home.exists()  # nothing ran


def test_an_unknown_variable_is_a_one_line_warning(capsys, home, monkeypatch):
    monkeypatch.setenv("TAGML_TRHEADS", "1")
    code, out, err = _run(capsys, "catalog", "--json")
    assert code == 0 and json.loads(out)["tags"]
    assert "tagml: warning: unknown setting TAGML_TRHEADS is ignored; did you mean TAGML_THREADS?" in err


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (("drift", "--as-of", "2026-13-01"), "'2026-13-01' is not a date"),
        (("tags", "C000000001", "--as-of", "yesterday"), "'yesterday' is not a date"),
        (("export", "--out", "x", "--format", "xml"), "xml"),
        (("export", "--out", "x"), "--purpose"),  # an export names what it is for
        (("export", "--out", "x", "--purpose", "anything"), "anything"),
        (("generate", "--drift", "meteor"), "meteor"),
        (("generate", "--end-month", "2026-1"), "not a month"),
        (("leaderboard",), "Missing argument"),
        (("nosuch",), "No such command"),
    ],
)
def test_bad_arguments_are_usage_errors(capsys, home, args, problem):
    code, _out, err = _run(capsys, *args)
    assert code == ExitCode.USAGE and problem in err and "Traceback" not in err


def test_not_found_has_its_own_code(capsys, empty_home):
    code, _, err = _run(capsys, "leaderboard", "no_such_tag")
    assert code == ExitCode.NOT_FOUND and "no tag 'no_such_tag'" in err and "risk_appetite" in err
    code, _, err = _run(capsys, "drift", "--tag", "value_tier")
    assert code == ExitCode.NOT_FOUND and "rule tag" in err
    code, _, err = _run(capsys, "tags", "C000000001")  # a home that has not scored yet
    assert code == ExitCode.NOT_FOUND and "no tag partition" in err and len(_messages(err)) == 1
    code, _, err = _run(capsys, "drift", "--json")
    assert code == ExitCode.NOT_FOUND and "no drift results" in err


def test_an_unreachable_tracking_server_is_unavailable(capsys, home, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # loopback, nothing listens
    Settings.from_env().ensure_dirs()
    code, _, err = _run(capsys, "leaderboard", "risk_appetite")
    [message] = _messages(err)
    assert code == ExitCode.UNAVAILABLE and "http://127.0.0.1:9" in message and "unreachable" in message


def test_the_exit_code_table_names_real_exceptions():
    for name, code in EXIT_CODES.items():
        module, _, cls = name.rpartition(".")
        exc = getattr(importlib.import_module(module), cls)
        assert issubclass(exc, Exception) and code not in (ExitCode.OK, ExitCode.UNEXPECTED), name
    assert len(set(ExitCode)) == len(ExitCode)


def test_generate_shows_progress_and_prints_its_summary(capsys, home, tmp_path):
    out_dir = tmp_path / "raw"
    code, out, _err = _run(capsys, "generate", "--customers", "300", "--months", "2", "--out", str(out_dir))
    assert code == 0
    summary = json.loads(out)
    assert summary["out"] == str(out_dir) and summary["rows"]["customers"] == 300
    assert (out_dir / "customers" / "part-00000.parquet").exists()
    assert not home.exists()  # --out given: no home needed


def _cli(env: dict[str, str], *args: str, user: list[str] | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([*(user or []), sys.executable, "-m", "tagml.cli", *args], env=env, **kwargs)


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAGML_")}
    source = str(Path(__file__).resolve().parent.parent)
    env.update(TAGML_HOME=str(home), PYTHONPATH=os.pathsep.join([source, *filter(None, [os.environ.get("PYTHONPATH")])]))
    return env


def test_a_closed_stdout_ends_quietly(tmp_path):
    # `tagml contract | head -0`: the reader is gone before the first write
    read, write = os.pipe()
    os.close(read)
    process = _cli(_env(tmp_path / "home"), "contract", stdout=write, stderr=subprocess.PIPE)
    os.close(write)
    _, err = process.communicate(timeout=120)
    assert process.returncode == ExitCode.BROKEN_PIPE, err
    assert b"Traceback" not in err and b"BrokenPipeError" not in err


def test_a_read_only_home_is_named_not_a_sqlite_error(tmp_path):
    """Run as an unprivileged user (root writes through permissions), against a home it cannot write."""
    base = Path(tempfile.mkdtemp(prefix="tagml-ro-"))
    try:
        base.chmod(0o755)
        settings = Settings.from_env({"TAGML_HOME": str(base / "home")})
        settings.ensure_dirs()
        connect_tracking(settings.mlflow_tracking_uri)
        for path in [settings.home, *settings.home.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        user: list[str] = []
        if os.geteuid() == 0:
            setpriv = shutil.which("setpriv")
            assert setpriv, "setpriv (util-linux) is needed to run the CLI as an unprivileged user"
            user = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
        env = {**_env(settings.home), "HOME": str(base)}
        for args in (("generate", "--customers", "200", "--months", "2"), ("promote", "risk_appetite", "1", "--reason", "x")):
            process = _cli(env, *args, user=user, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            _out, err = process.communicate(timeout=180)
            assert process.returncode == ExitCode.CONFIG, err
            assert "is not writable" in err and "Traceback" not in err and err.count("\n") == 1
    finally:
        for path in [base, *base.rglob("*")]:
            path.chmod(0o755)
        shutil.rmtree(base)


def test_the_console_script_is_the_cli_main():
    import tomllib

    import tagml.cli

    scripts = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["tagml"].partition(":")
    assert getattr(importlib.import_module(module), function) is tagml.cli.main


def _tagml_imports(path: Path) -> set[str]:
    import ast

    tree = ast.parse(path.read_text(), filename=str(path))
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}
    # `from tagml import cli` names the CLI as well
    names |= {f"tagml.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "tagml" for a in n.names}
    return names


def test_nothing_below_the_cli_imports_it():
    root = Path(__file__).resolve().parent.parent
    below = [p for top in ("features", "training", "scoring", "monitoring", "orchestration", "tagml") for p in (root / top).rglob("*.py")]
    below = [p for p in below if not p.is_relative_to(root / "tagml" / "cli")]
    assert len(below) > 20
    importers = [str(p.relative_to(root)) for p in below if any(n == "tagml.cli" or n.startswith("tagml.cli.") for n in _tagml_imports(p))]
    assert importers == []


def test_importing_tagml_is_light():
    """`tagml` is the namespace every package will live under: importing it must not pull in the CLI or a framework."""
    code = "import sys, tagml, tagml.core; print(' '.join(sorted(sys.modules)))"
    modules = set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=_env(Path("/nonexistent"))).stdout.split())
    loaded = {m.split(".")[0] for m in modules}
    assert "tagml.core" in modules and not any(m.startswith("tagml.cli") for m in modules)
    assert not loaded & {"typer", "click", "rich", "dagster", "mlflow", "pandas", "duckdb", "evidently", "xgboost", "optuna", "pyarrow"}
