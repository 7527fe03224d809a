"""Training sets: each label joined to the customer's features as of the label's date (point in time),
split out-of-time by default, and saved as a Parquet snapshot that the model version references."""

import hashlib
import json
from contextlib import closing
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from tagml.core.files import check_parquet
from tagml.core.storage import atomic_replace, connect, quote, sql_literal, staged_files, staged_path, write_parquet_atomically
from tagml.features.column_audit import (
    CATEGORICAL,
    EXCLUDED,
    NUMERIC,
    ColumnAudit,
    ColumnAuditError,
    ColumnChoices,
    ColumnDecision,
    audit_columns,
    check_numeric,
)
from tagml.features.customer_features import spine_features_sql
from tagml.features.delivery import current_generation
from tagml.features.dictionary import CATEGORICAL_FEATURES, FEATURE_NAMES
from tagml.features.own_table import table_relation
from tagml.training.catalog import TagSpec, WideTableSource
from tagml.training.leakage import find_leaks, leak_by_name, leakage_message

LABEL_COLUMN = "label"
SPLIT_COLUMN = "split"
# Labels whose value is not one of the tag's classes are left out of training and counted per value.
# Beyond this share the label source and the catalog disagree (a renamed or added class, a
# recoding) and a model trained on the rest would be silently biased: training fails instead.
MAX_UNKNOWN_LABEL_SHARE = 0.05
STAGED_INPUTS = ("customers", "balances", "loans", "transactions", "digital_events", "tag_labels")


class TrainingDataError(ValueError):
    """Labels or features cannot make a usable training set (named tag and reason)."""


@dataclass(frozen=True)
class TrainingSet:
    tag: str
    frame: pd.DataFrame  # customer_id, as_of, label, split, features...
    feature_names: tuple[str, ...]
    categorical: tuple[str, ...]
    snapshot_path: Path
    snapshot_id: str
    dropped_labels: dict[str, int]
    feature_types: dict[str, str] = field(default_factory=dict)
    # labels outside the tag's classes, count per label value (aggregates only)
    unknown_labels: dict[str, int] = field(default_factory=dict)
    # every column of the feature source: used as numeric/categorical or excluded, and why (names only)
    audit: ColumnAudit = field(default_factory=lambda: ColumnAudit(()))

    def part(self, split: str) -> tuple[pd.DataFrame, pd.Series]:
        rows = self.frame[self.frame[SPLIT_COLUMN] == split]
        return rows[list(self.feature_names)], rows[LABEL_COLUMN]


def _check_staged(staged_dir: Path, tables: tuple[str, ...]) -> None:
    """Every staged input is a readable Parquet file, or a `CorruptFileError` naming it."""
    for table in tables:
        # an event table staged by period is a directory of files: each footer is checked (a missing table: the whole path, named)
        for path in staged_files(staged_dir, table) or [staged_path(staged_dir, table)]:
            check_parquet(path, f"re-run the raw ingest (raw_ingest_job) to stage {table} again")


def label_conditions(tag: TagSpec, as_of: date, bounded_age: bool = True) -> list[str]:
    """SQL predicates over tag_labels: this tag's labels from its sources, known on `as_of`, not too old (unless not `bounded_age`)."""
    assert tag.label is not None
    conditions = [f"tag = {sql_literal(tag.label_tag)}", f"known_date <= DATE {sql_literal(as_of)}"]
    if tag.label.sources:
        conditions.append("source IN (" + ", ".join(sql_literal(s) for s in tag.label.sources) + ")")
    if tag.label.max_age_days and bounded_age:
        conditions.append(f"label_date >= DATE {sql_literal(as_of - timedelta(days=tag.label.max_age_days))}")
    return conditions


def labels_sql(staged_dir: Path, tag: TagSpec, train_as_of: date) -> str:
    """The usable labels of one tag known on `train_as_of`; one per customer and label date."""
    where = " AND ".join(label_conditions(tag, train_as_of))
    return (
        f"SELECT customer_id, label_date, label, label_date - INTERVAL {tag.label.horizon_days} DAY AS as_of "
        f"FROM read_parquet({sql_literal(staged_path(staged_dir, 'tag_labels'))}) WHERE {where}"
    )


def _split(frame: pd.DataFrame, tag: TagSpec, seed: int) -> pd.Series:
    n = len(frame)
    n_test = round(n * tag.split.test_fraction)
    n_valid = round(n * tag.split.valid_fraction)
    if tag.split.method == "out_of_time":
        # train on the earliest labels, validate and test on later ones (ties broken by customer id)
        order = np.lexsort((frame["customer_id"].to_numpy(), frame["as_of"].to_numpy()))
    else:
        from sklearn.model_selection import train_test_split

        idx = np.arange(n)
        rest, test = train_test_split(idx, test_size=n_test, stratify=frame[LABEL_COLUMN], random_state=seed)
        train, valid = train_test_split(rest, test_size=n_valid, stratify=frame[LABEL_COLUMN].iloc[rest], random_state=seed)
        order = np.concatenate([train, valid, test])
    split = np.empty(n, dtype=object)
    split[order[: n - n_test - n_valid]] = "train"
    split[order[n - n_test - n_valid : n - n_test]] = "valid"
    split[order[n - n_test :]] = "test"
    return pd.Series(split, index=frame.index)


def wide_table_labels_sql(tag: TagSpec, train_as_of: date, staged_dir: Path) -> str:
    """Labels for a wide-table tag known on `train_as_of` (customer_id, label_date, label, as_of): the staged
    tag_labels, or the source's own labels file (checked: `TrainingDataError` naming the file and column)."""
    source = tag.label.feature_source
    assert isinstance(source, WideTableSource)
    if source.labels_path is None:
        return labels_sql(staged_dir, tag, train_as_of)
    where = " AND ".join(label_conditions(tag, train_as_of))
    return f"SELECT customer_id, label_date, label, label_date - INTERVAL {tag.label.horizon_days} DAY AS as_of FROM ({labels_file_sql(tag)}) WHERE {where}"


def default_train_as_of(tag: TagSpec, staged_dir: Path) -> date:
    """The training date when none is given: the newest date a label of `tag`'s source became known
    (a BYO labels file's newest known_date, else label_date; otherwise the staged tag_labels' newest known_date)."""
    source = tag.label.feature_source
    own_file = isinstance(source, WideTableSource) and source.labels_path is not None
    if own_file:
        own_labels = f"SELECT max(known_date) FROM ({labels_file_sql(tag)}) WHERE tag = {sql_literal(tag.label_tag)}"
        sql, where = own_labels, f"labels file {source.labels_path} (tag {tag.label_tag!r})"
    else:
        path = staged_path(current_generation(staged_dir), "tag_labels")
        _check_staged(path.parent, ("tag_labels",))
        sql, where = f"SELECT max(known_date) FROM read_parquet({sql_literal(path)})", f"the staged tag_labels ({path})"
    with closing(connect(threads=1, memory_limit="1GB")) as con:
        newest = con.execute(sql).fetchone()[0]
    if newest is None:
        raise TrainingDataError(f"tag {tag.name!r}: no labels in {where} to choose a training date from; give train_as_of or add labels")
    return newest


def labels_file_sql(tag: TagSpec) -> str:
    """The tag's labels file as tag_labels' columns (customer_id, tag, label, label_date, known_date, source), once
    its schema and values are checked: the file's own `tag`/`source` columns when it has them."""
    source = tag.label.feature_source
    path = source.labels_path
    relation = table_relation(path)
    with closing(connect(threads=1, memory_limit="1GB")) as con:
        try:
            columns = {name: sql_type for name, sql_type, *_ in con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()}
        except duckdb.Error as exc:
            raise TrainingDataError(f"tag {tag.name!r}: cannot read labels file {path}: {str(exc).splitlines()[0]}") from exc
        id_column = next((c for c in (source.id_column, "customer_id") if c in columns), None)
        missing = [c for c in ("label", "label_date") if c not in columns]
        if id_column is None or missing:
            expected = f"{source.id_column!r} (or 'customer_id')" if id_column is None else ""
            raise TrainingDataError(
                f"tag {tag.name!r}: labels file {path} lacks column(s) {', '.join(filter(None, [expected, *map(repr, missing)]))}; "
                f"required: the id column, 'label' and 'label_date' (a date); optional: 'known_date', 'tag', 'source' (columns: {sorted(columns)})"
            )
        if tag.label.sources and "source" not in columns:
            raise TrainingDataError(f"tag {tag.name!r}: label.sources is set but labels file {path} has no 'source' column to filter on")
        known = "known_date" if "known_date" in columns else "label_date"
        sql = (
            f"SELECT {quote(id_column)}::VARCHAR AS customer_id, "
            f"{'tag::VARCHAR' if 'tag' in columns else sql_literal(tag.label_tag)} AS tag, label::VARCHAR AS label, "
            f"TRY_CAST(label_date AS DATE) AS label_date, coalesce(TRY_CAST({known} AS DATE), TRY_CAST(label_date AS DATE)) AS known_date, "
            f"{'source::VARCHAR' if 'source' in columns else 'NULL::VARCHAR'} AS source FROM {relation}"
        )
        _check_labels_file(con, tag, relation, columns, id_column)
    return sql


DATE_LIKE_SQL_TYPES = ("DATE", "TIMESTAMP", "TIMESTAMP WITH TIME ZONE", "TIMESTAMP_S", "TIMESTAMP_MS", "TIMESTAMP_NS", "VARCHAR")


def _check_labels_file(con: duckdb.DuckDBPyConnection, tag: TagSpec, relation: str, columns: dict[str, str], id_column: str) -> None:
    """Rows, ids and dates of a labels file are usable, or a `TrainingDataError` counting the bad rows (never showing them)."""
    path = tag.label.feature_source.labels_path
    dates = [c for c in ("label_date", "known_date") if c in columns]
    wrong_type = [f"{c!r} is {columns[c]}" for c in dates if columns[c] not in DATE_LIKE_SQL_TYPES]
    if wrong_type:
        raise TrainingDataError(f"tag {tag.name!r}: labels file {path}: {', '.join(wrong_type)}; expected a date (YYYY-MM-DD)")
    counts = ", ".join(f"count_if({quote(c)} IS NOT NULL AND TRY_CAST({quote(c)} AS DATE) IS NULL)" for c in dates)
    try:
        rows, null_ids, null_dates, *bad = con.execute(
            f"SELECT count(*), count_if({quote(id_column)} IS NULL), count_if(label_date IS NULL), {counts} FROM {relation}"
        ).fetchone()
    except duckdb.Error as exc:
        raise TrainingDataError(f"tag {tag.name!r}: cannot read labels file {path}: {str(exc).splitlines()[0]}") from exc
    if not rows:
        raise TrainingDataError(f"tag {tag.name!r}: labels file {path} has no rows")
    problems = [
        f"{null_ids} row(s) without a customer id ({id_column!r})" if null_ids else "",
        f"{null_dates} row(s) without a label_date" if null_dates else "",
    ]
    problems += [f"{n} row(s) whose {c} is not a date (YYYY-MM-DD)" for c, n in zip(dates, bad) if n]
    if any(problems):
        raise TrainingDataError(f"tag {tag.name!r}: labels file {path}: " + "; ".join(p for p in problems if p))


def _wide_features(con: duckdb.DuckDBPyConnection, tag: TagSpec, labels: str) -> tuple[str, ColumnAudit]:
    """(SQL joining labels to the wide table, the audit of its columns: what is used, as what, and why not)."""
    source = tag.label.feature_source
    assert isinstance(source, WideTableSource)
    relation = table_relation(source.path)
    try:
        described = con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()
    except duckdb.Error as exc:
        raise TrainingDataError(f"tag {tag.name!r}: cannot read feature table {source.path}: {str(exc).splitlines()[0]}") from exc
    types = {name: sql_type for name, sql_type, *_ in described}
    if source.id_column not in types:
        raise TrainingDataError(f"tag {tag.name!r}: feature table {source.path} has no id column {source.id_column!r} (columns: {sorted(types)})")
    selection = tag.features
    choices = ColumnChoices(source.id_column, source.categorical, source.numeric, selection.include, selection.exclude, tag.leakage.allow)
    try:
        audit = audit_columns(con, relation, f"feature table {source.path}", types, choices, leak_by_name(tag))
        check_numeric(con, relation, f"feature table {source.path}", audit.used(NUMERIC), types)
    except ColumnAuditError as exc:
        raise TrainingDataError(f"tag {tag.name!r}: {exc}") from exc
    if not audit.features:
        raise TrainingDataError(
            f"tag {tag.name!r}: no usable feature columns in {source.path}: {audit.counts()[EXCLUDED]} excluded (ids, PII, leakage, unsupported types)"
        )
    categorical = audit.used(CATEGORICAL)
    cols = ", ".join(f"f.{quote(c)}::VARCHAR AS {quote(c)}" if c in categorical else f"f.{quote(c)}::DOUBLE AS {quote(c)}" for c in audit.features)
    if "as_of" in types:
        # snapshots of the wide table: each label takes the latest snapshot on or before its date
        join = f"ASOF JOIN {relation} f ON f.{quote(source.id_column)}::VARCHAR = l.customer_id AND f.as_of::DATE <= l.as_of::DATE"
    else:
        join = f"JOIN {relation} f ON f.{quote(source.id_column)}::VARCHAR = l.customer_id"
    sql = f"SELECT l.customer_id, l.as_of::DATE AS as_of, l.label AS {LABEL_COLUMN}, {cols} FROM ({labels}) l {join} ORDER BY l.as_of, l.customer_id"
    return sql, audit


def build_training_set(
    con: duckdb.DuckDBPyConnection,
    staged_dir: Path,
    tag: TagSpec,
    train_as_of: date,
    snapshot_dir: Path,
    seed: int = 0,
) -> TrainingSet:
    """Assemble, split and save the training snapshot of `tag` with labels known on `train_as_of`.

    Features come from the computed customer features at each label's date, or from the bank's own
    wide table when the catalog says so (every column audited: ids, PII, leaky names and unsupported
    types excluded). Features that give the label away fail the run before anything is stored.
    """
    staged_dir = current_generation(staged_dir)  # labels and features from one delivery
    wide = isinstance(tag.label.feature_source, WideTableSource)
    if not wide or tag.label.feature_source.labels_path is None:
        _check_staged(staged_dir, ("tag_labels",) if wide else STAGED_INPUTS)
    labels = wide_table_labels_sql(tag, train_as_of, staged_dir) if wide else labels_sql(staged_dir, tag, train_as_of)
    in_classes = f"label IN ({', '.join(sql_literal(c) for c in tag.classes)})"
    known, unknown_labels = _label_census(con, labels, in_classes, tag, train_as_of)
    # a customer labelled twice on one date keeps the last label
    dedup = f"SELECT * FROM ({labels}) WHERE {in_classes} QUALIFY row_number() OVER (PARTITION BY customer_id, as_of ORDER BY label_date DESC, label) = 1"
    sql, audit = _wide_features(con, tag, dedup) if wide else _contract_features(con, staged_dir, tag, dedup)
    names, categorical = audit.features, audit.used(CATEGORICAL)
    try:
        frame = con.execute(sql).df()
    except duckdb.Error:
        # a data page damaged behind an intact footer: name the file if one is unreadable
        _check_staged(staged_dir, STAGED_INPUTS if not wide else ())
        raise
    numeric = [n for n in names if n not in categorical]
    # nullable integer columns (pandas.NA) become float with NaN, the models' missing value
    frame[numeric] = frame[numeric].astype("float64")
    absent = [c for c in tag.classes if c not in frame[LABEL_COLUMN].value_counts().index]
    if absent:
        raise TrainingDataError(f"tag {tag.name!r}: classes {absent} have no labels; cannot train a {len(tag.classes)}-class model")
    scores, leaks = find_leaks(frame, names, categorical, frame[LABEL_COLUMN], tag)
    if leaks:
        raise TrainingDataError(leakage_message(tag, leaks))
    audit = audit.scored(scores)
    frame[SPLIT_COLUMN] = _split(frame, tag, seed)
    path, snapshot_id = _save_snapshot(con, frame, tag, train_as_of, snapshot_dir, audit)
    return TrainingSet(
        tag=tag.name,
        frame=frame,
        feature_names=names,
        categorical=categorical,
        snapshot_path=path,
        snapshot_id=snapshot_id,
        dropped_labels={"unknown_class": int(sum(unknown_labels.values())), "customer_not_found": int(known - len(frame))},
        feature_types={n: (CATEGORICAL if n in categorical else NUMERIC) for n in names},
        unknown_labels=unknown_labels,
        audit=audit,
    )


def _label_census(con: duckdb.DuckDBPyConnection, labels: str, in_classes: str, tag: TagSpec, train_as_of: date) -> tuple[int, dict[str, int]]:
    """(labels among the classes, count per value outside them); refuses a set with none usable or too many outside."""
    by_value = con.execute(f"SELECT coalesce({in_classes}, false), label, count(*) FROM ({labels}) GROUP BY ALL ORDER BY 3 DESC, 2").fetchall()
    known = sum(n for ok, _, n in by_value if ok)
    unknown_labels = {("<null>" if value is None else str(value)[:40]): int(n) for ok, value, n in by_value if not ok}
    unknown = sum(unknown_labels.values())
    if not known:
        detail = f"; {unknown} labels have values outside the classes {list(tag.classes)}: {dict(list(unknown_labels.items())[:5])}" if unknown else ""
        raise TrainingDataError(f"tag {tag.name!r}: no usable labels known on {train_as_of} (tag={tag.label_tag!r}, sources={list(tag.label.sources)}){detail}")
    share = unknown / (known + unknown)
    if share > MAX_UNKNOWN_LABEL_SHARE:
        raise TrainingDataError(
            f"tag {tag.name!r}: {unknown} of {known + unknown} labels ({share:.1%}) are not among the classes {list(tag.classes)} "
            f"(more than {MAX_UNKNOWN_LABEL_SHARE:.0%}): {dict(list(unknown_labels.items())[:5])}. "
            "Declare the classes in the catalog or correct the label source."
        )
    return known, unknown_labels


def _contract_features(con: duckdb.DuckDBPyConnection, staged_dir: Path, tag: TagSpec, dedup: str) -> tuple[str, ColumnAudit]:
    """(SQL of labels joined to the computed features at each label's date, the dictionary's features used or not)."""
    names = tag.feature_names
    audit = ColumnAudit(
        tuple(
            ColumnDecision(n, CATEGORICAL if n in CATEGORICAL_FEATURES else NUMERIC, "feature dictionary")
            if n in names
            else ColumnDecision(
                n, EXCLUDED, "excluded by the catalog (features.exclude)" if n in tag.features.exclude else "not selected by the catalog's features"
            )
            for n in FEATURE_NAMES
        )
    )
    features = spine_features_sql(con, staged_dir, f"SELECT customer_id, as_of FROM ({dedup})")
    sql = (
        f"SELECT l.customer_id, l.as_of::DATE AS as_of, l.label AS {LABEL_COLUMN}, {', '.join('f.' + n for n in audit.features)} "
        f"FROM ({dedup}) l JOIN ({features}) f ON f.customer_id = l.customer_id AND f.as_of = l.as_of::DATE "
        f"ORDER BY l.as_of, l.customer_id"
    )
    return sql, audit


def _audit_path(snapshot: Path) -> Path:
    return snapshot.with_suffix(".columns.json")


def _save_snapshot(
    con: duckdb.DuckDBPyConnection, frame: pd.DataFrame, tag: TagSpec, train_as_of: date, snapshot_dir: Path, audit: ColumnAudit
) -> tuple[Path, str]:
    """Write the snapshot under a content-addressed name (the same rows give the same id), its column audit beside it; returns (path, id)."""
    digest = hashlib.sha256(pd.util.hash_pandas_object(frame, index=False).values.tobytes()).hexdigest()[:12]
    snapshot_id = f"{tag.name}-{train_as_of.isoformat()}-{digest}"
    path = snapshot_dir / tag.name / f"{snapshot_id}.parquet"
    con.register("_snapshot", frame)
    try:
        write_parquet_atomically(con, "SELECT * FROM _snapshot", path)
    finally:
        con.unregister("_snapshot")
    with atomic_replace(_audit_path(path)) as tmp:
        tmp.write_text(json.dumps(audit.as_dict(), ensure_ascii=False, indent=1))
    return path, snapshot_id


def load_training_set(path: Path, tag: TagSpec) -> TrainingSet:
    """Re-open a saved training snapshot (as referenced by a model version or an upstream asset)."""
    path = Path(path)
    if not path.exists():
        raise TrainingDataError(f"tag {tag.name!r}: training snapshot {path} does not exist")
    check_parquet(path, f"re-materialize the {tag.name}/training_set asset (the snapshot is rebuilt from the staged tables)")
    frame = pd.read_parquet(path)
    names = tuple(c for c in frame.columns if c not in ("customer_id", "as_of", LABEL_COLUMN, SPLIT_COLUMN))
    categorical = tuple(n for n in names if not pd.api.types.is_numeric_dtype(frame[n]))
    return TrainingSet(
        tag=tag.name,
        frame=frame,
        feature_names=names,
        categorical=categorical,
        feature_types={n: ("categorical" if n in categorical else "numeric") for n in names},
        snapshot_path=path,
        snapshot_id=path.stem,
        dropped_labels={},
        audit=ColumnAudit.from_dict(json.loads(audit.read_text())) if (audit := _audit_path(path)).exists() else ColumnAudit(()),
    )
