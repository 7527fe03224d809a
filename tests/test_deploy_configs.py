"""The example deployment under deploy/ is loaded by what loads it in production, so docs/DEPLOYMENT.md cannot
rot: dagster.yaml through Dagster's instance config schema, the env template through tagml's Settings, every
systemd unit's command line through the CLI it starts, and workspace.yaml through Dagster's workspace loader
against a real code server started from its unit. (tests/test_postgres_dagster.py runs tagml on an instance
loaded from dagster.yaml; the MLflow server tests start the server from its unit.)"""

import configparser
import os
import re
import shlex
import shutil
import time
import warnings

import click
import pytest
import yaml

from tagml.core.settings import VARIABLES, Settings
from tests.postgres import DEPLOY, DEPLOYED_BIN, HOST_FILES, deployed_tagml_env, listening, read_env_file, running_unit

UNITS = sorted(p.name for p in (DEPLOY / "systemd").glob("*.service"))
# what each unit's EnvironmentFile is on the host -> its template in deploy/ (None: secrets, never templated)
ENV_FILES = {
    "/etc/tagml/tagml.env": DEPLOY / "tagml.env.example",
    "/etc/tagml/mlflow-server.env": DEPLOY / "mlflow-server.env.example",
    "/etc/tagml/secrets.env": None,
    "/etc/tagml/mlflow-secrets.env": None,
}
# the only variables the secrets files hold (docs/DEPLOYMENT.md, "Secrets")
SECRETS = {"DAGSTER_PG_PASSWORD", "PGPASSWORD", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}


def _env_names(node) -> set[str]:
    """Every `env:` variable a Dagster YAML file reads."""
    if isinstance(node, dict):
        return ({node["env"]} if set(node) == {"env"} else set()).union(*(_env_names(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_env_names(v) for v in node))
    return set()


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(DEPLOY / "systemd" / name)
    return parser


def _environment_files(name: str) -> list[str]:
    return re.findall(r"^EnvironmentFile=-?(\S+)$", (DEPLOY / "systemd" / name).read_text(), flags=re.MULTILINE)


def test_dagster_yaml_passes_the_instance_schema_and_reads_its_secrets_from_the_environment(tmp_path):
    from dagster._core.instance.config import dagster_instance_config

    shutil.copy(DEPLOY / "dagster.yaml", tmp_path / "dagster.yaml")
    config, _ = dagster_instance_config(str(tmp_path))  # raises DagsterInvalidConfigError on any unknown or mistyped key
    assert set(config["storage"]) == {"postgres"} and config["run_launcher"]["class"] == "DefaultRunLauncher"
    assert config["telemetry"] == {"enabled": False} and config["run_monitoring"]["enabled"] and config["retention"]["schedule"]["purge_after_days"] == 90
    names = _env_names(yaml.safe_load((DEPLOY / "dagster.yaml").read_text()))
    assert names == {"DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB"}
    template = read_env_file(DEPLOY / "tagml.env.example")
    assert names - set(template) == {"DAGSTER_PG_PASSWORD"}  # every other one is in the template; the password is a secret


def test_the_env_template_is_valid_tagml_settings_and_holds_no_secret():
    template = read_env_file(DEPLOY / "tagml.env.example")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unknown (misspelt) TAGML_* variable would warn
        settings = Settings.from_env(template)
    assert settings.engine == "spark" and settings.spark_master == "yarn" and settings.run_retention_days == 90
    assert settings.mlflow_tracking_uri.startswith("http://") and str(settings.dagster_home) == template["DAGSTER_HOME"]
    assert {k for k in template if k.startswith("TAGML_")} <= set(VARIABLES)
    for path in (DEPLOY / "tagml.env.example", DEPLOY / "mlflow-server.env.example"):
        values = read_env_file(path)
        assert not SECRETS & set(values), path.name
        assert not [k for k, v in values.items() if re.search(r"://[^/@\s]*:[^/@\s]*@", v)], f"{path.name}: a password inside a URI"


@pytest.mark.parametrize("unit", UNITS)
def test_each_systemd_unit_starts_a_command_its_cli_accepts_with_variables_its_env_files_define(unit):
    from dagster._cli import create_dagster_cli
    from dagster._daemon.cli import create_dagster_daemon_cli
    from dagster_webserver.cli import create_dagster_webserver_cli
    from mlflow.cli import cli as mlflow_cli

    clis = {
        "dagster": create_dagster_cli(),
        "dagster-daemon": create_dagster_daemon_cli(),
        "dagster-webserver": create_dagster_webserver_cli(),
        "mlflow": mlflow_cli,
    }
    parser = _unit(unit)
    assert {"Unit", "Service", "Install"} <= set(parser.sections()) and parser["Service"]["User"] != "root"
    files = _environment_files(unit)
    assert files and set(files) <= set(ENV_FILES), files
    defined = set().union(*(read_env_file(ENV_FILES[f]) for f in files if ENV_FILES[f] is not None))
    program, *args = shlex.split(parser["Service"]["ExecStart"])
    assert program.startswith(DEPLOYED_BIN)
    assert set(re.findall(r"\$\{(\w+)\}", " ".join(args))) <= defined
    # the command line parses with the installed CLI (an option renamed by an upgrade fails here)
    assert {a for a in args if a.startswith("/etc/")} <= set(HOST_FILES)
    expanded = [HOST_FILES.get(arg) or re.sub(r"\$\{(\w+)\}", "1" if arg.endswith("PORT}") else "x", arg) for arg in args]
    command = clis[program.removeprefix(DEPLOYED_BIN)]
    context = command.make_context(program, expanded)
    while isinstance(command, click.Group):
        name, command, rest = command.resolve_command(context, [*context.protected_args, *context.args])
        context = command.make_context(name, rest, parent=context)
    assert not context.args


@pytest.mark.slow  # a real code server loads tagml's definitions (~20 s on two busy cores)
def test_the_workspace_loads_the_code_location_from_the_code_server_its_unit_starts(tmp_path, monkeypatch):
    import dagster as dg
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import WorkspaceFileTarget

    env = {**os.environ, **deployed_tagml_env(tmp_path)}
    port = int(env["DAGSTER_CODE_SERVER_PORT"])
    (tmp_path / "dagster").mkdir()
    (tmp_path / "dagster" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with running_unit("tagml-code-server.service", env, tmp_path / "code_server.log") as process:
        for name in ("DAGSTER_CODE_SERVER_HOST", "DAGSTER_CODE_SERVER_PORT"):
            monkeypatch.setenv(name, env[name])
        deadline = time.monotonic() + 180
        while process.poll() is None and time.monotonic() < deadline and not listening(port):
            time.sleep(0.5)
        with dg.DagsterInstance.from_config(str(tmp_path / "dagster")) as instance:
            while True:
                with WorkspaceProcessContext(instance, WorkspaceFileTarget(paths=[HOST_FILES["/etc/tagml/workspace.yaml"]])) as workspace:
                    entry = workspace.create_request_context().get_code_location_entries()["tagml"]
                    if entry.code_location is not None or process.poll() is not None or time.monotonic() > deadline:
                        break
                time.sleep(2)
            assert entry.code_location is not None, (entry.load_error, (tmp_path / "code_server.log").read_text()[-2000:])
            [repository] = entry.code_location.get_repositories().values()
            jobs = {job.name for job in repository.get_all_jobs()}
            assert {"nightly_scoring_job", "raw_ingest_job", "purge_old_runs_job"} <= jobs
            assert "purge_old_runs_schedule" in {schedule.name for schedule in repository.get_schedules()}


def test_the_deployment_guide_names_every_example_file_and_only_real_settings():
    guide = (DEPLOY.parent / "docs" / "DEPLOYMENT.md").read_text()
    files = sorted(str(p.relative_to(DEPLOY)) for p in DEPLOY.rglob("*") if p.is_file())
    assert [f for f in files if f.rsplit("/", 1)[-1] not in guide] == []
    assert set(re.findall(r"\bTAGML_[A-Z_]+\b", guide)) <= set(VARIABLES)
    assert not re.findall(r"\]\((?:https?:)?//", guide)  # links stay inside the repository
    for target in re.findall(r"\]\((\.\./[^)]+)\)", guide):
        assert (DEPLOY.parent / "docs" / target).resolve().exists(), target
