"""Hostile strings in configuration and data: they reach DuckDB as values, never as SQL text.

Quotes, backslashes, SQL fragments and non-ASCII text in every free-text column of the raw contract
go through staging, features and drift (PSI per slice) unchanged; a memory limit carrying stacked
SQL is refused before any connection runs it; paths with quotes reach SQL safely.
"""

import zlib
from datetime import date
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tagml.core.storage import (
    WarehouseConfigError,
    connect,
    glob_literal,
    sql_literal,
    write_parquet_atomically,
)
from tagml.features.contract import RAW_TABLES, TABLES_BY_NAME
from tagml.features.customer_features import build_customer_features
from tagml.features.synthetic import BankConfig, generate_bank
from tagml.features.validation import validate_and_stage
from tagml.monitoring.psi import feature_psi
from tagml.scoring.rules import rule_batches, rule_case_sql, slice_expressions
from tagml.scoring.score import score_partition
from tagml.scoring.store import ParquetTagStore
from tagml.training.catalog import Catalog, load_catalog

STACKED = "1GB'; COPY (SELECT 42 AS x) TO '{target}' (FORMAT CSV); SET memory_limit = '2GB"


@pytest.mark.parametrize("value", [STACKED, "4 GB; SELECT 1", "lots", "", "4GB'", "-1GB", "1e9"])
def test_memory_limit_of_the_wrong_form_is_refused_before_any_sql(tmp_path, value):
    target = tmp_path / "written_by_memory_limit.csv"
    with pytest.raises(WarehouseConfigError, match="TAGML_DUCKDB_MEMORY_LIMIT"):
        connect(1, value.format(target=target))
    assert not target.exists()


@pytest.mark.parametrize("value, expected", [("512MiB", "512.0 MiB"), ("1.5 GiB", "1.5 GiB"), ("2000MB", "1.8 GiB")])
def test_memory_limit_in_duckdb_units_is_set(value, expected):
    with connect(1, value) as con:
        assert con.execute("SELECT current_setting('memory_limit'), current_setting('threads')").fetchall() == [(expected, 1)]


def test_threads_must_be_a_positive_integer():
    with pytest.raises(WarehouseConfigError, match="TAGML_THREADS"):
        connect(0, "1GB")
    with pytest.raises(WarehouseConfigError, match="TAGML_THREADS"):
        connect("2; DROP TABLE x", "1GB")


def test_paths_with_quotes_backslashes_and_non_ascii_reach_sql_as_literals(tmp_path):
    odd = tmp_path / 'Xi\'an \\ 西安 "q"' / "data.parquet"
    with connect(1, "512MB") as con:
        rows = write_parquet_atomically(con, "SELECT 'Xi''an' AS region", odd)
        assert rows == 1
        assert con.execute(f"SELECT region FROM read_parquet({sql_literal(odd)})").fetchall() == [("Xi'an",)]
    with pytest.raises(ValueError, match="NUL"):
        sql_literal("a\x00b")
    with duckdb.connect() as con:  # the literal is the value itself, whatever it holds
        for text in ("Xi'an", "a\\b", "'||read_text('/etc/passwd')||'", "Ω≈ç√ 西安"):
            assert con.execute(f"SELECT {sql_literal(text)}").fetchall() == [(text,)]


# ---- hostile values in every free-text column of the raw contract -----------------------------------

HOSTILE_VALUES = ("Xi'an", "a\\b", '"; DROP TABLE x; --', "西安", "Ω≈ç√", "'||read_text('/etc/passwd')||'", "it''s", "tab\there")
SMALL_BANK = BankConfig(customers=400, months=12, seed=11)
AS_OF, BEFORE = date(2026, 10, 31), date(2026, 7, 31)


def free_text_columns() -> list[tuple[str, str]]:
    """(table, column) of every text column of the contract that takes any value (no allowed list)."""
    return [(t.name, c.name) for t in RAW_TABLES for c in t.columns if c.type == "string" and not c.allowed]


def hostile(value: object) -> object:
    """The value with a hostile prefix chosen by the value itself: the same id maps to the same
    string in every table, and distinct values stay distinct."""
    if value is None:
        return None
    text = str(value)
    return HOSTILE_VALUES[zlib.crc32(text.encode()) % len(HOSTILE_VALUES)] + text


@pytest.fixture(scope="module")
def hostile_bank(tmp_path_factory) -> dict:
    # a quote, a backslash and non-ASCII in every path: they reach SQL as literals only
    root = tmp_path_factory.mktemp("hostile") / 'Xi\'an \\ "q" 西安'
    generated, raw, staged = root / "generated", root / "raw", root / "staged"
    generate_bank(SMALL_BANK, generated)
    raw.mkdir(parents=True)
    originals = {}
    for spec in RAW_TABLES:
        frame = pq.read_table(generated / spec.name).to_pandas()
        originals[spec.name] = frame.copy()
        for table, column in free_text_columns():
            if table == spec.name and column in frame:
                frame[column] = frame[column].map(hostile)
        if spec.name == "customers":  # CSV too: the loader's other path, with quoting in the file itself
            frame.to_csv(raw / "customers.csv", index=False)
        else:
            frame.to_parquet(raw / f"{spec.name}.parquet", index=False)
    con = connect(1, "1GB")
    try:
        con.execute(f"SET temp_directory = {sql_literal(root / 'spill')}")
        for spec in RAW_TABLES:
            validate_and_stage(con, spec, raw, staged)
        features = {d: root / "features" / f"as_of={d}" / "data.parquet" for d in (BEFORE, AS_OF)}
        for d, path in features.items():
            build_customer_features(con, staged, d, path)
        # the same bank as generated, for comparison
        for spec in RAW_TABLES:
            validate_and_stage(con, spec, generated, root / "plain_staged")
        plain = root / "plain_features.parquet"
        build_customer_features(con, root / "plain_staged", AS_OF, plain)
    finally:
        con.close()
    return {"root": root, "staged": staged, "features": features, "originals": originals, "plain_features": plain}


def test_the_test_covers_every_free_text_column_of_the_contract():
    covered = set(free_text_columns())
    assert {
        ("customers", "customer_id"),
        ("customers", "full_name"),
        ("loans", "loan_id"),
        ("transactions", "txn_id"),
        ("tag_labels", "tag"),
        ("tag_labels", "label"),
    } <= covered
    assert all(TABLES_BY_NAME[t].column(c).type == "string" for t, c in covered)


def test_hostile_text_is_staged_and_featurised_unchanged(hostile_bank):
    staged, originals = hostile_bank["staged"], hostile_bank["originals"]
    for table, column in free_text_columns():
        spec = TABLES_BY_NAME[table]
        if spec.column(column).pii:
            assert column not in pq.read_schema(staged / f"{table}.parquet").names  # dropped, as ever
            continue
        got = pq.read_table(staged / f"{table}.parquet", columns=[column]).column(column).to_pylist()
        assert sorted(got, key=str) == sorted(originals[table][column].map(hostile), key=str), f"{table}.{column}"
    ids = set(pq.read_table(staged / "customers.parquet", columns=["customer_id"]).column(0).to_pylist())
    assert all(any(i.startswith(h) for h in HOSTILE_VALUES) for i in ids)
    # every feature of every customer is what the unmodified bank gives: the hostile ids joined throughout
    snapshot = pd.read_parquet(hostile_bank["features"][AS_OF]).sort_values("customer_id", ignore_index=True)
    plain = pd.read_parquet(hostile_bank["plain_features"])
    plain["customer_id"] = plain["customer_id"].map(hostile)
    plain = plain.sort_values("customer_id", ignore_index=True)
    assert set(snapshot["customer_id"]) <= ids and len(snapshot) > 300
    pd.testing.assert_frame_equal(snapshot, plain)


def _with_hostile_regions(source: Path, target: Path, seed: int) -> Path:
    frame = pd.read_parquet(source)
    rng = np.random.default_rng(seed)
    frame["region"] = rng.choice(list(HOSTILE_VALUES), len(frame))
    frame.to_parquet(target, index=False)
    return target


def test_psi_and_slices_over_hostile_regions_and_ids(hostile_bank, tmp_path):
    """A bank's own region names (Xi'an, 西安, ...) as the slice and as a categorical feature."""
    reference = _with_hostile_regions(hostile_bank["features"][BEFORE], tmp_path / "reference.parquet", 0)
    current = _with_hostile_regions(hostile_bank["features"][AS_OF], tmp_path / "current.parquet", 1)
    columns = set(pq.read_schema(current).names)
    slices = slice_expressions(load_catalog(), columns)
    assert set(slices) == {"value_tier", "region"}
    assert set(slice_expressions(load_catalog(), columns - {"aum_total"})) == {"region"}  # the tier's rule needs aum_total
    kinds = {"region": "categorical", "aum_total": "numeric", "txn_count_3m": "numeric"}
    con = connect(1, "1GB")
    try:
        psi = feature_psi(con, reference, current, kinds, slices)
    finally:
        con.close()
    regions = psi[psi["slice_column"] == "region"]
    assert set(regions["slice"]) == set(HOSTILE_VALUES)  # every value came back as written
    assert regions["psi"].notna().all() and (regions["current_rows"] > 0).all()
    frame = pd.read_parquet(current)
    counted = regions[regions["feature"] == "aum_total"].set_index("slice")["current_rows"]
    assert counted.to_dict() == frame["region"].value_counts().to_dict()
    tiers = psi[(psi["slice_column"] == "value_tier") & (psi["feature"] == "region")]
    assert tiers["current_rows"].sum() == len(frame)
    # the categorical feature's bins are the hostile strings themselves, and PSI of a random relabelling is small
    overall = psi[(psi["slice_column"] == "(all)") & (psi["feature"] == "region")]
    assert int(overall["bins"].iloc[0]) == len(HOSTILE_VALUES) and float(overall["psi"].iloc[0]) < 0.05


def test_rule_tags_score_hostile_customer_ids_unchanged(hostile_bank, tmp_path):
    catalog = load_catalog()
    # suitability's assessments are risk_appetite's labels: the model tag is in the catalog, skipped
    rules_only = Catalog(tags=(*catalog.rule_tags, catalog.get("risk_appetite")))
    store = ParquetTagStore(tmp_path / "tags [prod] 'x'")  # glob characters and a quote in the store's own path
    target = store.partition_path(AS_OF)
    con = connect(1, "1GB")
    try:
        summary = score_partition(
            con, None, rules_only, hostile_bank["features"][AS_OF], hostile_bank["staged"], AS_OF, target, skip={"risk_appetite": "rule tags only"}
        )
        some_id = pd.read_parquet(hostile_bank["features"][AS_OF], columns=["customer_id"])["customer_id"].iloc[0]
        looked_up = store.customer_tags(con, some_id, AS_OF)
        history = store.history(con, some_id)
    finally:
        con.close()
    rows = pd.read_parquet(target)
    ids = set(pd.read_parquet(hostile_bank["features"][AS_OF], columns=["customer_id"])["customer_id"])
    assert summary.rows == 3 * len(ids) and set(rows["customer_id"]) == ids
    assert set(looked_up["tag"]) == {"value_tier", "lifecycle_stage", "suitability"} and set(looked_up["customer_id"]) == {some_id}
    # hostile product ids are data: they join holdings to products and appear verbatim in the reasons
    from tagml.features.synthetic.shelf import products_table

    shelf = {hostile(p) for p in products_table().column("product_id").to_pylist()}
    reasons = [r for rs in rows[rows["tag"] == "suitability"]["reasons"] for r in rs]
    assert any(f"holds {p} (R" in r for r in reasons for p in shelf)
    assert len(history) == 3 and set(history["as_of"].astype(str)) == {AS_OF.isoformat()}


def test_a_band_naming_hostile_values_matches_them_exactly(hostile_bank, tmp_path):
    """A band's string literals survive the parse-and-regenerate step: quotes doubled, backslash kept."""
    entry = load_catalog().get("value_tier").model_dump(mode="json")
    entry["rule"]["bands"] = [{"label": "affluent", "when": "region IN ('Xi''an', '西安', 'a\\b', '\"; DROP TABLE x; --')"}]
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "tags": [entry]}, allow_unicode=True))
    tag = load_catalog(path).get("value_tier")
    features = _with_hostile_regions(hostile_bank["features"][AS_OF], tmp_path / "features.parquet", 2)
    con = connect(1, "1GB")
    try:
        batches = list(rule_batches(con, features, tag, f"SELECT customer_id, {rule_case_sql(tag)} AS value FROM features", 1000))
    finally:
        con.close()
    got = pa.Table.from_batches(batches).to_pandas().set_index("customer_id")["value"]
    frame = pd.read_parquet(features).set_index("customer_id")
    expected = frame["region"].isin(["Xi'an", "西安", "a\\b", '"; DROP TABLE x; --']).map({True: "affluent", False: "mass"})
    pd.testing.assert_series_equal(got.sort_index(), expected.sort_index(), check_names=False)
    assert 0 < (got == "affluent").sum() < len(got)


def test_patterns_read_only_under_the_directory_as_named(tmp_path):
    """Glob characters in a directory's own name are literal; only the pattern part matches."""
    for name in ("tags [prod]", "star*", "q?"):
        root = tmp_path / name
        for day in ("2026-01-31", "2026-02-28"):
            (root / f"as_of={day}").mkdir(parents=True)
            pd.DataFrame({"as_of": [day]}).to_parquet(root / f"as_of={day}" / "data.parquet")
        with duckdb.connect() as con:
            assert con.execute(f"SELECT count(*) FROM read_parquet({glob_literal(root, 'as_of=*/data.parquet')})").fetchall() == [(2,)]
    (tmp_path / "stars").mkdir()  # `star*` must not also match a sibling `stars`
    pd.DataFrame({"as_of": ["x"]}).to_parquet(tmp_path / "stars" / "data.parquet")
    with duckdb.connect() as con:
        assert con.execute(f"SELECT count(*) FROM read_parquet({glob_literal(tmp_path / 'star*', '*/data.parquet')})").fetchall() == [(2,)]
    with pytest.raises(WarehouseConfigError, match="backslash"):
        glob_literal(tmp_path / "a\\b", "*.parquet")
