"""Where each tag is scored from, and its observed labels.

Rule tags and contract model tags read the as_of's `customer_features` partition. A bring-your-own
(BYO) tag, one whose `label.feature_source` is a bank's own table (`WideTableSource`), reads its own
snapshot of the as_of: `<warehouse>/own_features/<tag>/as_of=YYYY-MM-DD/data.parquet`, written from
the bank's table with its champion's features only (`write_own_features`), so that no other column
of that table (PII among them) is copied into the warehouse. Drift reads the same snapshots.
"""

from datetime import date, timedelta
from pathlib import Path

import duckdb

from tagml.core.storage import PartitionedTable, WarehouseLayout, sql_literal, staged_path
from tagml.core.suppression import Suppression
from tagml.features.own_table import own_table_snapshot
from tagml.training.catalog import Catalog, TagSpec, WideTableSource
from tagml.training.dataset import label_conditions, wide_table_labels_sql
from tagml.training.versions import ModelVersionInfo

OWN_FEATURES_DIR = "own_features"


def own_source(tag: TagSpec) -> WideTableSource | None:
    """The bank's own table a model tag is trained and scored on, or None for the contract's features."""
    source = tag.label.feature_source if tag.label is not None else None
    return source if isinstance(source, WideTableSource) else None


def reads_contract(tag: TagSpec) -> bool:
    """Rule tags and contract model tags read customer_features."""
    return own_source(tag) is None


def needs_contract(catalog: Catalog) -> bool:
    """Whether any tag needs the raw contract (ingest and customer_features) to be scored."""
    return any(reads_contract(t) for t in catalog.tags)


def own_tags(catalog: Catalog) -> tuple[TagSpec, ...]:
    return tuple(t for t in catalog.model_tags if own_source(t) is not None)


def own_features_table(warehouse_dir: Path, tag: str) -> PartitionedTable:
    """The partitions of one BYO tag's own feature snapshots in the warehouse."""
    return PartitionedTable(Path(warehouse_dir) / OWN_FEATURES_DIR / tag)


def feature_path(tag: TagSpec, warehouse_dir: Path, as_of: date) -> Path:
    """The snapshot a tag of `as_of` is scored (and its drift measured) on."""
    if own_source(tag) is None:
        return WarehouseLayout(Path(warehouse_dir)).customer_features.path(as_of)
    return own_features_table(warehouse_dir, tag.name).path(as_of)


def write_own_features(
    con: duckdb.DuckDBPyConnection, tag: TagSpec, model: ModelVersionInfo, as_of: date, target: Path, suppression: Suppression | None = None
) -> int:
    """The BYO tag's snapshot of `as_of` with the features (and types) `model` was trained on, erased customers
    (`suppression`) left out; returns its rows."""
    source = own_source(tag)
    if source is None:
        raise ValueError(f"tag {tag.name!r} is scored from customer_features, not from a table of its own")
    return own_table_snapshot(con, tag.name, source.path, source.id_column, model.kinds, as_of, target, suppression)


def labels_input(tag: TagSpec, staged_dir: Path | None) -> Path | None:
    """The file a model tag's observed labels are read from: its own labels file, or the staged tag_labels."""
    source = own_source(tag)
    if source is not None and source.labels_path is not None:
        return Path(source.labels_path)
    return staged_path(staged_dir, "tag_labels") if staged_dir is not None else None


def known_labels_sql(tag: TagSpec, as_of: date, staged_dir: Path | None) -> str:
    """The tag's labels known on `as_of`: customer_id, label_date, label, known_date.

    Within its max label age, unless the tag's labels expire (`valid_days`): then every label is read,
    so that an expired assessment stays visible. A BYO tag's come from its labels file (known on their
    label date), or from the staged tag_labels when it has none; a contract tag's from the staged tag_labels.
    """
    bounded = tag.label.valid_days is None
    if own_source(tag) is None:
        assert staged_dir is not None, "contract tags read the staged tag_labels"
        where = " AND ".join(label_conditions(tag, as_of, bounded_age=bounded))
        return f"SELECT customer_id, label_date, label, known_date FROM read_parquet({sql_literal(staged_path(staged_dir, 'tag_labels'))}) WHERE {where}"
    sql = f"SELECT customer_id, label_date::DATE AS label_date, label, label_date::DATE AS known_date FROM ({wide_table_labels_sql(tag, as_of, staged_dir)})"
    if tag.label.max_age_days and bounded:
        sql += f" WHERE label_date >= DATE {sql_literal(as_of - timedelta(days=tag.label.max_age_days))}"
    return sql
