"""The generated bank-own tables: deterministic, on the raw bank's customers, with well-formed PII, and
labels a model can learn but not perfectly (a quick logistic regression measures it); the leaky table leaks."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_predict

from tagml.cli import main
from tagml.features.synthetic import BankConfig, generate_bank, generate_own_tables
from tagml.features.synthetic.own_tables import CREDIT_GRADES, ID_COLUMN, LEAKY_COLUMNS, PII_BY_CONTENT, PII_BY_NAME, id_check_character, luhn_sum

MONTHS = 6
NUMERIC = ["age", "tenure_months", "MonthlyIncome", "TotalAUM", "DepositBal", "invest_bal", "CardDebt", "LoanCount", "loan_principal"]
NUMERIC += ["MonthlyRepayment", "TxnCount", "txn_credit_amt", "TxnDebitAmt", "ProductCount", "app_logins"]


@pytest.fixture(scope="module")
def bank(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("own")
    generate_bank(BankConfig(customers=4000, months=MONTHS, seed=5), root / "raw")
    summary = generate_own_tables(root / "raw", root / "own", seed=7)
    return {"root": root, "raw": root / "raw", "own": root / "own", "summary": summary}


def _frames(own: Path) -> dict[str, pd.DataFrame]:
    frames = {p.stem: pd.read_parquet(p) for p in sorted(own.glob("*.parquet"))}
    frames |= {p.stem: pd.read_csv(p) for p in sorted(own.glob("*.csv"))}
    frames["crm_monthly"] = pd.read_parquet(own / "crm_monthly")
    return frames


def test_same_seed_same_tables_another_seed_others(bank, tmp_path):
    first = _frames(bank["own"])
    again = generate_own_tables(bank["raw"], tmp_path / "again", seed=7)
    assert again["rows"] == bank["summary"]["rows"]
    for name, frame in _frames(tmp_path / "again").items():
        pd.testing.assert_frame_equal(frame, first[name], obj=name)
    generate_own_tables(bank["raw"], tmp_path / "other", seed=8)
    other = _frames(tmp_path / "other")
    assert not other["crm_wide"]["TotalAUM"].equals(first["crm_wide"]["TotalAUM"])
    assert not other["credit_risk_labels"].equals(first["credit_risk_labels"])


def test_one_row_per_raw_customer_and_monthly_snapshots_that_move(bank):
    raw_ids = set(pd.read_parquet(bank["raw"] / "customers")["customer_id"])
    frames = _frames(bank["own"])
    wide, monthly = frames["crm_wide"], frames["crm_monthly"]
    assert wide[ID_COLUMN].is_unique and set(wide[ID_COLUMN]) == raw_ids
    assert set(frames["credit_risk_labels"][ID_COLUMN]) < raw_ids and set(frames["credit_grade_labels"][ID_COLUMN]) < raw_ids
    assert len(list((bank["own"] / "crm_monthly").glob("*.parquet"))) == MONTHS == monthly["as_of"].nunique()
    assert not monthly.duplicated([ID_COLUMN, "as_of"]).any()
    # the newest snapshot is the wide table; the balances move from month to month
    newest = monthly[monthly["as_of"] == monthly["as_of"].max()].drop(columns="as_of").reset_index(drop=True)
    pd.testing.assert_frame_equal(newest, wide)
    aum = monthly.pivot(index=ID_COLUMN, columns="as_of", values="TotalAUM").dropna()
    assert (aum.nunique(axis=1) > 1).mean() > 0.9
    # bank-style columns: integer category codes, a DATE, text categoricals, NULLs in the measurements
    assert wide["BranchCode"].dtype == "int64" and wide["SegmentCode"].dtype == "int64" and 5 <= wide["BranchCode"].nunique() <= 40
    assert set(wide["SegmentCode"]) <= {1, 2, 3, 4, 5}
    assert all(type(v).__name__ == "date" for v in wide["OpenDate"].head(50))
    assert wide["occupation_type"].dtype == object and 0.03 < wide["MonthlyIncome"].isna().mean() < 0.15


def test_pii_by_name_and_by_content_is_well_formed(bank):
    wide = _frames(bank["own"])["crm_wide"]
    assert set(PII_BY_NAME) | set(PII_BY_CONTENT) <= set(wide.columns)
    ids = wide["身份证号"]
    assert ids.str.fullmatch(r"\d{17}[\dX]").all()
    assert all(id_check_character(v[:17]) == v[17] for v in ids)
    birth = pd.read_parquet(bank["raw"] / "customers").set_index("customer_id")["birth_date"]
    assert (ids.str[6:14] == pd.to_datetime(birth.loc[wide[ID_COLUMN]]).dt.strftime("%Y%m%d").to_numpy()).all()
    assert wide["ref_no"].str.fullmatch(r"62\d{14}").all() and all(luhn_sum(v) == 0 for v in wide["ref_no"])
    assert luhn_sum("6200000000000001") != 0  # the check can fail
    for column in ("contact", "手机号"):
        assert wide[column].str.fullmatch(r"1[3-9]\d{9}").all(), column
    assert wide["PhoneNumber"].str.fullmatch(r"\+86-1[3-9]\d-\d{4}-\d{4}").all()
    email = re.compile(r"[a-z]+\.[a-z]+\d+@[a-z0-9]+\.com")
    assert wide["EmailAddress"].map(email.fullmatch).all()
    memo = wide["memo"].dropna()
    assert 0.75 < len(memo) / len(wide) < 0.95 and memo.map(email.fullmatch).all()
    assert wide["客户名称"].str.fullmatch(r"[\u4e00-\u9fff]{2}").all() and wide["CustomerName"].str.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+").all()


def _design(wide: pd.DataFrame) -> pd.DataFrame:
    X = wide[NUMERIC].astype(float).clip(lower=0).apply(np.log1p)
    X = X.fillna(X.median())
    X = pd.concat([X, pd.get_dummies(wide[["occupation_type", "SegmentCode"]].astype(str), dtype=float)], axis=1)
    return ((X - X.mean()) / X.std().replace(0, 1)).set_axis(wide[ID_COLUMN])


def _logistic_auc(X: pd.DataFrame, y: pd.Series, positive: str | None) -> float:
    p = cross_val_predict(LogisticRegression(max_iter=2000), X, y, cv=5, method="predict_proba")
    classes = sorted(y.unique())
    return roc_auc_score(y == positive, p[:, classes.index(positive)]) if positive else roc_auc_score(y, p, multi_class="ovr", labels=classes)


def test_labels_are_learnable_but_not_leaky(bank):
    frames = _frames(bank["own"])
    X = _design(frames["crm_wide"])
    risk, grade = frames["credit_risk_labels"], frames["credit_grade_labels"]
    assert list(risk.columns) == [ID_COLUMN, "label", "label_date", "known_date", "source"] and list(grade.columns) == [ID_COLUMN, "label", "label_date"]
    assert set(risk["label"]) == {"good", "bad"} and 0.05 <= (risk["label"] == "bad").mean() <= 0.10
    assert set(grade["label"]) == set(CREDIT_GRADES)
    for labels in (risk, grade):
        assert 0.3 < len(labels) / len(X) < 0.7 and labels[ID_COLUMN].is_unique
        assert pd.to_datetime(labels["label_date"]).dt.to_period("M").nunique() >= MONTHS - 2
    assert (pd.to_datetime(risk["known_date"]) >= pd.to_datetime(risk["label_date"])).all()
    assert set(risk["source"]) <= {"observed_outcome", "relationship_manager"}
    risk_auc = _logistic_auc(X.loc[risk[ID_COLUMN]], risk["label"].set_axis(risk[ID_COLUMN]), "bad")
    grade_auc = _logistic_auc(X.loc[grade[ID_COLUMN]], grade["label"].set_axis(grade[ID_COLUMN]), None)
    assert 0.70 <= risk_auc <= 0.85, risk_auc
    assert 0.65 <= grade_auc <= 0.85, grade_auc


def test_the_leaky_table_leaks_the_credit_risk_label(bank):
    frames = _frames(bank["own"])
    leaky, risk = frames["crm_wide_leaky"], frames["credit_risk_labels"].set_index(ID_COLUMN)
    assert list(leaky.columns) == [*frames["crm_wide"].columns, *LEAKY_COLUMNS]
    labelled = leaky.set_index(ID_COLUMN).loc[risk.index]
    bad = risk["label"] == "bad"
    assert (labelled["bad_flag"] == bad.astype(int)).all() and leaky.set_index(ID_COLUMN).drop(risk.index)["bad_flag"].isna().all()
    assert roc_auc_score(bad, labelled["risk_score_final"]) > 0.999
    assert (pd.to_datetime(labelled["label_date"]) == pd.to_datetime(risk["label_date"])).all()


def test_generate_own_tables_from_the_cli_writes_them_under_the_home(tmp_path, monkeypatch, capsys):
    for name in [n for n in os.environ if n.startswith("TAGML_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("TAGML_HOME", str(tmp_path / "home"))
    assert main(["generate", "--customers", "300", "--months", "3", "--own-tables"]) == 0
    summary = json.loads(capsys.readouterr().out)["own_tables"]
    assert summary["out"] == str(tmp_path / "home" / "own_tables") and summary["rows"]["crm_wide"] == 300
    assert all(Path(p).exists() for p in summary["paths"].values())
    assert not (tmp_path / "home" / "raw" / "own_tables").exists()
