"""`tagml audience count|export|list`: audiences (圈人) selected by a JSON query over tags (docs/AUDIENCES.md)."""

import json
import sys
from contextlib import closing
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from tagml.cli import common
from tagml.cli.app import app
from tagml.cli.common import current_user, load_settings, parse_date, print_json
from tagml.cli.lookup import ExportFormat, ExportPurpose

audience_app = typer.Typer(name="audience", help="Audiences (圈人): count and export the customers a JSON query over tags selects.", no_args_is_help=True)
app.add_typer(audience_app, name="audience")


class Visibility(str, Enum):
    """Which tags a query may use: published ones; confidential (and restricted) ones only when asked."""

    published = "published"
    confidential = "confidential"


def _read_query(source: str) -> Any:
    from tagml.serving.audiences import AudienceQueryError

    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except OSError as err:
        raise AudienceQueryError(f"--query: cannot read {source}: {err.strerror or err}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise AudienceQueryError(f"--query: {source} is not JSON: {err.msg} at line {err.lineno} column {err.colno}") from None


def _context(settings: Any, include_confidential: bool) -> tuple[Any, frozenset[str]]:
    from tagml.serving.audiences import AudienceSources, visible_tags

    sources = AudienceSources.from_settings(settings)
    return sources, visible_tags(sources, confidential=include_confidential)


def _cap(settings: Any, max_audiences: int | None, days: int | None) -> Any:
    from tagml.serving.audiences import ContactCap

    default = ContactCap.from_settings(settings)
    return ContactCap(default.max_audiences if max_audiences is None else max_audiences, default.days if days is None else days)


QueryOption = Annotated[str, typer.Option("--query", help="a JSON file with the query, or - for standard input")]
AsOfOption = Annotated[str | None, typer.Option(help="YYYY-MM-DD (default: the newest partition)")]
ConfidentialOption = Annotated[bool, typer.Option("--include-confidential", help="allow confidential and restricted tags in the query")]
CapOption = Annotated[int | None, typer.Option("--cap-audiences", help="contact cap: audiences of the purpose (default TAGML_CONTACT_CAP_AUDIENCES; 0: off)")]
CapDaysOption = Annotated[int | None, typer.Option("--cap-days", help="contact cap: within this many days (default TAGML_CONTACT_CAP_DAYS)")]
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON")]


def _print_counts(result: dict[str, Any]) -> None:
    print(f"as of {result['as_of']}: {result['matched']:,} customers match, {result['selected']:,} selected")
    for reason, n in result["excluded"].items():
        print(f"  left out ({reason}): {n:,}")


@audience_app.command("count")
def count_command(
    query: QueryOption,
    purpose: Annotated[ExportPurpose | None, typer.Option(help="count the exclusions of this purpose (consent, contact cap)")] = None,
    as_of: AsOfOption = None,
    include_confidential: ConfidentialOption = False,
    cap_audiences: CapOption = None,
    cap_days: CapDaysOption = None,
    as_json: JsonOption = False,
) -> None:
    """How many customers a query selects, and how many of them a purpose's consent and the contact cap leave out."""
    from tagml.serving.audiences import count_audience

    day = parse_date(as_of)
    payload = _read_query(query)
    settings = load_settings(require_home=True)
    sources, visible = _context(settings, include_confidential)
    with closing(common.connect(settings)) as con:
        result = count_audience(
            con,
            sources,
            payload,
            purpose=purpose.value if purpose else None,
            as_of=day,
            cap=_cap(settings, cap_audiences, cap_days),
            visible_tags=visible,
        ).as_dict()
    if as_json:
        print_json(result)
    else:
        _print_counts(result)


@audience_app.command("export")
def export_command(
    query: QueryOption,
    name: Annotated[str, typer.Option(help="the audience's (campaign's) name, recorded")],
    purpose: Annotated[ExportPurpose, typer.Option(help="what the audience is for: customers without that consent are left out; 'service' needs none")],
    out: Annotated[Path | None, typer.Option(help="file to write (default: under $TAGML_HOME/audiences/); a manifest goes beside it")] = None,
    format: Annotated[ExportFormat, typer.Option(help="file format")] = ExportFormat.parquet,
    as_of: AsOfOption = None,
    include_confidential: ConfidentialOption = False,
    cap_audiences: CapOption = None,
    cap_days: CapDaysOption = None,
    by: Annotated[str, typer.Option(help="who (recorded); default: the current user")] = current_user(),
    as_json: JsonOption = False,
) -> None:
    """Write the audience (customer_id and the values of the tags the query uses), its manifest, its contact history and its record."""
    from tagml.compliance.exports import manifest_path
    from tagml.serving.audiences import export_audience

    day = parse_date(as_of)
    payload = _read_query(query)
    settings = load_settings(require_home=True, writes=True)
    sources, visible = _context(settings, include_confidential)
    with closing(common.connect(settings)) as con:
        record = export_audience(
            con,
            sources,
            payload,
            name=name,
            purpose=purpose.value,
            by=by,
            fmt=format.value,
            out=out,
            as_of=day,
            cap=_cap(settings, cap_audiences, cap_days),
            visible_tags=visible,
        )
    if as_json:
        print_json(record.as_dict())
        return
    _print_counts(record.as_dict())
    print(f"  wrote {record.out} ({', '.join(record.columns)}); manifest {manifest_path(Path(record.out))}")
    print(f"  recorded as audience {record.audience_id} (query {record.query_sha256[:12]})")


@audience_app.command("list")
def list_command(
    limit: Annotated[int, typer.Option(min=1, help="how many, newest first")] = 20,
    as_json: JsonOption = False,
) -> None:
    """The recorded audiences, newest first (counts only)."""
    from tagml.core.governance import GovernanceStore
    from tagml.serving.audiences import recorded_audiences

    settings = load_settings(require_home=True)
    rows = recorded_audiences(GovernanceStore(settings.governance_db), limit)
    if as_json:
        print_json(rows)
        return
    if not rows:
        print("no audiences recorded yet")
    for row in rows:
        excluded = ", ".join(f"{k} {v:,}" for k, v in row["excluded"].items()) or "none"
        print(
            f"{row['at']}  {row['audience_id'][:12]}  {row['name']!r} for {row['purpose']} as of {row['as_of']}: {row['selected']:,} of {row['matched']:,} (left out: {excluded}) by {row['by']}"
        )
        print(f"    {row['out']}")
