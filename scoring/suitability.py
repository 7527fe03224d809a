"""Suitability (适当性管理): the risk of the products a customer holds against their valid assessed risk level.

A Cx customer may hold R1..Rx. The assessed level is the newest observed label of the catalog's
`suitability.assessment_tag` (risk_appetite's risk questionnaires) known on as_of and no older than
that tag's `label.valid_days`; the model's inference is never used: an inferred appetite is not an
assessment. The holdings are those with a positive market value at the latest holdings month end on
or before as_of, rated by the delivered `products` (staging guarantees every held product has a rating).

Each customer of the as_of's customer_features gets one row, decided in the order of
`SUITABILITY_CLASSES`: `no_rated_holdings` (nothing rated held, or no holdings delivered at all),
`no_valid_assessment` (holds rated products, but the assessment is missing or expired),
`above_appetite` (some product above the assessed level), `within`. The reasons say which products
and which assessment, in words; product ids and ratings are the bank's shelf, not customer data.

Set-based DuckDB SQL over the staged tables; every value (dates, classes, levels, paths) is a bound
parameter. Both engines commit these rows into the same all-or-nothing partition (the Spark scorer
runs this step on its driver).
"""

from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path

import duckdb
import pyarrow as pa

from tagml.core.storage import latest_staged_files, staged_files
from tagml.features.contract import PRODUCT_RISK_LEVELS
from tagml.scoring.rules import rule_version
from tagml.scoring.sources import known_labels_sql
from tagml.training.catalog import Catalog, TagSpec

_ABSENT = {
    "holdings": "(SELECT NULL::VARCHAR AS customer_id, NULL::DATE AS month_end, NULL::VARCHAR AS product_id, NULL::DOUBLE AS market_value WHERE false)",
    "products": "(SELECT NULL::VARCHAR AS product_id, NULL::VARCHAR AS risk_level WHERE false)",
}


def _staged(staged_dir: Path, table: str, params: dict, latest_on: date | None = None) -> str:
    """The staged table as a relation (an empty one when the optional table was never staged). With `latest_on`, a
    table staged by period is read from its latest period file on or before that day only: the one month end the
    suitability reads."""
    files = staged_files(staged_dir, table) if latest_on is None else latest_staged_files(staged_dir, table, latest_on)
    if not files:
        return _ABSENT[table]
    params[table] = [str(f) for f in files]
    return f"read_parquet(${table})"


def holdings_month(con: duckdb.DuckDBPyConnection, staged_dir: Path, as_of: date) -> date | None:
    """The latest holdings month end on or before `as_of` (None: no holdings delivered for it)."""
    params: dict = {"as_of": as_of}
    holdings = _staged(staged_dir, "holdings", params, latest_on=as_of)
    return con.execute(f"SELECT max(month_end) FROM {holdings} WHERE month_end <= $as_of", params).fetchall()[0][0]


def suitability_sql(catalog: Catalog, tag: TagSpec, features_path: Path, staged_dir: Path, as_of: date, scored_at: datetime) -> tuple[str, dict]:
    """The suitability rows (TAG_ROW_SCHEMA's columns) of every customer of `features_path`, and the query's parameters."""
    assert tag.suitability is not None, f"{tag.name} is not a suitability tag"
    assessed = catalog.get(tag.suitability.assessment_tag)
    params: dict = {
        "features": str(features_path),
        "as_of": as_of,
        "valid_from": assessed.label.valid_from(as_of),
        "valid_days": assessed.label.valid_days,
        "classes": list(assessed.classes),
        "levels": list(PRODUCT_RISK_LEVELS),
        "tag": tag.name,
        "producer": rule_version(tag),
        "scored_at": scored_at,
    }
    holdings, products = _staged(staged_dir, "holdings", params, latest_on=as_of), _staged(staged_dir, "products", params)
    held = "h.product_id || ' (' || h.risk_level || ')'"
    sql = f"""
WITH latest AS (SELECT max(month_end) AS month_end FROM {holdings} WHERE month_end <= $as_of),
assessed AS (
    SELECT customer_id::VARCHAR AS customer_id, arg_max(label, label_date) AS label, max(label_date) AS assessed_on
    FROM ({known_labels_sql(assessed, as_of, staged_dir)}) WHERE list_contains($classes, label) GROUP BY 1),
held AS (
    SELECT h.customer_id::VARCHAR AS customer_id, h.product_id, p.risk_level, list_position($levels, p.risk_level) AS level
    FROM {holdings} h JOIN {products} p ON p.product_id = h.product_id
    WHERE h.month_end = (SELECT month_end FROM latest) AND h.market_value > 0),
per_customer AS (
    SELECT c.customer_id, a.label, a.assessed_on, list_position($classes, a.label) AS assessed_level,
        coalesce(a.assessed_on >= $valid_from, false) AS valid, max(h.level) AS held_level,
        list({held} ORDER BY h.level DESC, h.product_id) FILTER (WHERE h.level IS NOT NULL) AS held,
        list({held} ORDER BY h.level DESC, h.product_id) FILTER (WHERE h.level > list_position($classes, a.label)) AS above
    FROM (SELECT DISTINCT customer_id::VARCHAR AS customer_id FROM read_parquet($features)) c
    LEFT JOIN assessed a USING (customer_id) LEFT JOIN held h USING (customer_id)
    GROUP BY c.customer_id, a.label, a.assessed_on),
decided AS (
    SELECT *, CAST(assessed_on AS VARCHAR) AS day,
        CASE WHEN held_level IS NULL THEN 'no_rated_holdings' WHEN NOT valid THEN 'no_valid_assessment'
             WHEN held_level > assessed_level THEN 'above_appetite' ELSE 'within' END AS value
    FROM per_customer)
SELECT customer_id, $as_of::DATE AS as_of, $tag AS tag, value, NULL::DOUBLE AS probability, NULL::MAP(VARCHAR, DOUBLE) AS probabilities,
    CASE value
        WHEN 'no_rated_holdings' THEN [CASE WHEN (SELECT month_end FROM latest) IS NULL THEN 'no holdings delivered on or before ' || CAST($as_of::DATE AS VARCHAR)
                                            ELSE 'no rated product held at ' || CAST((SELECT month_end FROM latest) AS VARCHAR) END]
        WHEN 'no_valid_assessment' THEN [CASE WHEN label IS NULL THEN 'no risk assessment on record'
                                              ELSE 'assessment ' || label || ' of ' || day || ' expired after ' || $valid_days || ' days' END,
                                         'holds ' || held[1] || ' (an inferred appetite is not an assessment)']
        WHEN 'above_appetite' THEN list_transform(above, lambda p: 'holds ' || p || ' above the assessed ' || label || ' of ' || day)
        ELSE ['highest risk held ' || held[1] || ', within the assessed ' || label || ' of ' || day]
    END::VARCHAR[] AS reasons,
    'rule' AS source, NULL::VARCHAR AS inferred_value, NULL::VARCHAR AS observed_value, NULL::BOOLEAN AS observed_mismatch,
    CASE WHEN label IS NULL THEN 'none' WHEN valid THEN 'valid' ELSE 'expired' END AS assessment, assessed_on,
    $producer AS producer, NULL::VARCHAR AS model_version, NULL::VARCHAR AS mlflow_run_id, $scored_at::TIMESTAMPTZ AS scored_at,
    $as_of::DATE AS inferred_as_of
FROM decided ORDER BY customer_id"""
    return sql, params


def suitability_batches(
    con: duckdb.DuckDBPyConnection, catalog: Catalog, tag: TagSpec, features_path: Path, staged_dir: Path, as_of: date, scored_at: datetime, batch_rows: int
) -> Iterator[pa.RecordBatch]:
    """The suitability rows as Arrow batches (DuckDB's types; the caller casts them to TAG_ROW_SCHEMA)."""
    sql, params = suitability_sql(catalog, tag, features_path, staged_dir, as_of, scored_at)
    yield from con.sql(sql, params=params).to_arrow_reader(batch_rows)


def suitability_mismatch(con: duckdb.DuckDBPyConnection, tags_path: Path, tag: str = "suitability", assessment_tag: str = "risk_appetite") -> dict | None:
    """One `above_appetite` customer of a scored partition with its reasons and its assessment tag's row (assessed
    vs inferred), preferring one whose inferred appetite disagrees with the assessment; None when there is none."""
    rows = con.execute(
        "SELECT s.customer_id, s.reasons, s.assessment, CAST(s.assessed_on AS VARCHAR), r.observed_value, r.inferred_value "
        "FROM read_parquet($path) s LEFT JOIN (SELECT * FROM read_parquet($path) WHERE tag = $assessed) r USING (customer_id) "
        "WHERE s.tag = $tag AND s.value = 'above_appetite' "
        "ORDER BY (r.observed_value IS DISTINCT FROM r.inferred_value AND r.inferred_value IS NOT NULL) DESC, s.customer_id LIMIT 1",
        {"path": str(tags_path), "tag": tag, "assessed": assessment_tag},
    ).fetchall()
    if not rows:
        return None
    customer_id, reasons, assessment, assessed_on, assessed, inferred = rows[0]
    return {
        "customer_id": customer_id,
        "reasons": list(reasons),
        "assessment": assessment,
        "assessed_on": assessed_on,
        "assessed": assessed,
        "inferred": inferred,
    }
