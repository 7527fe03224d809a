"""The warehouse layout and partitioned tables: one definition of where each table lives and how it is read."""

from datetime import date

import duckdb

from tagml.core.storage import PartitionedTable, WarehouseLayout, publish_views, write_parquet_atomically
from tagml.monitoring.history import SUMMARY, DriftHistory
from tagml.scoring.store import ParquetTagStore


def _write(con: duckdb.DuckDBPyConnection, table: PartitionedTable, as_of: date, rows: int) -> None:
    write_parquet_atomically(con, f"SELECT ?::DATE AS as_of, 'c' || range AS customer_id FROM range({rows})", table.path(as_of), params=[as_of])


def test_a_partitioned_table_lists_and_reads_its_partitions_under_a_directory_with_glob_characters(tmp_path):
    table = PartitionedTable(tmp_path / "tags [prod]" / "customer_tags")
    assert table.partitions() == [] and table.files() == []
    con = duckdb.connect()
    _write(con, table, date(2025, 2, 28), 3)
    _write(con, table, date(2025, 1, 31), 2)
    (table.root / "as_of=2025-03-31").mkdir()  # a partition directory without its file is no partition
    assert table.path(date(2025, 1, 31)) == table.root / "as_of=2025-01-31" / "data.parquet"
    assert table.partitions() == [date(2025, 1, 31), date(2025, 2, 28)]
    assert con.execute(f"SELECT count(*) FROM {table.read_all_sql()}").fetchone() == (5,)
    assert con.execute(f"SELECT count(*), min(as_of) FROM {table.read_sql(date(2025, 2, 28))}").fetchone() == (3, date(2025, 2, 28))


def test_every_reader_of_a_warehouse_table_finds_it_where_the_layout_puts_it(tmp_path):
    layout = WarehouseLayout(tmp_path / "warehouse")
    con = duckdb.connect()
    day = date(2025, 1, 31)
    _write(con, layout.customer_features, day, 4)
    _write(con, layout.customer_tags, day, 4)
    assert ParquetTagStore(layout.customer_tags.root).partitions() == [day]
    views = publish_views(tmp_path / "tagml.duckdb", layout.root)
    assert views == ["customer_features", "customer_tags_history", "customer_tags_current"]
    with duckdb.connect(str(tmp_path / "tagml.duckdb")) as db:
        assert db.execute("SELECT count(*) FROM customer_features").fetchone() == (4,)
    history = DriftHistory(tmp_path / "drift")
    assert history.path(SUMMARY, day) == history.table(SUMMARY).path(day)


def test_the_warehouse_file_and_a_session_have_the_same_tag_views_and_both_follow_a_new_partition(tmp_path):
    layout = WarehouseLayout(tmp_path / "warehouse")
    con = duckdb.connect()
    _write(con, layout.customer_tags, date(2025, 1, 31), 2)
    publish_views(tmp_path / "tagml.duckdb", layout.root)
    ParquetTagStore(layout.customer_tags.root).register_views(con)
    _write(con, layout.customer_tags, date(2025, 2, 28), 3)  # the nightly partition, after the views were made
    definitions = "SELECT view_name, sql FROM duckdb_views() WHERE view_name LIKE 'customer_tags_%' ORDER BY 1"
    current = "SELECT max(as_of), count(*) FROM customer_tags_current"
    with duckdb.connect(str(tmp_path / "tagml.duckdb")) as db:
        assert db.execute(definitions).fetchall() == con.execute(definitions).fetchall()
        assert db.execute(current).fetchone() == con.execute(current).fetchone() == (date(2025, 2, 28), 3)
