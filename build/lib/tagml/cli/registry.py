"""The catalog and the registry: `tagml catalog`, `leaderboard`, `promote`, `rollback`."""

import math
from typing import Annotated

import typer

from tagml.cli.app import app
from tagml.cli.common import console, current_user, load_settings, print_json, records, tag_spec, tracking_client


@app.command("catalog")
def catalog_command(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """The resolved tag catalog: each tag's kind, classes, features, owner and sensitivity."""
    from tagml.training.catalog import load_catalog

    settings = load_settings()
    catalog = load_catalog(settings.catalog_path)
    rows = [
        {
            "tag": t.name,
            "kind": t.kind,
            "classes": list(t.classes),
            "features": len(t.feature_names) if t.kind == "model" else 0,
            "owner": t.owner,
            "sensitivity": t.sensitivity,
            "refresh": t.refresh,
            "promotion_metric": t.promotion.metric if t.kind == "model" else None,
            "description": " ".join(t.description.split()),
        }
        for t in catalog.tags
    ]
    if as_json:
        print_json({"catalog": str(settings.catalog_path), "tags": rows})
        return
    from rich.table import Table

    table = Table(title=f"tag catalog {settings.catalog_path}", title_justify="left")
    for column in ("tag", "kind", "classes", "features", "owner", "sensitivity", "refresh"):
        table.add_column(column, justify="right" if column == "features" else "left")
    for r in rows:
        table.add_row(
            r["tag"], r["kind"], ", ".join(r["classes"]), str(r["features"]) if r["kind"] == "model" else "-", r["owner"], r["sensitivity"], r["refresh"]
        )
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
