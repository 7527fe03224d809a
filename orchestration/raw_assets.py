"""One asset per raw contract table: validate, drop PII, stage as Parquet (all or nothing)."""

from contextlib import closing

import dagster as dg

from features.contract import RAW_TABLES, TableSpec
from features.raw import ContractError, validate_and_stage
from orchestration.checks import check_spec
from orchestration.resources import WarehouseResource

RAW_GROUP = "raw"


def raw_asset_name(table: str) -> str:
    return f"raw_{table}"


def _violations_markdown(err: ContractError) -> str:
    lines = ["| column | rule | rows | detail | examples |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {v.column or ''} | {v.rule} | {v.n_rows} | {v.detail} | {list(v.examples)} |" for v in err.violations]
    return "\n".join(lines)


def build_raw_asset(spec: TableSpec) -> dg.AssetsDefinition:
    name = raw_asset_name(spec.name)
    deps = [raw_asset_name("customers")] if spec.references_customers else []

    @dg.asset(
        name=name,
        group_name=RAW_GROUP,
        deps=deps,
        description=f"{spec.description} Validated against the raw data contract; PII dropped.",
        check_specs=[check_spec(name, "contract", "Every column, type, allowed value, key and rule of the contract holds.")],
        kinds={"duckdb", "parquet"},
    )
    def _raw_asset(context: dg.AssetExecutionContext, warehouse: WarehouseResource):
        with closing(warehouse.connect()) as con:
            try:
                staged = validate_and_stage(con, spec, warehouse.raw_path, warehouse.staged_dir)
            except ContractError as err:
                yield dg.AssetCheckResult(
                    check_name="contract",
                    passed=False,
                    metadata={"violations": dg.MetadataValue.md(_violations_markdown(err))},
                )
                raise dg.Failure(description=str(err)) from err
        warehouse.publish_views()
        yield dg.MaterializeResult(
            metadata={
                "rows": staged.rows,
                "path": dg.MetadataValue.path(str(staged.path)),
                "source": staged.source,
                "pii_columns_dropped": list(staged.dropped_pii),
                "ignored_columns": list(staged.ignored_columns),
            },
            check_results=[dg.AssetCheckResult(check_name="contract", passed=True, metadata={"rows": staged.rows})],
        )

    return _raw_asset


RAW_ASSETS = [build_raw_asset(spec) for spec in RAW_TABLES]
