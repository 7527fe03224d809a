"""Suitability and questionnaire validity with real stores: staged Parquet tables, the real scorer and tag-store partition."""

import shutil
from datetime import date, timedelta
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from tagml.core.storage import staged_path
from tagml.scoring.score import TAG_ROW_SCHEMA, UnscorableTagsError, score_partition
from tagml.scoring.suitability import suitability_mismatch
from tagml.training.catalog import CatalogError, load_catalog
from tests.conftest import WINDOW_END, write_test_catalog

AS_OF = date(2026, 10, 31)
MONTH = date(2026, 10, 31)


def _months_ago(months: int) -> date:
    return AS_OF - timedelta(days=round(months * 30.44))


# customer -> (questionnaire level and age in months, or None; held products)
CUSTOMERS = {
    "C1": (("C2", 2), ["MF-EQ"]),  # a C2 customer holding an R4 fund
    "C2": (("C3", 11), ["MF-BAL", "BD-GOV-3Y"]),  # an 11-month-old questionnaire is still valid
    "C3": (("C4", 13), ["MF-EQ"]),  # a 13-month-old one has expired
    "C4": (None, ["MF-QDII"]),  # no questionnaire: an inferred C5 is not an assessment
    "C5": (("C1", 1), []),  # nothing held
    "C6": (("C5", 30), ["MF-BOND"]),  # older than max_age_days (730): still visible as expired
    "C7": (("C1", 3), ["MF-BOND"]),  # a C1 customer holding an R2 fund
}


def _write(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def staged_bank(tmp: Path, with_holdings: bool = True) -> tuple[Path, Path]:
    """A tiny staged delivery (tag_labels, products, holdings) and a feature snapshot of its customers."""
    staged = tmp / "staged"
    labels = [
        (cid, "risk_appetite", level, _months_ago(age), _months_ago(age), "risk_questionnaire") for cid, (q, _) in CUSTOMERS.items() if q for level, age in [q]
    ]
    # an older questionnaire of C1 with another level: the newest one counts
    labels.append(("C1", "risk_appetite", "C5", _months_ago(20), _months_ago(20), "risk_questionnaire"))
    _write(
        staged_path(staged, "tag_labels"), pa.table(dict(zip(["customer_id", "tag", "label", "label_date", "known_date", "source"], map(list, zip(*labels)))))
    )
    from tagml.features.synthetic.shelf import products_table

    _write(staged_path(staged, "products"), products_table())
    rows = [(cid, MONTH, pid, 1000.0) for cid, (_, held) in CUSTOMERS.items() for pid in held]
    rows += [("C5", MONTH, "EQ-GROWTH", 0.0), ("C5", date(2026, 9, 30), "EQ-GROWTH", 500.0)]  # sold out: zero now, held last month
    rows += [("C1", date(2026, 11, 30), "EQ-GROWTH", 900.0)]  # after as_of: not seen
    if with_holdings:
        _write(staged_path(staged, "holdings"), pa.table(dict(zip(["customer_id", "month_end", "product_id", "market_value"], map(list, zip(*rows))))))
    features = tmp / "features.parquet"
    _write(features, pa.table({"customer_id": list(CUSTOMERS), "aum_total": [1.0] * len(CUSTOMERS)}))
    return staged, features


@pytest.fixture
def catalog(tmp_path):
    return load_catalog(write_test_catalog(tmp_path / "catalog.yaml", ("risk_appetite", "suitability")))


def _score(con, catalog, features, staged, target, as_of=AS_OF):
    return score_partition(con, None, catalog, features, staged, as_of, target, skip={"risk_appetite": "suitability is under test"})


def test_suitability_compares_held_risk_with_the_valid_assessment(con, catalog, tmp_path):
    staged, features = staged_bank(tmp_path)
    target = tmp_path / "tags" / "data.parquet"
    summary = _score(con, catalog, features, staged, target)
    assert pq.read_schema(target).names == TAG_ROW_SCHEMA.names
    rows = pd.read_parquet(target).set_index("customer_id")
    assert summary.coverage.passed and summary.per_tag["suitability"]["holdings_month_end"] == "2026-10-31"
    assert rows.value.to_dict() == {
        "C1": "above_appetite",
        "C2": "within",
        "C3": "no_valid_assessment",
        "C4": "no_valid_assessment",
        "C5": "no_rated_holdings",
        "C6": "no_valid_assessment",
        "C7": "above_appetite",
    }
    assert list(rows.reasons["C1"]) == [f"holds MF-EQ (R4) above the assessed C2 of {_months_ago(2)}"]
    assert list(rows.reasons["C2"]) == [f"highest risk held MF-BAL (R3), within the assessed C3 of {_months_ago(11)}"]
    assert list(rows.reasons["C3"]) == [
        f"assessment C4 of {_months_ago(13)} expired after 365 days",
        "holds MF-EQ (R4) (an inferred appetite is not an assessment)",
    ]
    assert list(rows.reasons["C4"]) == ["no risk assessment on record", "holds MF-QDII (R5) (an inferred appetite is not an assessment)"]
    assert list(rows.reasons["C5"]) == ["no rated product held at 2026-10-31"]
    assert rows.assessment.to_dict() == {"C1": "valid", "C2": "valid", "C3": "expired", "C4": "none", "C5": "valid", "C6": "expired", "C7": "valid"}
    assert rows.assessed_on["C3"] == _months_ago(13) and pd.isna(rows.assessed_on["C4"])
    assert (rows.source == "rule").all() and rows.producer.str.startswith("rule:2026.1:").all() and rows.inferred_value.isna().all()


def test_holdings_staged_by_month_end_decide_as_holdings_staged_whole(con, catalog, tmp_path):
    """Staging writes holdings one file per month end; suitability then reads only the latest on or before as_of
    (here a later month end exists, and the latest month holds a sold-out zero): the rows equal the whole table's."""
    staged, features = staged_bank(tmp_path)
    whole = tmp_path / "whole.parquet"
    _score(con, catalog, features, staged, whole)
    holdings = pq.read_table(staged_path(staged, "holdings"))
    staged_path(staged, "holdings").unlink()
    for month_end in sorted(set(holdings.column("month_end").to_pylist())):
        _write(staged / "holdings" / f"{month_end}.parquet", holdings.filter(pa.compute.equal(holdings.column("month_end"), month_end)))
    by_period = tmp_path / "by_period.parquet"
    summary = _score(con, catalog, features, staged, by_period)
    assert summary.per_tag["suitability"]["holdings_month_end"] == "2026-10-31"
    keep = [c for c in TAG_ROW_SCHEMA.names if c != "scored_at"]
    assert pq.read_table(by_period, columns=keep).equals(pq.read_table(whole, columns=keep))
    # every month end after as_of: no holdings on or before it
    for f in (staged / "holdings").glob("*.parquet"):
        if f.stem <= AS_OF.isoformat():
            f.unlink()
    _score(con, catalog, features, staged, by_period)
    assert set(pd.read_parquet(by_period).reasons.map(tuple)) == {(f"no holdings delivered on or before {AS_OF}",)}


def test_no_holdings_delivered_is_said_on_every_row(con, catalog, tmp_path):
    staged, features = staged_bank(tmp_path, with_holdings=False)
    target = tmp_path / "data.parquet"
    summary = _score(con, catalog, features, staged, target)
    rows = pd.read_parquet(target)
    assert set(rows.value) == {"no_rated_holdings"} and summary.per_tag["suitability"]["holdings_month_end"] == "no holdings delivered"
    assert set(rows.reasons.map(tuple)) == {(f"no holdings delivered on or before {AS_OF}",)}


def test_suitability_without_staged_labels_is_unscorable_and_writes_nothing(con, catalog, tmp_path):
    staged, features = staged_bank(tmp_path)
    staged_path(staged, "tag_labels").unlink()
    target = tmp_path / "data.parquet"
    with pytest.raises(UnscorableTagsError, match="tag 'suitability': no labels file at"):
        _score(con, catalog, features, staged, target)
    assert not target.exists()


def _catalog_with(tmp_path, edit) -> Path:
    path = write_test_catalog(tmp_path / "catalog.yaml", ("risk_appetite", "suitability"))
    raw = yaml.safe_load(path.read_text())
    edit({t["name"]: t for t in raw["tags"]})
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t["risk_appetite"]["label"].update(valid_days=0), "tag 'risk_appetite': label.valid_days: Input should be greater than or equal to 1"),
        (lambda t: t["risk_appetite"]["label"].update(valid_days=None), "suitability.assessment_tag 'risk_appetite' sets no label.valid_days"),
        (lambda t: t["risk_appetite"]["label"].update(observed_wins=False), "tag 'risk_appetite': .*valid_days: an assessment expires only where"),
        (lambda t: t["suitability"]["suitability"].update(assessment_tag="life"), "suitability.assessment_tag 'life' is not a model tag"),
        (lambda t: t["suitability"].update(classes=["within", "above"]), "tag 'suitability': .*suitability: classes must be"),
        (lambda t: t["suitability"].update(rule={"bands": [], "default": "within"}), "exactly one of a 'rule' section"),
    ],
)
def test_validity_and_suitability_settings_are_checked_by_tag(tmp_path, edit, message):
    with pytest.raises(CatalogError, match=message):
        load_catalog(_catalog_with(tmp_path, edit))


def test_the_shipped_bank_has_every_suitability_class(bank, con, tmp_path):
    """The 3000-customer session bank at the window end: the share of each class (printed for the report)."""
    catalog = load_catalog(write_test_catalog(tmp_path / "catalog.yaml", ("risk_appetite", "suitability", "value_tier")))
    features = tmp_path / "features.parquet"
    from tagml.features.customer_features import build_customer_features

    build_customer_features(con, bank["staged"], WINDOW_END, features)
    target = tmp_path / "data.parquet"
    score_partition(con, None, catalog, features, bank["staged"], WINDOW_END, target, skip={"risk_appetite": "suitability is under test"})
    rows = pd.read_parquet(target, filters=[("tag", "=", "suitability")])
    shares = rows.value.value_counts()
    print("suitability on the session bank:", shares.to_dict())
    assert set(shares.index) == {"within", "above_appetite", "no_valid_assessment", "no_rated_holdings"}
    assert 0.02 < shares["above_appetite"] / len(rows) < 0.5
    above = rows[rows.value == "above_appetite"]
    assert above.reasons.map(lambda r: len(r) > 0 and r[0].startswith("holds ") and " above the assessed C" in r[0]).all()
    example = suitability_mismatch(con, target)
    assert example["customer_id"] in set(above.customer_id) and example["reasons"] and example["assessment"] == "valid"
    assert example["inferred"] is None  # risk_appetite was skipped: no inferred value to compare


def test_a_held_product_missing_from_products_is_a_named_violation(con, bank, tmp_path):
    """holdings.product_id must be a delivered product (its risk rating is what suitability reads): an unrated id, or
    holdings delivered without products, fails the delivery by table, column and rule, and nothing is staged."""
    from tagml.core.storage import sql_literal
    from tagml.features.delivery import stage_delivery
    from tagml.features.raw import ContractError

    raw = tmp_path / "raw"
    shutil.copytree(bank["raw"], raw)
    source = f"read_parquet({sql_literal(str(bank['raw'] / 'holdings' / '*.parquet'))})"
    first = "row_number() OVER (ORDER BY customer_id, month_end, product_id) = 1"
    con.execute(
        f"COPY (SELECT * REPLACE (CASE WHEN {first} THEN 'XX-UNRATED' ELSE product_id END AS product_id) FROM {source}) "
        f"TO {sql_literal(raw / 'holdings.parquet')} (FORMAT PARQUET)"
    )
    shutil.rmtree(raw / "holdings")
    staged = tmp_path / "warehouse" / "raw"
    with pytest.raises(ContractError) as unrated:
        stage_delivery(con, raw, staged, date(2026, 11, 5))
    [violation] = unrated.value.violations
    assert (violation.table, violation.column, violation.rule, violation.detail) == ("holdings", "product_id", "known_product", "product_id not in products")
    assert violation.n_rows == 1 and violation.examples[0]["product_id"] == "XX-UNRATED"
    shutil.rmtree(raw / "products")
    with pytest.raises(ContractError) as unshelved:
        stage_delivery(con, raw, staged, date(2026, 11, 5))
    [violation] = unshelved.value.violations
    assert violation.rule == "known_product" and violation.n_rows == con.execute(f"SELECT count(*) FROM {source}").fetchall()[0][0]
    assert not staged.exists()


def test_the_mismatch_example_prefers_an_inferred_appetite_that_disagrees(con, catalog, tmp_path):
    staged, features = staged_bank(tmp_path)
    target = tmp_path / "data.parquet"
    _score(con, catalog, features, staged, target)
    suitability = pq.read_table(target).cast(TAG_ROW_SCHEMA)
    # risk_appetite rows as the model tag writes them: C1's inference agrees with its questionnaire, C7's does not
    risk = suitability.filter(pc.is_in(suitability["customer_id"], pa.array(["C1", "C7"]))).to_pandas()
    risk["tag"], risk["source"], risk["observed_value"], risk["inferred_value"] = "risk_appetite", "observed", ["C2", "C1"], ["C2", "C3"]
    pq.write_table(pa.concat_tables([suitability, pa.Table.from_pandas(risk, schema=TAG_ROW_SCHEMA, preserve_index=False)]), target)
    example = suitability_mismatch(con, target)
    assert (example["customer_id"], example["assessed"], example["inferred"], example["assessment"]) == ("C7", "C1", "C3", "valid")
    assert example["reasons"] == [f"holds MF-BOND (R2) above the assessed C1 of {_months_ago(3)}"]
