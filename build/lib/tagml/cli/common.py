"""What every command shares: settings from the environment, output helpers, argument parsing."""

import getpass
import json
import math
import sys
from datetime import date
from typing import Any

import typer

from tagml.cli.errors import NotFoundError
from tagml.core.runtime import open_home
from tagml.core.settings import Settings


def load_settings(*, require_home: bool = False, create: bool = False, writes: bool = False) -> Settings:
    """Settings from the environment (a bad value is a named error before anything runs); a moved
    home is re-anchored; read commands refuse a missing home instead of starting an empty one, and
    commands that write refuse a read-only one by name (not with SQLite's error halfway through)."""
    settings = Settings.from_env()
    if require_home:
        settings.require_home()
    if writes or create:
        settings.check_writable()
    if create:
        settings.ensure_dirs()
    moved = open_home(settings)
    if moved is not None:
        note(moved.describe())
    return settings


def note(message: str) -> None:
    print(f"tagml: {message}", file=sys.stderr)


def print_json(payload: Any) -> None:
    print(json.dumps(payload, indent=2, default=str, ensure_ascii=False))


def records(frame: Any) -> list[dict[str, Any]]:
    """A DataFrame as JSON-ready records (NaN -> null, timestamps ISO, arrays -> lists)."""
    return json.loads(frame.to_json(orient="records", date_format="iso", default_handler=str))


def console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # not a terminal (a pipe, a file, a test): rich would wrap at 80 columns
    return Console(file=stream, width=None if stream.isatty() else 200, highlight=False, soft_wrap=not stream.isatty())


def parse_date(value: str | None, option: str = "--as-of") -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a date YYYY-MM-DD", param_hint=option) from None


def is_month(value: str) -> bool:
    try:
        date.fromisoformat(f"{value}-01")
    except ValueError:
        return False
    return len(value) == 7


def current_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no USER/LOGNAME and no passwd entry (some containers)
        return "unknown"


def tag_spec(settings: Settings, name: str, kind: str | None = None):
    from tagml.training.catalog import load_catalog

    catalog = load_catalog(settings.catalog_path)
    try:
        spec = catalog.get(name)
    except KeyError:
        raise NotFoundError(f"no tag {name!r} in the catalog {settings.catalog_path}; known: {', '.join(t.name for t in catalog.tags)}") from None
    if kind and spec.kind != kind:
        names = ", ".join(t.name for t in catalog.tags if t.kind == kind)
        raise NotFoundError(f"tag {name!r} is a {spec.kind} tag, not a {kind} tag; {kind} tags: {names}")
    return spec


def connect(settings: Settings):
    from tagml.core.storage import connect as connect_duckdb

    return connect_duckdb(settings.threads, settings.duckdb_memory_limit)


def tracking_client(settings: Settings):
    from tagml.training.tracking import connect_tracking

    return connect_tracking(settings.mlflow_tracking_uri)


def fmt(value: object, spec: str = ".4f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)
