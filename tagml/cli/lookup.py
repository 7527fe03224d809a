"""The tag store: `tagml tags` (one customer) and `tagml export` (one partition)."""

import functools
from contextlib import closing
from datetime import date
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from tagml.cli import common
from tagml.cli.app import app
from tagml.cli.common import load_settings, parse_date, print_json, tracking_client
from tagml.core.settings import Settings


class ExportFormat(str, Enum):
    parquet = "parquet"
    csv = "csv"


def customer_tags(settings: Settings, customer_id: str, as_of: date | None, lineage: bool) -> dict[str, Any]:
    """One customer's tags as plain data (printed as text or JSON); MLflow is opened only for a model tag's lineage."""
    from tagml.scoring.lookup import customer_tags as lookup
    from tagml.scoring.store import ParquetTagStore
    from tagml.training.registry import lineage as model_lineage

    @functools.cache
    def client() -> Any:
        return tracking_client(settings)

    def version_lineage(tag: str, version: str) -> dict[str, Any]:
        return model_lineage(client(), tag, version)

    with closing(common.connect(settings)) as con:
        return lookup(con, ParquetTagStore.in_warehouse(settings.warehouse_dir), customer_id, as_of, version_lineage if lineage else None)


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
    out: Annotated[Path, typer.Option(help="file to write")],
    as_of: Annotated[str | None, typer.Option(help="YYYY-MM-DD (default: the newest partition)")] = None,
    format: Annotated[ExportFormat, typer.Option(help="file format")] = ExportFormat.parquet,
    as_json: Annotated[bool, typer.Option("--json", help="print what was written as JSON")] = False,
) -> None:
    """Write one tag partition for downstream systems (CRM, marketing)."""
    from tagml.scoring.store import ParquetTagStore

    day = parse_date(as_of)
    settings = load_settings(require_home=True)
    # an export inside the warehouse would be read back as data (a fake tag partition): refused by name
    store = ParquetTagStore.in_warehouse(settings.warehouse_dir)
    partition = store.latest_on_or_before(day)
    with closing(common.connect(settings)) as con:
        rows = store.export(con, partition, format.value, out)
    if as_json:
        print_json({"as_of": partition.isoformat(), "rows": rows, "format": format.value, "out": str(out)})
    else:
        print(f"exported {rows:,} tag rows of {partition} to {out}")
