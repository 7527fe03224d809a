"""Rule bands and class names from the catalog: checked at load, generated from a parse tree, run sandboxed.

Real catalog files, a real DuckDB over the session bank's feature snapshot; no mocks.
"""

from datetime import date

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import yaml

from tagml.features.dictionary import FEATURE_NAMES
from tagml.scoring.rules import (
    rule_batches,
    rule_case_sql,
    rule_columns,
    sandboxed_connection,
)
from tagml.scoring.score import ScoringError, score_partition
from tagml.training.catalog import CatalogError, load_catalog
from tests.conftest import MID_MONTH_END, make_connection

SHIPPED = load_catalog()
HOSTILE = "length((SELECT content FROM read_text('/etc/hostname')))>0"


def _load(tmp_path, tags: list[dict]):
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "tags": tags}, allow_unicode=True))
    return load_catalog(path)


def _value_tier(*whens: str) -> dict:
    entry = SHIPPED.get("value_tier").model_dump(mode="json")
    labels = ["private_banking", "high_net_worth", "affluent"]
    entry["rule"]["bands"] = [{"label": labels[i % 3], "when": w} for i, w in enumerate(whens)]
    return entry


# ---- rule bands at catalog load -------------------------------------------------------------------


def test_the_hostile_band_from_the_issue_is_rejected_at_load(tmp_path):
    with pytest.raises(CatalogError) as err:
        _load(tmp_path, [_value_tier("aum_total >= 6000000", HOSTILE)])
    message = str(err.value)
    assert "tag 'value_tier': rule.bands[1].when:" in message
    assert "subquery" in message


@pytest.mark.parametrize(
    "when, expected",
    [
        ("aum_totl >= 50000", "unknown column 'aum_totl' (did you mean 'aum_total'?)"),
        ("read_text('/etc/hostname') IS NOT NULL", "read_text"),
        ("aum_total > 0; COPY (SELECT 1) TO 'x.csv'", "2 statements"),
        ("aum_total > 0 AND getvariable('x') = 1", "getvariable()"),
        ("aum_total > ?", "parameter placeholder"),
        ("f.aum_total > 0", "qualified column"),
        ("region IN (SELECT region FROM read_parquet('x.parquet'))", "IN takes a list of literal values only"),
        ("region IN ('east', lower(region))", "IN takes a list of literal values only"),
        ("CAST(aum_total AS DATE) IS NULL", "cast to DATE"),
        ("region > 5", "does not evaluate over the feature columns"),
        ("aum_total >=", "not a valid SQL expression"),
        ("   ", "empty"),
        ("current_date > DATE '2020-01-01'", "current_date()"),
    ],
)
def test_bands_outside_the_allow_list_fail_at_load_naming_tag_band_and_construct(tmp_path, when, expected):
    with pytest.raises(CatalogError) as err:
        _load(tmp_path, [_value_tier("aum_total >= 6000000", when)])
    assert "tag 'value_tier': rule.bands[1].when:" in str(err.value)
    assert expected in str(err.value)


def test_allowed_constructs_load_and_run_as_sql_generated_from_the_parse_tree(tmp_path, bank_features):
    whens = (
        "coalesce(aum_total, 0) BETWEEN 1000000 AND 1e12 AND region IN ('east', 'south') /* a comment */",
        "CASE WHEN tenure_months < 12 THEN abs(aum_growth_3m) ELSE 0 END > 0.1 OR (num_children IS NULL AND lower(region) = 'north')",
        "round(greatest(aum_total, credit_limit) / 1000, 1) >= least(50, 60) AND NOT length(region) = 0 -- */ OR read_text('x') IS NULL",
    )
    tag = _load(tmp_path, [_value_tier(*whens)]).get("value_tier")
    sql = rule_case_sql(tag)
    assert "comment" not in sql and "read_text" not in sql and '"aum_total"' in sql  # regenerated, every identifier quoted
    assert rule_columns(tag) == ("aum_growth_3m", "aum_total", "credit_limit", "num_children", "region", "tenure_months")
    path = bank_features[MID_MONTH_END]
    con = make_connection(tmp_path)
    try:
        got = pa.Table.from_batches(list(rule_batches(con, path, tag, f"SELECT customer_id, {sql} AS value FROM features", 700))).to_pandas()
    finally:
        con.close()
    f = pd.read_parquet(path).set_index("customer_id")
    band1 = f.aum_total.fillna(0).between(1e6, 1e12) & f.region.isin(["east", "south"])
    band2 = np.where(f.tenure_months < 12, f.aum_growth_3m.abs(), 0) > 0.1
    band2 = pd.Series(band2, index=f.index).fillna(False) | (f.num_children.isna() & (f.region.str.lower() == "north"))
    band3 = ((np.maximum(f.aum_total, f.credit_limit) / 1000).round(1) >= 50) & (f.region.str.len() != 0)
    expected = pd.Series(np.select([band1, band2, band3.fillna(False)], ["private_banking", "high_net_worth", "affluent"], "mass"), index=f.index)
    assert len(got) == len(f) and got["customer_id"].is_unique
    pd.testing.assert_series_equal(got.set_index("customer_id")["value"].sort_index(), expected.sort_index(), check_names=False)
    assert set(expected) == {"private_banking", "high_net_worth", "affluent", "mass"}  # every band is exercised


def test_every_shipped_band_is_checked_against_the_feature_columns():
    for tag in (t for t in SHIPPED.rule_tags if t.rule is not None):  # suitability has no bands
        assert set(rule_columns(tag)) <= set(FEATURE_NAMES)
        assert "CASE WHEN (" in rule_case_sql(tag)


# ---- the sandbox that evaluates rules -------------------------------------------------------------


def test_rule_evaluation_has_no_file_access_even_for_sql_that_skipped_the_check(tmp_path, bank_features):
    """The external-access guard on its own: SQL that reads or writes files fails on the sandbox."""
    tag = SHIPPED.get("value_tier")
    con = make_connection(tmp_path)
    written = tmp_path / "written_by_rule.csv"
    try:
        rows = list(rule_batches(con, bank_features[MID_MONTH_END], tag, f"SELECT customer_id, {rule_case_sql(tag)} AS v FROM features", 5000))
        assert sum(b.num_rows for b in rows) > 0  # the registered snapshot columns are readable
        for sneaky in (
            f"SELECT customer_id, {HOSTILE} AS v FROM features",
            f"SELECT customer_id FROM features WHERE customer_id IN (SELECT customer_id FROM read_parquet('{bank_features[MID_MONTH_END]}'))",
        ):
            with pytest.raises(duckdb.PermissionException):
                list(rule_batches(con, bank_features[MID_MONTH_END], tag, sneaky, 5000))
        sandbox = sandboxed_connection(con, {"t": pa.table({"x": [1]})})
        try:
            with pytest.raises(duckdb.PermissionException):
                sandbox.execute(f"COPY (SELECT * FROM t) TO '{written}' (FORMAT CSV)")
            with pytest.raises(duckdb.Error):
                sandbox.execute("SET enable_external_access = true")
            # the caller's limits (the memory limit as DuckDB prints it, to 0.1 MiB)
            limits = "SELECT current_setting('threads'), current_setting('memory_limit')"
            (threads, memory), (own_threads, own_memory) = sandbox.execute(limits).fetchall()[0], con.execute(limits).fetchall()[0]
            assert threads == own_threads and memory.split()[1] == own_memory.split()[1]
            assert abs(float(memory.split()[0]) - float(own_memory.split()[0])) < 0.2
        finally:
            sandbox.close()
    finally:
        con.close()
    assert not written.exists()


def test_a_snapshot_without_a_rule_column_is_a_named_scoring_error(tmp_path, bank_features):
    catalog = _load(tmp_path, [SHIPPED.get("value_tier").model_dump(mode="json")])
    snapshot = tmp_path / "features.parquet"
    pd.read_parquet(bank_features[MID_MONTH_END]).drop(columns=["aum_total"]).to_parquet(snapshot)
    target = tmp_path / "tags" / "data.parquet"
    con = make_connection(tmp_path)
    try:
        with pytest.raises(ScoringError, match="rule tag 'value_tier'.*aum_total"):
            score_partition(con, None, catalog, snapshot, tmp_path, date(2026, 6, 30), target)
    finally:
        con.close()
    assert not target.exists()


# ---- class names and the catalog itself ---------------------------------------------------------------


@pytest.mark.parametrize("bad", ["E+", "unknown", "C 1", "", "-C1", "高"])
def test_unsafe_or_reserved_class_names_fail_at_load_naming_tag_and_class(tmp_path, bad):
    entry = SHIPPED.get("risk_appetite").model_dump(mode="json")
    entry["classes"] = ["C1", "C2", bad]
    with pytest.raises(CatalogError) as err:
        _load(tmp_path, [entry])
    assert "tag 'risk_appetite': classes:" in str(err.value)
    assert f"class {bad!r}" in str(err.value)


def test_safe_class_names_load(tmp_path):
    entry = SHIPPED.get("risk_appetite").model_dump(mode="json")
    entry["classes"] = ["C1", "c.2", "C-3", "4_x"]
    assert _load(tmp_path, [entry]).get("risk_appetite").classes == ("C1", "c.2", "C-3", "4_x")


def test_an_empty_catalog_is_rejected_by_name(tmp_path):
    with pytest.raises(CatalogError, match=r"catalog: tags: .*no tags \(tags: \[\]\)"):
        _load(tmp_path, [])


def test_a_caller_without_a_memory_limit_still_gets_a_sandbox():
    with duckdb.connect() as unlimited:
        unlimited.execute("SET memory_limit = '-1'")
        sandbox = sandboxed_connection(unlimited, {"t": pa.table({"x": [1, 2]})})
        try:
            assert sandbox.execute("SELECT sum(x) FROM t").fetchall() == [(3,)]
            with pytest.raises(duckdb.PermissionException):
                sandbox.execute("SELECT * FROM read_text('/etc/hostname')")
        finally:
            sandbox.close()


def test_an_unknown_label_source_is_rejected_by_name(tmp_path):
    entry = SHIPPED.get("risk_appetite").model_dump(mode="json")
    entry["label"]["sources"] = ["risk_questionnaire", "risk_questionaire"]
    with pytest.raises(CatalogError, match=r"tag 'risk_appetite': label.sources: .*unknown label sources \['risk_questionaire'\]"):
        _load(tmp_path, [entry])
