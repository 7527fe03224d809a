"""customer_tags as Dagster materializes it: the blocking coverage check is evaluated on the file
before it replaces the partition, and a failing one leaves the published partition as it was."""

from datetime import date

import dagster as dg
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tagml.core.settings import Settings
from tagml.core.storage import WarehouseLayout
from tagml.orchestration.partitions import as_of_partitions
from tagml.orchestration.resources import MlflowResource, WarehouseResource
from tagml.orchestration.scoring_assets import build_customer_tags_asset
from tagml.training.catalog import load_catalog
from tests.test_scoring import small_catalog

AS_OF = date(2026, 6, 30)


def test_failing_coverage_is_reported_from_the_validated_file_and_publishes_nothing(bank_features, tmp_path):
    settings = Settings.from_env({"TAGML_HOME": str(tmp_path / "home")})
    catalog = load_catalog(small_catalog(tmp_path, include=("value_tier", "lifecycle_stage")))  # rule tags: no registry needed
    asset = build_customer_tags_asset(as_of_partitions(settings), catalog)
    resources = {"warehouse": WarehouseResource.from_settings(settings), "mlflow_store": MlflowResource.from_settings(settings)}
    snapshot = WarehouseLayout(settings.warehouse_dir).customer_features.path(AS_OF)
    snapshot.parent.mkdir(parents=True)
    good = pq.read_table(bank_features[AS_OF])
    pq.write_table(good, snapshot)
    instance = dg.DagsterInstance.ephemeral()

    ok = dg.materialize([asset], resources=resources, partition_key=AS_OF.isoformat(), instance=instance)
    [check] = [c for c in ok.get_asset_check_evaluations() if c.check_name == "coverage"]
    assert check.passed and check.metadata["customers"].value == good.num_rows
    assert check.metadata["expected_rows"].value == check.metadata["rows"].value == 2 * good.num_rows
    published = settings.warehouse_dir / "customer_tags" / f"as_of={AS_OF}" / "data.parquet"
    before = pd.read_parquet(published)

    # one customer twice in the snapshot: each tag gets a duplicate row
    pq.write_table(pa.concat_tables([good, good.slice(0, 1)]), snapshot)
    failed = dg.materialize([asset], resources=resources, partition_key=AS_OF.isoformat(), instance=instance, raise_on_error=False)
    assert not failed.success
    [check] = failed.get_asset_check_evaluations()
    assert not check.passed and check.metadata["duplicates"].value == 2 and check.metadata["rows"].value == 2 * good.num_rows + 2
    assert "the partition was not replaced" in check.description
    assert not failed.get_asset_materialization_events()
    pd.testing.assert_frame_equal(pd.read_parquet(published), before)
    assert sorted(p.name for p in published.parent.iterdir()) == ["data.parquet"]


def test_a_feature_gone_empty_is_caught_by_the_stability_check(bank_features, tmp_path):
    """aum_total all NULL: coverage passes (every customer has every tag) but value_tier moves everyone
    to 'mass'; the stability check against the previous partition names the tag."""
    settings = Settings.from_env({"TAGML_HOME": str(tmp_path / "home")})
    catalog = load_catalog(small_catalog(tmp_path, include=("value_tier", "lifecycle_stage")))
    asset = build_customer_tags_asset(as_of_partitions(settings), catalog)
    resources = {"warehouse": WarehouseResource.from_settings(settings), "mlflow_store": MlflowResource.from_settings(settings)}
    good = pq.read_table(bank_features[AS_OF])
    instance = dg.DagsterInstance.ephemeral()
    results = {}
    for day, table in (
        (date(2026, 6, 29), good),
        (AS_OF, good.set_column(good.schema.get_field_index("aum_total"), "aum_total", pa.nulls(good.num_rows, pa.float64()))),
    ):
        snapshot = WarehouseLayout(settings.warehouse_dir).customer_features.path(day)
        snapshot.parent.mkdir(parents=True)
        pq.write_table(table, snapshot)
        results[day] = dg.materialize([asset], resources=resources, partition_key=day.isoformat(), instance=instance)
    first = {c.check_name: c for c in results[date(2026, 6, 29)].get_asset_check_evaluations()}
    assert first["stability"].passed and first["stability"].description == "no previous partition"
    checks = {c.check_name: c for c in results[AS_OF].get_asset_check_evaluations()}
    assert checks["coverage"].passed
    assert not checks["stability"].passed and checks["stability"].metadata["unstable_tags"].value == ["value_tier"]
    assert "value_tier:" in checks["stability"].description and "of customers changed value since 2026-06-29" in checks["stability"].description
