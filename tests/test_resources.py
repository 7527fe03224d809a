"""The seams behind the Dagster resources: another tag store plugs in through the warehouse resource
with no change to the asset that writes and reads it (real materializations, real Parquet)."""

from contextlib import contextmanager
from datetime import date
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

from tagml.core.settings import Settings
from tagml.core.storage import EmbeddedWarehouse, Warehouse, WarehouseLayout
from tagml.orchestration.partitions import as_of_partitions
from tagml.orchestration.resources import MlflowResource, WarehouseResource
from tagml.orchestration.scoring_assets import build_customer_tags_asset
from tagml.scoring.store import ParquetTagStore, TagStore
from tagml.training.catalog import load_catalog
from tests.test_scoring import small_catalog

AS_OF = date(2026, 6, 30)


class LedgerTagStore(ParquetTagStore):
    """A stand-in for a bank's tag store: its own root, and a ledger line per published partition."""

    def write_partition(self, as_of: date):
        @contextmanager
        def publish():
            with ParquetTagStore.write_partition(self, as_of) as staged:
                yield staged
            with (self.root / "ledger.txt").open("a") as ledger:
                ledger.write(f"{as_of.isoformat()}\n")

        return publish()


class ElsewhereWarehouse(WarehouseResource):
    tag_root: str

    def tag_store(self) -> TagStore:
        return LedgerTagStore(Path(self.tag_root))


def test_another_tag_store_plugs_in_through_the_resource_and_the_asset_writes_and_reads_it(bank_features, tmp_path):
    settings = Settings.from_env({"TAGML_HOME": str(tmp_path / "home")})
    catalog = load_catalog(small_catalog(tmp_path, include=("value_tier", "lifecycle_stage")))  # rule tags: no registry needed
    embedded = WarehouseResource.from_settings(settings)
    warehouse = ElsewhereWarehouse(**embedded.model_dump(), tag_root=str(tmp_path / "bank tags"))
    snapshot = WarehouseLayout(settings.warehouse_dir).customer_features.path(AS_OF)
    snapshot.parent.mkdir(parents=True)
    pq.write_table(pq.read_table(bank_features[AS_OF]), snapshot)

    result = dg.materialize(
        [build_customer_tags_asset(as_of_partitions(settings), catalog)],
        resources={"warehouse": warehouse, "mlflow_store": MlflowResource.from_settings(settings)},
        partition_key=AS_OF.isoformat(),
    )
    assert result.success
    published = tmp_path / "bank tags" / f"as_of={AS_OF}" / "data.parquet"
    assert (tmp_path / "bank tags" / "ledger.txt").read_text() == f"{AS_OF}\n"
    assert pq.read_metadata(published).num_rows == 2 * pq.read_metadata(snapshot).num_rows
    [materialization] = result.asset_materializations_for_node("customer_tags")
    assert materialization.metadata["path"].value == str(published)
    assert "value_tier" in materialization.metadata["distribution"].value  # read back through the plugged store
    assert not WarehouseLayout(settings.warehouse_dir).customer_tags.files()  # the embedded store was never written


def test_the_embedded_implementations_are_what_the_default_resource_vends(tmp_path):
    resource = WarehouseResource.from_settings(Settings.from_env({"TAGML_HOME": str(tmp_path)}))
    warehouse: Warehouse = resource.warehouse()
    store: TagStore = resource.tag_store()
    assert isinstance(warehouse, EmbeddedWarehouse) and isinstance(store, ParquetTagStore)
    assert store.location(AS_OF) == str(warehouse.layout.customer_tags.path(AS_OF))
    with warehouse.connect() as con:
        assert con.execute("SELECT current_setting('threads')").fetchone() == (2,)


def test_drift_reads_the_tag_store_the_warehouse_resource_vends(bank_features, tmp_path):
    from tagml.core.storage import connect
    from tagml.monitoring.drift import tag_inputs
    from tagml.monitoring.reference import DriftInputError
    from tagml.orchestration.resources import MonitoringResource

    settings = Settings.from_env({"TAGML_HOME": str(tmp_path / "home")})
    warehouse = ElsewhereWarehouse(**WarehouseResource.from_settings(settings).model_dump(), tag_root=str(tmp_path / "bank tags"))
    locations = MonitoringResource.from_settings(settings).locations(warehouse)
    assert isinstance(locations.tag_store, LedgerTagStore)
    snapshot = WarehouseLayout(settings.warehouse_dir).customer_features.path(AS_OF)
    snapshot.parent.mkdir(parents=True)
    pq.write_table(pq.read_table(bank_features[AS_OF]), snapshot)
    catalog = load_catalog(small_catalog(tmp_path, include=("risk_appetite", "value_tier")))
    # the embedded store has no partition either; the error must name the plugged-in store's
    with connect(1, "1GB") as con, pytest.raises(DriftInputError, match="bank tags"):
        tag_inputs(con, None, catalog, catalog.get("risk_appetite"), AS_OF, locations, 100)
