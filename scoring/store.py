"""The tag store: the `TagStore` interface, and `ParquetTagStore`, one Parquet file per as_of partition read through DuckDB.

Queries: the current tags (latest partition), what a customer's tags were on a date (latest
partition on or before it) and which model or rule version produced them, changes between two
partitions and the transition matrix of a tag, and exports for downstream systems.
"""

from collections.abc import Callable, Collection, Iterable
from contextlib import AbstractContextManager
from datetime import date
from pathlib import Path
from typing import Protocol

import duckdb
import pandas as pd
import pyarrow.parquet as pq

from tagml.core.files import CorruptFileError, check_parquet
from tagml.core.storage import PartitionedTable, WarehouseLayout, atomic_replace, create_views, quote, sql_literal, tag_store_views, write_parquet_atomically

# A CSV cell starting with one of these is a formula to Excel/LibreOffice/Sheets (CSV injection);
# OWASP's advice is to prefix such cells with a single quote, which spreadsheets show as text.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


class TagStoreError(LookupError):
    """The requested partition or customer is not in the tag store."""


class TagStore(Protocol):
    """The seam where a tag store plugs in (the embedded `ParquetTagStore`; a bank's database or online store later).

    A partition is written atomically: the scorer writes the rows as Parquet to the path `write_partition`
    yields, and the store publishes them when the block succeeds (readers see the old partition or
    the new one). Queries take the caller's DuckDB connection.
    """

    def partitions(self) -> list[date]: ...

    def latest_on_or_before(self, as_of: date | None) -> date: ...

    def partition_before(self, as_of: date) -> Path | None: ...

    def write_partition(self, as_of: date) -> AbstractContextManager[Path]: ...

    def location(self, as_of: date) -> str: ...

    def read_sql(self, as_of: date) -> str: ...

    def register_views(self, con: duckdb.DuckDBPyConnection) -> None: ...

    def customer_tags(self, con: duckdb.DuckDBPyConnection, customer_id: str, as_of: date | None = None) -> pd.DataFrame: ...

    def history(self, con: duckdb.DuckDBPyConnection, customer_id: str, tag: str | None = None) -> pd.DataFrame: ...

    def changes(self, con: duckdb.DuckDBPyConnection, tag: str, before: date, after: date) -> pd.DataFrame: ...

    def transition_matrix(self, con: duckdb.DuckDBPyConnection, tag: str, before: date, after: date) -> pd.DataFrame: ...

    def export(
        self,
        con: duckdb.DuckDBPyConnection,
        as_of: date,
        fmt: str,
        out: Path,
        tags: Collection[str] | None = None,
        customers: str | None = None,
        before_publish: Callable[[Path], None] | None = None,
    ) -> int: ...

    def distribution(self, con: duckdb.DuckDBPyConnection, as_of: date) -> pd.DataFrame: ...

    def changed_share(self, con: duckdb.DuckDBPyConnection, before: date, after: date) -> dict[str, float]: ...


class ParquetTagStore:
    """The embedded tag store: `<root>/as_of=YYYY-MM-DD/data.parquet` (a `PartitionedTable`)."""

    def __init__(self, root: Path, protected: Iterable[Path] = ()):
        """`protected`: directories exports must never write into (the warehouse); the store itself always is."""
        self.root = Path(root)
        self.table = PartitionedTable(self.root)
        self.protected = (self.root, *(Path(p) for p in protected))

    @classmethod
    def in_warehouse(cls, warehouse_dir: Path) -> "ParquetTagStore":
        """The warehouse's tag store; exports may not write into the warehouse (a file there would be read back as data)."""
        return cls(WarehouseLayout(Path(warehouse_dir)).customer_tags.root, protected=[Path(warehouse_dir)])

    def partition_path(self, as_of: date) -> Path:
        return self.table.path(as_of)

    def partitions(self) -> list[date]:
        return self.table.partitions()

    def write_partition(self, as_of: date) -> AbstractContextManager[Path]:
        """The partition's file is swapped in by `atomic_replace` when the block succeeds."""
        return atomic_replace(self.partition_path(as_of))

    def location(self, as_of: date) -> str:
        """Where the partition is published, for metadata and messages."""
        return str(self.partition_path(as_of))

    def _all(self) -> str:
        if not self.partitions():
            raise TagStoreError(f"the tag store at {self.root} has no partitions yet; run the scoring job first")
        # partitions written before inferred_as_of was recorded inferred every row on their own as_of
        return f"(SELECT * REPLACE (coalesce(inferred_as_of, as_of) AS inferred_as_of) FROM {self.table.read_all_sql(union_by_name=True)})"

    def read_sql(self, as_of: date) -> str:
        """A relation over one partition, checked readable (a missing or corrupt one raises TagStoreError)."""
        return self._partition(as_of)

    def _partition(self, as_of: date) -> str:
        path = self.partition_path(as_of)
        if not path.exists():
            raise TagStoreError(f"no tag partition for as_of {as_of} (have: {[d.isoformat() for d in self.partitions()][-5:]})")
        try:
            check_parquet(path, f"re-run the scoring job (customer_tags) for the partition {as_of.isoformat()}")
        except CorruptFileError as err:
            raise TagStoreError(str(err)) from err
        if "inferred_as_of" not in pq.read_schema(path).names:
            return f"(SELECT *, as_of AS inferred_as_of FROM {self.table.read_sql(as_of)})"
        return self.table.read_sql(as_of)

    def partition_before(self, as_of: date) -> Path | None:
        """The newest partition's file strictly before `as_of` (what a night's scoring may reuse), or None."""
        earlier = [d for d in self.partitions() if d < as_of]
        return self.partition_path(earlier[-1]) if earlier else None

    def latest_on_or_before(self, as_of: date | None) -> date:
        candidates = [d for d in self.partitions() if as_of is None or d <= as_of]
        if not candidates:
            raise TagStoreError(f"no tag partition on or before {as_of} in {self.root}")
        return candidates[-1]

    def register_views(self, con: duckdb.DuckDBPyConnection) -> None:
        """`customer_tags_history` (every partition) and `customer_tags_current` (the latest), as the warehouse's DuckDB file has them."""
        self._partition(self.latest_on_or_before(None))  # no partitions, or a corrupt newest one: the store's own error
        create_views(con, tag_store_views(self.table))

    def customer_tags(self, con: duckdb.DuckDBPyConnection, customer_id: str, as_of: date | None = None) -> pd.DataFrame:
        """A customer's tags in the latest partition on or before `as_of` (default: the newest)."""
        partition = self.latest_on_or_before(as_of)
        frame = con.execute(f"SELECT * FROM {self._partition(partition)} WHERE customer_id = ? ORDER BY tag", [customer_id]).df()
        if frame.empty:
            raise TagStoreError(f"customer {customer_id!r} has no tags in the partition of {partition}")
        return frame

    def history(self, con: duckdb.DuckDBPyConnection, customer_id: str, tag: str | None = None) -> pd.DataFrame:
        """Every partition's value of a customer's tags, with the producing model or rule version."""
        where = "customer_id = ?" + (" AND tag = ?" if tag else "")
        params = [customer_id, tag] if tag else [customer_id]
        return con.execute(
            f"SELECT as_of, tag, value, probability, source, producer, mlflow_run_id FROM {self._all()} WHERE {where} ORDER BY tag, as_of",
            params,
        ).df()

    def changes(self, con: duckdb.DuckDBPyConnection, tag: str, before: date, after: date) -> pd.DataFrame:
        """Customers whose `tag` value differs between two partitions (new customers show from = NULL)."""
        return con.execute(
            f"SELECT a.customer_id, b.value AS from_value, a.value AS to_value, b.producer AS from_producer, a.producer AS to_producer "
            f"FROM {self._partition(after)} a LEFT JOIN (SELECT * FROM {self._partition(before)} WHERE tag = ?) b USING (customer_id) "
            f"WHERE a.tag = ? AND b.value IS DISTINCT FROM a.value ORDER BY a.customer_id",
            [tag, tag],
        ).df()

    def transition_matrix(self, con: duckdb.DuckDBPyConnection, tag: str, before: date, after: date) -> pd.DataFrame:
        """Counts of customers by (value before, value after) for one tag."""
        counts = con.execute(
            f"SELECT coalesce(b.value, '(new)') AS from_value, a.value AS to_value, count(*) AS customers "
            f"FROM {self._partition(after)} a LEFT JOIN (SELECT * FROM {self._partition(before)} WHERE tag = ?) b USING (customer_id) "
            f"WHERE a.tag = ? GROUP BY ALL",
            [tag, tag],
        ).df()
        return counts.pivot(index="from_value", columns="to_value", values="customers").fillna(0).astype(int)

    def export(
        self,
        con: duckdb.DuckDBPyConnection,
        as_of: date,
        fmt: str,
        out: Path,
        tags: Collection[str] | None = None,
        customers: str | None = None,
        before_publish: Callable[[Path], None] | None = None,
    ) -> int:
        """Write a partition's rows for downstream systems: Parquet as stored, or CSV with JSON-encoded maps and lists.

        `tags`: only these tags (None: all); `customers`: only the customers of this relation (a query with a
        customer_id column, built from validated names); `before_publish(tmp)` sees the finished file before it
        replaces `out` and may raise to abort. The output may not lie inside the tag store or a protected
        directory: a file there would be read as a partition (or overwrite one). In CSV, text cells starting
        with = + - @ tab or CR get a leading `'` so that a spreadsheet shows them as text (OWASP, CSV injection).
        """
        if fmt not in ("parquet", "csv"):
            raise ValueError(f"unknown export format {fmt!r}; use parquet or csv")
        out = Path(out)
        resolved = out.resolve()
        for directory in self.protected:
            if resolved.is_relative_to(directory.resolve()):
                raise TagStoreError(f"export output {out} is inside {directory}; exports go outside the warehouse and the tag store")
        where = ["true" if tags is None else "list_contains(?, tag)"]
        params = [] if tags is None else [sorted(tags)]
        if customers is not None:
            where.append(f"customer_id IN (SELECT customer_id FROM ({customers}))")
        source = f"(SELECT * FROM {self._partition(as_of)} WHERE {' AND '.join(where)})"
        if fmt == "parquet":
            return write_parquet_atomically(con, f"SELECT * FROM {source} ORDER BY customer_id, tag", out, validate=before_publish, params=params)
        columns = con.execute(f"DESCRIBE SELECT * FROM {source}", params).fetchall()
        prefixes = ", ".join(sql_literal(p) for p in FORMULA_PREFIXES)
        cells = []
        for name, kind, *_ in columns:
            cell = quote(name)
            if name in ("probabilities", "reasons"):
                cell = f"to_json({cell})::VARCHAR"
            elif kind != "VARCHAR":
                cells.append(cell)
                continue
            cells.append(f"CASE WHEN left({cell}, 1) IN ({prefixes}) THEN {sql_literal(chr(39))} || {cell} ELSE {cell} END AS {quote(name)}")
        with atomic_replace(out) as tmp:
            con.execute(f"COPY (SELECT {', '.join(cells)} FROM {source} ORDER BY customer_id, tag) TO {sql_literal(tmp)} (FORMAT CSV, HEADER)", params)
            if before_publish is not None:
                before_publish(tmp)
        return con.execute(f"SELECT count(*) FROM {source}", params).fetchall()[0][0]

    def distribution(self, con: duckdb.DuckDBPyConnection, as_of: date) -> pd.DataFrame:
        """Share of customers per value of each tag, with the observed share."""
        return con.execute(
            f"SELECT tag, value, count(*) AS customers, round(count(*) / sum(count(*)) OVER (PARTITION BY tag), 4) AS share, "
            f"round(avg((source = 'observed')::INT), 4) AS observed_share FROM {self._partition(as_of)} GROUP BY tag, value ORDER BY tag, value"
        ).df()

    def changed_share(self, con: duckdb.DuckDBPyConnection, before: date, after: date) -> dict[str, float]:
        """Per tag, the share of customers whose value changed since the previous partition."""
        rows = con.execute(
            f"SELECT a.tag, avg((b.value IS DISTINCT FROM a.value)::INT) FROM {self._partition(after)} a "
            f"JOIN {self._partition(before)} b ON a.customer_id = b.customer_id AND a.tag = b.tag GROUP BY a.tag ORDER BY 1"
        ).fetchall()
        return {tag: round(float(share), 4) for tag, share in rows}
