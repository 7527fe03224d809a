"""`<tag>/own_features`: per bring-your-own tag and as_of, the snapshot of the bank's own table that
customer_tags scores the tag from and tag_drift measures it on, with its champion's features only."""

from contextlib import closing
from datetime import date
from pathlib import Path

import dagster as dg

from tagml.core.suppression import load_suppression
from tagml.features.own_table import OwnTableSnapshotError
from tagml.orchestration.partitions import SINGLE_RUN_BACKFILL, as_of_dates
from tagml.orchestration.resources import MlflowResource, WarehouseResource
from tagml.orchestration.training_assets import tag_model_key
from tagml.scoring.sources import own_features_table, own_source, own_tags, write_own_features
from tagml.training.catalog import Catalog, TagSpec
from tagml.training.registry import CHAMPION, alias_version, version_info

OWN_FEATURES_GROUP = "own_features"


def own_features_key(tag: str) -> dg.AssetKey:
    return dg.AssetKey([tag, "own_features"])


def _own_features_asset(tag: TagSpec, partitions_def: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    source = own_source(tag)
    assert source is not None

    @dg.asset(
        key=own_features_key(tag.name),
        group_name=OWN_FEATURES_GROUP,
        partitions_def=partitions_def,
        backfill_policy=SINGLE_RUN_BACKFILL,
        deps=[tag_model_key(tag.name)],
        kinds={"duckdb", "parquet"},
        description=f"{tag.name}: the bank's own table ({Path(source.path).name}) as of the partition date (the latest row per customer "
        "on or before it, where the table has an as_of column), with the champion's features only.",
    )
    def own_features(context: dg.AssetExecutionContext, warehouse: WarehouseResource, mlflow_store: MlflowResource):
        # a backfill's range in one run, oldest first: the champion and the suppression list are resolved once
        client = mlflow_store.client()
        version = alias_version(client, tag.name, CHAMPION)
        if version is None:
            raise dg.Failure(description=f"tag {tag.name!r}: no '{CHAMPION}' alias; train and promote a model before snapshotting its own table")
        info = version_info(client, tag.name, version)
        if info.problem:
            raise dg.Failure(description=f"tag {tag.name!r}: the champion {info.producer}: {info.problem}")
        table = own_features_table(Path(warehouse.warehouse_dir), tag.name)
        written: dict[str, int] = {}
        with closing(warehouse.connect()) as con:
            suppression = load_suppression(warehouse.governance_path) if warehouse.governance_path is not None else None
            for as_of in as_of_dates(context):
                try:
                    written[as_of.isoformat()] = write_own_features(con, tag, info, as_of, table.path(as_of), suppression)
                except OwnTableSnapshotError as err:
                    raise dg.Failure(description=str(err)) from err
        # aggregates and column names only: never a value of the bank's table
        common = {"champion": info.producer, "features": dg.MetadataValue.json(list(info.features)), "table": dg.MetadataValue.path(source.path)}
        if len(written) == 1:
            ((as_of, rows),) = written.items()
            path = table.path(date.fromisoformat(as_of))
            return dg.MaterializeResult(metadata={"rows": rows, "as_of": as_of, "path": dg.MetadataValue.path(str(path)), **common})
        # a range: Dagster records this metadata on every partition of the range, so it is keyed by as_of
        return dg.MaterializeResult(
            metadata={"partitions": len(written), "as_of": f"{min(written)}..{max(written)}", "rows_by_as_of": dg.MetadataValue.json(written), **common}
        )

    return own_features


def build_own_features_assets(partitions_def: dg.PartitionsDefinition, catalog: Catalog) -> list[dg.AssetsDefinition]:
    return [_own_features_asset(tag, partitions_def) for tag in own_tags(catalog)]
