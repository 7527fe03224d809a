"""The Spark engine's session and commit: a real local[2] session, part files committed as one atomic file."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tagml.core.spark import spark_conf
from tagml.core.storage import WarehouseConfigError, commit_parquet_parts

pytestmark = [pytest.mark.spark, pytest.mark.slow]  # a JVM start (~15 s) and Spark jobs: out of the inner loop


def test_local_session_runs_in_utc_without_a_ui(spark):
    assert spark.conf.get("spark.sql.session.timeZone") == "UTC"
    assert spark.sparkContext.master == "local[2]"
    assert spark.sql("SELECT CAST(TIMESTAMP '2026-03-31 23:30:00' AS DATE) AS d").collect()[0].d.isoformat() == "2026-03-31"


def test_cluster_masters_keep_their_own_ui_hosts_and_memory():
    assert "spark.driver.host" not in spark_conf("yarn")
    assert spark_conf("yarn")["spark.sql.session.timeZone"] == "UTC"
    assert spark_conf("local[2]", {"spark.driver.memory": "8g"})["spark.driver.memory"] == "8g"


def test_parts_are_committed_in_order_as_one_file(spark, tmp_path):
    parts = tmp_path / "parts"
    spark.range(0, 1000, numPartitions=3).selectExpr("CAST(id AS STRING) AS customer_id", "id * 2 AS x").orderBy("x").write.parquet(str(parts))
    target = tmp_path / "as_of=2026-10-31" / "data.parquet"
    target.parent.mkdir()
    assert commit_parquet_parts(parts, target) == 1000
    table = pq.read_table(target)
    assert table.column("x").to_pylist() == list(range(0, 2000, 2))


def test_a_part_that_does_not_fit_the_schema_leaves_the_old_file(spark, tmp_path):
    parts = tmp_path / "parts"
    spark.range(0, 10).selectExpr("CAST(id AS STRING) AS customer_id").write.parquet(str(parts))
    target = tmp_path / "data.parquet"
    pq.write_table(pa.table({"customer_id": ["old"], "x": [1]}), target)
    schema = pa.schema([("customer_id", pa.string()), ("x", pa.int64())])
    with pytest.raises(KeyError):
        commit_parquet_parts(parts, target, schema)
    assert pq.read_table(target).column("customer_id").to_pylist() == ["old"]
    with pytest.raises(WarehouseConfigError, match="no Parquet part files"):
        commit_parquet_parts(tmp_path / "nothing", target)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_drift_reports_are_not_forked_from_a_spark_driver(spark):
    from tagml.monitoring.report import report_start_method

    # a forked child inherits the py4j gateway; its finalizers crashed the child (segfault) in the loop test
    assert spark.sparkContext is not None
    assert report_start_method() == "spawn"
