"""A synthetic tag partition of any size, in the tag store's schema, for load tests and benchmarks of the
consumers (online store, API, audiences) without training and scoring a million customers first.

Values are drawn from each catalog tag's classes by a hash of (seed, customer, tag), so partitions of
the same seed agree; `changed_share` of the customers get a value drawn with the as_of mixed in, so
consecutive partitions differ for about that share (what "changed since" queries select).
"""

from datetime import date
from pathlib import Path

import duckdb

from tagml.core.storage import PARQUET_OPTIONS, atomic_replace, sql_literal
from tagml.training.catalog import Catalog


def synthetic_partition_sql(catalog: Catalog, as_of: date, customers: int, seed: int = 0, changed_share: float = 0.05) -> str:
    """A SELECT of `customers` x catalog tags rows in the tag store's column order (customer ids C000000000...)."""
    if customers < 1:
        raise ValueError("a synthetic partition needs at least one customer")
    tags = []
    for spec in catalog.tags:
        classes = "[" + ", ".join(sql_literal(c) for c in spec.classes) + "]"
        kind = "model" if spec.kind == "model" else "rule"
        tags.append(f"({sql_literal(spec.name)}, {classes}, {sql_literal(kind)})")
    day = sql_literal(as_of.isoformat())
    return f"""
        WITH c AS (SELECT 'C' || lpad(CAST(i AS VARCHAR), 9, '0') AS customer_id FROM range({int(customers)}) r(i)),
        t AS (SELECT * FROM (VALUES {", ".join(tags)}) v(tag, classes, kind)),
        drawn AS (
            SELECT c.customer_id, t.tag, t.classes, t.kind,
                   CASE WHEN hash({int(seed)}, c.customer_id, t.tag, 'changed') % 1000000 < {float(changed_share) * 1e6}
                        THEN hash({int(seed)}, c.customer_id, t.tag, {day}) ELSE hash({int(seed)}, c.customer_id, t.tag) END AS h
            FROM c CROSS JOIN t
        )
        SELECT customer_id, DATE {day} AS as_of, tag,
               classes[1 + CAST(h % len(classes) AS BIGINT)] AS value,
               CASE WHEN kind = 'model' THEN 0.4 + (h % 600) / 1000.0 END AS probability,
               CASE WHEN kind = 'model' THEN map_from_entries([struct_pack(k := classes[1 + CAST(h % len(classes) AS BIGINT)], v := 0.4 + (h % 600) / 1000.0)]) END
                   AS probabilities,
               CASE WHEN kind = 'model' THEN ['share_equity high', 'txn_count_3m low', 'region=east'][1:1 + CAST(h % 3 AS BIGINT)]
                    ELSE ['rule band ' || classes[1 + CAST(h % len(classes) AS BIGINT)]] END AS reasons,
               kind AS source,
               CAST(NULL AS VARCHAR) AS inferred_value, CAST(NULL AS VARCHAR) AS observed_value, CAST(NULL AS BOOLEAN) AS observed_mismatch,
               CAST(NULL AS VARCHAR) AS assessment, CAST(NULL AS DATE) AS assessed_on,
               CASE WHEN kind = 'model' THEN tag || '/1' ELSE 'rule:' || tag || ':1' END AS producer,
               CASE WHEN kind = 'model' THEN '1' END AS model_version,
               CASE WHEN kind = 'model' THEN 'synthetic' END AS mlflow_run_id,
               CAST(DATE {day} + INTERVAL 1 DAY + INTERVAL 2 HOUR AS TIMESTAMPTZ) AS scored_at,
               DATE {day} AS inferred_as_of
        FROM drawn
    """


def write_synthetic_partition(
    con: duckdb.DuckDBPyConnection, catalog: Catalog, path: Path, as_of: date, customers: int, seed: int = 0, changed_share: float = 0.05
) -> int:
    """Write the synthetic partition to `path` (atomically); returns its rows."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_replace(Path(path)) as tmp:
        con.execute(f"COPY ({synthetic_partition_sql(catalog, as_of, customers, seed, changed_share)}) TO {sql_literal(tmp)} ({PARQUET_OPTIONS})")
    return int(con.execute(f"SELECT count(*) FROM read_parquet({sql_literal(path)})").fetchall()[0][0])
