"""The tag lifecycle: `tagml approve`, `publish`, `retire`, `reopen` and `status` (recorded in the governance store)."""

from typing import Annotated

import typer

from tagml.cli.app import app
from tagml.cli.common import console, current_user, load_settings, print_json, tag_spec

TAG = Annotated[str, typer.Argument(help="a tag of the catalog")]


def printable(text: str) -> str:
    """Recorded names and reasons are data: control characters are shown escaped, never sent to the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _governance(settings):
    from tagml.core.governance import GovernanceStore

    return GovernanceStore(settings.governance_db)


def _move(tag: str, to: str, by: str, reason: str) -> None:
    from tagml.compliance import lifecycle

    settings = load_settings(writes=True)  # no MLflow store needed: a tag may be approved before it is ever trained
    spec = tag_spec(settings, tag)
    step = {"approved": lifecycle.approve, "published": lifecycle.publish, "retired": lifecycle.retire, "draft": lifecycle.reopen}[to]
    status = step(_governance(settings), spec, by=by, reason=reason)
    print(f"{tag}: {status.label} (by {printable(status.last.by)}, catalog entry {status.last.entry_hash})")


@app.command("approve")
def approve_command(
    tag: TAG,
    reason: Annotated[str, typer.Option(help="why the definition is fit for use (recorded)")],
    by: Annotated[str, typer.Option(help="who (recorded); default: the current user")] = current_user(),
) -> None:
    """Approve a draft tag's catalog entry as it is now (a later change to the entry needs a new approval)."""
    _move(tag, "approved", by, reason)


@app.command("publish")
def publish_command(
    tag: TAG,
    reason: Annotated[str, typer.Option(help="why (recorded)")] = "published",
    by: Annotated[str, typer.Option(help="who (recorded); default: the current user")] = current_user(),
) -> None:
    """Publish an approved tag: exports and lookups show it from now on. Its approver may not publish it (four-eyes)."""
    _move(tag, "published", by, reason)


@app.command("retire")
def retire_command(
    tag: TAG,
    reason: Annotated[str, typer.Option(help="why (recorded)")],
    by: Annotated[str, typer.Option(help="who (recorded); default: the current user")] = current_user(),
) -> None:
    """Retire a published tag: exports and lookups no longer show it."""
    _move(tag, "retired", by, reason)


@app.command("reopen")
def reopen_command(
    tag: TAG,
    reason: Annotated[str, typer.Option(help="why (recorded)")],
    by: Annotated[str, typer.Option(help="who (recorded); default: the current user")] = current_user(),
) -> None:
    """Return a tag to draft (withdraw its approval or publication, or bring back a retired tag); it needs a new approval."""
    _move(tag, "draft", by, reason)


@app.command("status")
def status_command(
    tag: Annotated[str | None, typer.Argument(help="a tag of the catalog: its full history (default: every tag's status)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Each catalog tag's lifecycle status, or one tag's history of decisions."""
    from dataclasses import asdict

    from tagml.compliance import lifecycle
    from tagml.training.catalog import load_catalog

    settings = load_settings()
    governance = _governance(settings)
    if tag is None:
        current = lifecycle.statuses(governance, load_catalog(settings.catalog_path))
        rows = [{"tag": s.tag, "status": s.label, **({"by": s.last.by, "at": s.last.at} if s.last else {"by": None, "at": None})} for s in current.values()]
        if as_json:
            print_json({"tags": rows})
            return
        from rich.table import Table
        from rich.text import Text

        table = Table(title=f"tag lifecycle ({settings.governance_db})", title_justify="left")
        for column in ("tag", "status", "by", "at"):
            table.add_column(column)
        for row in rows:
            table.add_row(*(Text(printable(row[c] or "-")) for c in ("tag", "status", "by", "at")))
        console().print(table)
        return
    spec = tag_spec(settings, tag)
    current = lifecycle.statuses(governance, load_catalog(settings.catalog_path))[spec.name]
    events = [asdict(e) for e in lifecycle.history(governance, spec.name)]
    if as_json:
        print_json({"tag": spec.name, "status": current.label, "allowed": list(current.allowed), "history": events})
        return
    print(f"{spec.name}: {current.label} (next: {', '.join(current.allowed)})")
    for event in events:
        print(f"  {event['at']}  {event['status']:<9} by {printable(event['by'])}: {printable(event['reason'])} (catalog entry {event['entry_hash']})")
