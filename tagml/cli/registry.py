"""The catalog and the registry: `tagml catalog`, `leaderboard`, `promote`, `rollback`."""

import math
from typing import Annotated, Any

import typer

from tagml.cli.app import app
from tagml.cli.common import console, current_user, load_settings, note, print_json, records, tag_spec, tracking_client
from tagml.core.settings import Settings


def champions(settings: Settings, catalog: Any) -> dict[str, str | None] | None:
    """Each model tag's champion, or None when the registry cannot be asked. A SQLite store that was
    never created has no champions (and is not created just to say so)."""
    from tagml.compliance.dictionary import current_champions
    from tagml.training.tracking import TrackingUnavailableError, sqlite_path

    db = sqlite_path(settings.mlflow_tracking_uri)
    if db is not None and not db.exists():
        return {t.name: None for t in catalog.model_tags}
    try:
        return current_champions(tracking_client(settings), catalog)
    except TrackingUnavailableError:
        return None


@app.command("catalog")
def catalog_command(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="print the dictionary as a markdown document")] = False,
) -> None:
    """The tag dictionary: each tag's owner, meaning, classes, kind, source, refresh, sensitivity, lifecycle status and current producer."""
    from tagml.compliance.dictionary import REGISTRY_UNAVAILABLE, dictionary_markdown, tag_dictionary
    from tagml.compliance.lifecycle import statuses
    from tagml.core.governance import GovernanceStore, utc_now
    from tagml.training.catalog import load_catalog

    settings = load_settings()
    catalog = load_catalog(settings.catalog_path)
    champion = champions(settings, catalog)
    if champion is None:
        note(f"the MLflow registry {settings.mlflow_tracking_uri} is unavailable: model tags' producers are shown as {REGISTRY_UNAVAILABLE!r}")
    rows = tag_dictionary(catalog, statuses(GovernanceStore(settings.governance_db), catalog), champion)
    if as_json:
        print_json({"catalog": str(settings.catalog_path), "tags": rows})
        return
    if markdown:
        print(dictionary_markdown(rows, str(settings.catalog_path), utc_now()), end="")
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"tag dictionary {settings.catalog_path}", title_justify="left")
    columns = ("tag", "owner", "description", "classes", "kind", "source", "refresh", "sensitivity", "status", "producer")
    for column in columns:
        table.add_column(column)
    for r in rows:
        table.add_row(*(Text(", ".join(r[c]) if isinstance(r[c], list) else str(r[c])) for c in columns))
    console().print(table)


@app.command("leaderboard")
def leaderboard_command(
    tag: Annotated[str, typer.Argument(help="a model tag of the catalog")],
    limit: Annotated[int, typer.Option(min=1, help="at most this many runs")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Training runs of a tag ranked by its promotion metric, with versions, aliases and gate decisions."""
    settings = load_settings(require_home=True)
    from tagml.training.registry import leaderboard

    spec = tag_spec(settings, tag, kind="model")
    board = leaderboard(tracking_client(settings), spec, limit=limit)
    if as_json:
        print_json({"tag": tag, "metric": spec.promotion.metric, "runs": [] if board.empty else records(board)})
        return
    if board.empty:
        print(f"no training runs for {tag} yet")
        return
    from rich.table import Table

    table = Table(title=f"{tag}: runs ranked by test {spec.promotion.metric}", title_justify="left")
    shown = board.drop(columns=["run_id"])
    for column in shown.columns:
        table.add_column(str(column))
    for row in shown.itertuples(index=False):
        table.add_row(*("" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}" if isinstance(v, float) else str(v) for v in row))
    console().print(table)


@app.command("promote")
def promote_command(
    tag: Annotated[str, typer.Argument(help="a model tag of the catalog")],
    version: Annotated[str, typer.Argument(help="the registered model version to make champion")],
    reason: Annotated[str | None, typer.Option(help="why (recorded on the version and in the champion history); needed with --force")] = None,
    by: Annotated[str, typer.Option(help="who (recorded); default: the current user")] = current_user(),
    force: Annotated[bool, typer.Option("--force", help="promote a version the gate rejected (give a --reason)")] = False,
) -> None:
    """Make a model version the champion of its tag (recorded with who and why)."""
    settings = load_settings(require_home=True, writes=True)
    from tagml.training.registry import promote

    tag_spec(settings, tag, kind="model")
    if not version.isdigit():
        raise typer.BadParameter(f"{version!r} is not a model version number", param_hint="VERSION")
    overrode = promote(tracking_client(settings), tag, version, by=by, reason=reason, force=force)
    print(f"{tag}: v{version} is now champion" + (" (overriding the gate's rejection, recorded)" if overrode else ""))


@app.command("rollback")
def rollback_command(
    tag: Annotated[str, typer.Argument(help="a model tag of the catalog")],
    reason: Annotated[str, typer.Option(help="why (recorded)")] = "manual rollback",
    by: Annotated[str, typer.Option(help="who (recorded); default: the current user")] = current_user(),
) -> None:
    """Restore the previous champion of a tag (recorded)."""
    settings = load_settings(require_home=True, writes=True)
    from tagml.training.registry import rollback

    tag_spec(settings, tag, kind="model")
    restored = rollback(tracking_client(settings), tag, by=by, reason=reason)
    print(f"{tag}: champion rolled back to v{restored}")
