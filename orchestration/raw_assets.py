"""The raw delivery: one multi-asset producing every raw_* asset, staged all together or not at all."""

from contextlib import closing
from datetime import date

import dagster as dg
from pydantic import Field

from tagml.features.contract import RAW_TABLES
from tagml.features.raw import CONTRACT_CHECK, ContractError, bank_today
from tagml.orchestration.checks import check_spec
from tagml.orchestration.resources import WarehouseResource

RAW_GROUP = "raw"


def raw_asset_name(table: str) -> str:
    return f"raw_{table}"


class RawDeliveryConfig(dg.Config):
    delivery_date: str | None = Field(
        default=None,
        description="Date the raw files were delivered (YYYY-MM-DD); no date in them may be later. Default: today in the bank's timezone.",
    )


def _violations_markdown(violations: list) -> str:
    # Aggregates only: the example rows (customer keys, offending values) stay in the error message.
    lines = ["| column | rule | rows | detail |", "| --- | --- | --- | --- |"]
    lines += [f"| {v.column or ''} | {v.rule} | {v.n_rows} | {v.detail} |" for v in violations]
    return "\n".join(lines)


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
            delivery = warehouse.stage(con, delivery_date)
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
            },
            check_results=[dg.AssetCheckResult(asset_key=raw_asset_name(name), check_name=CONTRACT_CHECK.name, passed=True, metadata={"rows": staged.rows})],
        )


RAW_ASSETS = [raw_delivery]
