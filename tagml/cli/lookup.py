"""The tag store: `tagml tags` (one customer's published tags) and `tagml export` (a partition's published tags, for a purpose)."""

import functools
from contextlib import closing
from datetime import date
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from tagml.cli import common
from tagml.cli.app import app
from tagml.cli.common import current_user, load_settings, parse_date, print_json, tracking_client
from tagml.core.settings import Settings


class ExportFormat(str, Enum):
    parquet = "parquet"
    csv = "csv"


class ExportPurpose(str, Enum):
    """tagml.compliance.consent.EXPORT_PURPOSES (tests/test_consent.py holds them equal)."""

    marketing = "marketing"
    personalisation = "personalisation"
    profiling = "profiling"
    service = "service"


def customer_tags(settings: Settings, customer_id: str, as_of: date | None, lineage: bool) -> dict[str, Any]:
    """One customer's published tags as plain data (printed as text or JSON); MLflow is opened only for a model tag's lineage."""
    from tagml.compliance.lifecycle import published_tags
    from tagml.core.governance import GovernanceStore
    from tagml.scoring.lookup import customer_tags as lookup
    from tagml.scoring.store import ParquetTagStore
    from tagml.training.catalog import load_catalog
    from tagml.training.registry import lineage as model_lineage

    @functools.cache
    def client() -> Any:
        return tracking_client(settings)

    def version_lineage(tag: str, version: str) -> dict[str, Any]:
        return model_lineage(client(), tag, version)

    with closing(common.connect(settings)) as con:
        published = published_tags(GovernanceStore(settings.governance_db), load_catalog(settings.catalog_path))
        store = ParquetTagStore.in_warehouse(settings.warehouse_dir)
        return lookup(con, store, customer_id, as_of, version_lineage if lineage else None, published=published)


def print_tags(result: dict[str, Any]) -> None:
    from tagml.scoring.lookup import is_present

    print(f"customer {result['customer_id']}, tags as of {result['as_of']} (scored {result['scored_at']} UTC)")
    for row in result["tags"]:
        line = f"  {row['tag']:<16} {row['value']:<16}"
        if is_present(row["probability"]):
            line += f" p={row['probability']:.2f}"
        line += f"  [{row['source']}"
        if row["assessment"] == "expired":
            line += f"; assessment {row['observed_value']} of {row['assessed_on']} expired, inferred {row['inferred_value']}"
        elif is_present(row["observed_value"]) and row["observed_mismatch"] is True:
            line += f"; model says {row['inferred_value']}, observed {row['observed_value']}"
        line += f"]  by {row['producer']}"
        print(line)
        if row["probabilities"]:
            print("      probabilities: " + ", ".join(f"{k} {v:.2f}" for k, v in row["probabilities"].items()))
        if row["reasons"]:
            print("      reasons: " + "; ".join(row["reasons"]))
        if "lineage" in row:
            info = row["lineage"]
            print(
                f"      lineage: {info['model']} <- run {info['mlflow_run_id']} <- snapshot {info['data_snapshot']} "
                f"(catalog {info['catalog_hash']}, code {info['code_version']})"
            )
    if result["hidden"]:
        print(f"  not shown (not published): {', '.join(result['hidden'])}")


@app.command("tags")
def tags_command(
    customer_id: Annotated[str, typer.Argument(help="the customer's id")],
    as_of: Annotated[str | None, typer.Option(help="YYYY-MM-DD (default: the newest partition)")] = None,
    lineage: Annotated[bool, typer.Option("--lineage/--no-lineage", help="look up each model version's lineage in MLflow")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """A customer's tags with probabilities, reasons and lineage."""
    day = parse_date(as_of)
    settings = load_settings(require_home=True)
    result = customer_tags(settings, customer_id, day, lineage)
    if as_json:
        print_json(result)
    else:
        print_tags(result)


@app.command("export")
def export_command(
    out: Annotated[Path, typer.Option(help="file to write (a manifest is written beside it: <out>.manifest.json)")],
    purpose: Annotated[ExportPurpose, typer.Option(help="what the export is for: customers without that consent are left out; 'service' needs no consent")],
    as_of: Annotated[str | None, typer.Option(help="YYYY-MM-DD (default: the newest partition)")] = None,
    format: Annotated[ExportFormat, typer.Option(help="file format")] = ExportFormat.parquet,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="export only this tag (repeatable; default: every published tag)")] = None,
    include_confidential: Annotated[bool, typer.Option("--include-confidential", help="also export confidential and restricted tags")] = False,
    by: Annotated[str, typer.Option(help="who (recorded); default: the current user")] = current_user(),
    as_json: Annotated[bool, typer.Option("--json", help="print the export's record as JSON")] = False,
) -> None:
    """Write the published tags of one partition for downstream systems (CRM, marketing), for a purpose; the decision is recorded."""
    from tagml.compliance.exports import ExportSources, export_tags, manifest_path

    day = parse_date(as_of)
    settings = load_settings(require_home=True, writes=True)
    with closing(common.connect(settings)) as con:
        record = export_tags(
            con,
            ExportSources.from_settings(settings),
            purpose=purpose.value,
            out=out,
            by=by,
            as_of=day,
            fmt=format.value,
            tags=tag or None,
            include_confidential=include_confidential,
        )
    if as_json:
        print_json(record.as_dict())
        return
    print(f"exported {record.rows:,} tag rows of {record.customers:,} customers ({', '.join(record.tags)}) of {record.as_of} to {out} for {record.purpose}")
    if record.excluded:
        print("  customers left out: " + ", ".join(f"{reason} {n:,}" for reason, n in record.excluded.items()))
    for name, why in record.left_out.items():
        print(f"  tag {name} left out: {why}")
    print(f"  recorded as export {record.export_id}; manifest {manifest_path(out)}")
