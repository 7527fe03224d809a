"""`<tag>/own_features`: per bring-your-own tag and as_of, the snapshot of the bank's own table that
customer_tags scores the tag from and tag_drift measures it on, with its champion's features only."""

from contextlib import closing
from datetime import date
from pathlib import Path

import dagster as dg

from tagml.core.suppression import load_suppression
from tagml.features.own_table import OwnTableSnapshotError
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
        deps=[tag_model_key(tag.name)],
        kinds={"duckdb", "parquet"},
        description=f"{tag.name}: the bank's own table ({Path(source.path).name}) as of the partition date (the latest row per customer "
        "on or before it, where the table has an as_of column), with the champion's features only.",
    )
    def own_features(context: dg.AssetExecutionContext, warehouse: WarehouseResource, mlflow_store: MlflowResource):
        as_of = date.fromisoformat(context.partition_key)
        client = mlflow_store.client()
        version = alias_version(client, tag.name, CHAMPION)
        if version is None:
            raise dg.Failure(description=f"tag {tag.name!r}: no '{CHAMPION}' alias; train and promote a model before snapshotting its own table")
        info = version_info(client, tag.name, version)
        if info.problem:
            raise dg.Failure(description=f"tag {tag.name!r}: the champion {info.producer}: {info.problem}")
        target = own_features_table(Path(warehouse.warehouse_dir), tag.name).path(as_of)
        with closing(warehouse.connect()) as con:
            try:
                suppression = load_suppression(warehouse.governance_path) if warehouse.governance_path is not None else None
                rows = write_own_features(con, tag, info, as_of, target, suppression)
            except OwnTableSnapshotError as err:
                raise dg.Failure(description=str(err)) from err
        # aggregates and column names only: never a value of the bank's table
        return dg.MaterializeResult(
            metadata={
                "rows": rows,
                "as_of": as_of.isoformat(),
                "path": dg.MetadataValue.path(str(target)),
                "champion": info.producer,
                "features": dg.MetadataValue.json(list(info.features)),
                "table": dg.MetadataValue.path(source.path),
            }
        )

    return own_features


def build_own_features_assets(partitions_def: dg.PartitionsDefinition, catalog: Catalog) -> list[dg.AssetsDefinition]:
    return [_own_features_asset(tag, partitions_def) for tag in own_tags(catalog)]
