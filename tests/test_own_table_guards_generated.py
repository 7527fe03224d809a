"""The guards on the generated bank-own tables, as a bank's first try meets them: every PII column (by name in
English and Chinese, by content under innocent names) is excluded with its reason and never reaches the
training snapshot, the leaky table is refused naming its columns, and the 5-class tag on monthly snapshots
takes each label's snapshot on or before its date."""

from datetime import date

import pandas as pd
import pytest
import yaml
from conftest import make_connection

from tagml.features.synthetic import BankConfig, generate_bank, generate_own_tables
from tagml.features.synthetic.own_tables import ID_COLUMN, PII_BY_CONTENT, PII_BY_NAME
from tagml.training.catalog import load_catalog
from tagml.training.dataset import TrainingDataError, build_training_set, default_train_as_of


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    root = tmp_path_factory.mktemp("guards")
    generate_bank(BankConfig(customers=2500, months=6, seed=11), root / "raw")
    generate_own_tables(root / "raw", root / "own_tables", seed=11)
    return root


def entry(name: str, classes: list[str], table: str, labels: str) -> dict:
    return {
        "name": name,
        "description": "generated own table",
        "kind": "model",
        "classes": classes,
        "owner": "credit-risk",
        "label": {
            "feature_source": {
                "path": f"own_tables/{table}",
                "id_column": ID_COLUMN,
                "labels_path": f"own_tables/{labels}",
                "categorical": ["BranchCode", "SegmentCode"],
            }
        },
        "model": {"trials": 1},
    }


def tag_of(root, **fields):
    path = root / "catalog.yaml"  # relative paths: read from the catalog file's folder
    path.write_text(yaml.safe_dump({"tags": [entry(**fields)]}, allow_unicode=True))
    return load_catalog(path).tags[0]


def test_every_pii_column_of_the_generated_table_is_excluded_by_its_reason_and_never_in_the_snapshot(own, tmp_path):
    tag = tag_of(own, name="credit_risk", classes=["good", "bad"], table="crm_wide.parquet", labels="credit_risk_labels.csv")
    data = build_training_set(make_connection(tmp_path), own, tag, default_train_as_of(tag, own), tmp_path / "sets")
    audit = data.audit.as_dict()
    for column in PII_BY_NAME:
        assert audit[column]["use"] == "excluded" and "PII" in audit[column]["reason"] and "name" in audit[column]["reason"], (column, audit[column])
    for column in PII_BY_CONTENT:
        assert audit[column]["use"] == "excluded" and "PII" in audit[column]["reason"] and "content" in audit[column]["reason"], (column, audit[column])
    assert audit["OpenDate"]["use"] == "excluded" and audit[ID_COLUMN]["use"] == "excluded"
    assert audit["BranchCode"]["use"] == audit["SegmentCode"]["use"] == "categorical"
    snapshot = pd.read_parquet(data.snapshot_path)
    assert not set(snapshot.columns) & {*PII_BY_NAME, *PII_BY_CONTENT}
    assert {"BranchCode", "MonthlyIncome", "TotalAUM"} <= set(data.feature_names)


def test_the_generated_leaky_table_is_refused_naming_its_columns(own, tmp_path):
    tag = tag_of(own, name="credit_risk", classes=["good", "bad"], table="crm_wide_leaky.parquet", labels="credit_risk_labels.csv")
    with pytest.raises(TrainingDataError, match=r"give the label away: .*'risk_score_final'") as refused:
        build_training_set(make_connection(tmp_path), own, tag, default_train_as_of(tag, own), tmp_path / "sets")
    assert "leakage.allow" in str(refused.value)
    assert not (tmp_path / "sets").exists() or not list((tmp_path / "sets").rglob("*.parquet"))  # nothing stored


def test_a_five_class_tag_on_the_monthly_snapshots_takes_each_labels_snapshot_on_or_before_its_date(own, tmp_path):
    tag = tag_of(own, name="credit_grade", classes=["A", "B", "C", "D", "E"], table="crm_monthly", labels="credit_grade_labels.csv")
    data = build_training_set(make_connection(tmp_path), own, tag, date(2027, 1, 1), tmp_path / "sets")
    assert set(data.frame["label"]) == {"A", "B", "C", "D", "E"}
    monthly = pd.read_parquet(own / "own_tables" / "crm_monthly")
    monthly["as_of"] = pd.to_datetime(monthly["as_of"]).dt.date
    earlier = data.frame[pd.to_datetime(data.frame["as_of"]).dt.date < monthly["as_of"].max()]  # a label the newest snapshot must not serve
    row = earlier.iloc[len(earlier) // 2]
    label_day = pd.Timestamp(row["as_of"]).date()
    taken = monthly[(monthly[ID_COLUMN].astype(str) == row["customer_id"]) & (monthly["as_of"] <= label_day)].sort_values("as_of").iloc[-1]
    assert row["TotalAUM"] == pytest.approx(taken["TotalAUM"], nan_ok=True)
