"""The raw delivery: one multi-asset producing every raw_* asset, staged all together or not at all."""

from contextlib import closing
from datetime import date

import dagster as dg
from pydantic import Field

from tagml.features.contract import RAW_TABLES
from tagml.features.delivery import StagedDelivery, stage_delivery
from tagml.features.raw import CONTRACT_CHECK, ContractError, bank_today
from tagml.orchestration.checks import check_spec
from tagml.orchestration.resources import WarehouseResource

RAW_GROUP = "raw"
MAX_DATES_SHOWN = 31


def raw_asset_name(table: str) -> str:
    return f"raw_{table}"


class RawDeliveryConfig(dg.Config):
    delivery_date: str | None = Field(
        default=None,
        description="Date the raw files were delivered (YYYY-MM-DD); no date in them may be later. Default: today in the bank's timezone.",
    )
    restate: list[str] = Field(
        default_factory=list,
        description="Periods (YYYY-MM-DD: a day of transactions/digital_events, a month end of balances) whose staged rows the delivered "
        "dated files replace. A dated file for a period already staged with other content is refused unless its period is listed here.",
    )
    full: bool = Field(
        default=False,
        description="Re-hash and re-validate every raw file instead of trusting the manifest's size and mtime (the staged result is the same).",
    )


def _violations_markdown(violations: list) -> str:
    # Aggregates only: the example rows (customer keys, offending values) stay in the error message.
    lines = ["| column | rule | rows | detail |", "| --- | --- | --- | --- |"]
    lines += [f"| {v.column or ''} | {v.rule} | {v.n_rows} | {v.detail} |" for v in violations]
    return "\n".join(lines)


def _stage(warehouse: WarehouseResource, con, delivery_date: date, restate: list[str], full: bool) -> StagedDelivery:
    """Incremental staging on DuckDB; Spark stages every table whole (restate is then moot: every period is re-staged)."""
    if warehouse.on_spark:
        return warehouse.stage(con, delivery_date)
    return stage_delivery(con, warehouse.raw_path, warehouse.staged_dir, delivery_date, governance_db=warehouse.governance_path, restate=restate, full=full)


def _dates(days: list[date]) -> str:
    shown = ", ".join(d.isoformat() for d in days[:MAX_DATES_SHOWN])
    return shown + (f" and {len(days) - MAX_DATES_SHOWN} more" if len(days) > MAX_DATES_SHOWN else "")


def _ingest_metadata(delivery: StagedDelivery, table: str) -> dict:
    """What this delivery did to the table: files and rows counted, periods as dates; never a row."""
    ingest = delivery.ingest.get(table)
    if ingest is None:  # Spark: every table staged whole
        return {}
    out = {
        "files_staged": len(ingest.validated),
        "files_skipped": ingest.skipped,
        "files_hashed": ingest.hashed,
        "rows_new": ingest.rows_new,
        "carried_over": ingest.carried,
    }
    if table in delivery.changed_periods:
        changed = delivery.changed_periods[table]
        out |= {"periods_changed": len(changed), "changed_periods": _dates(changed), "periods_restated": _dates(list(ingest.restated))}
    return out


@dg.multi_asset(
    name="raw_delivery",
    group_name=RAW_GROUP,
    specs=[
        dg.AssetSpec(
            raw_asset_name(spec.name),
            description=f"{spec.description} Validated against the raw data contract; PII dropped.",
            kinds={"duckdb", "parquet"},
            group_name=RAW_GROUP,
        )
        for spec in RAW_TABLES
    ],
    check_specs=[check_spec(raw_asset_name(spec.name), CONTRACT_CHECK) for spec in RAW_TABLES],
    description="Validate every raw contract table of the delivery and stage them together (all or nothing).",
)
def raw_delivery(context: dg.AssetExecutionContext, config: RawDeliveryConfig, warehouse: WarehouseResource):
    delivery_date = date.fromisoformat(config.delivery_date) if config.delivery_date else bank_today(warehouse.timezone)
    with closing(warehouse.connect()) as con:
        try:
            delivery = _stage(warehouse, con, delivery_date, config.restate, config.full)
        except ContractError as err:
            by_table: dict[str, list] = {}
            for v in err.violations:
                by_table.setdefault(v.table, []).append(v)
            for table, violations in by_table.items():
                yield dg.AssetCheckResult(
                    asset_key=raw_asset_name(table),
                    check_name=CONTRACT_CHECK.name,
                    passed=False,
                    metadata={"violations": dg.MetadataValue.md(_violations_markdown(violations))},
                )
            raise dg.Failure(description=f"nothing was staged (the delivery of {delivery_date} is all or nothing): {err}") from err
    warehouse.publish_views()
    for name, staged in delivery.tables.items():
        yield dg.MaterializeResult(
            asset_key=raw_asset_name(name),
            metadata={
                "rows": staged.rows,
                "path": dg.MetadataValue.path(str(staged.path)),
                "source": staged.source,
                "delivery_date": delivery_date.isoformat(),
                "generation": delivery.generation.name,
                "pii_columns_dropped": list(staged.dropped_pii),
                "ignored_columns": list(staged.ignored_columns),
                "erased_rows_suppressed": delivery.suppressed_rows.get(name, 0),
                **_ingest_metadata(delivery, name),
            },
            check_results=[dg.AssetCheckResult(asset_key=raw_asset_name(name), check_name=CONTRACT_CHECK.name, passed=True, metadata={"rows": staged.rows})],
        )


RAW_ASSETS = [raw_delivery]
