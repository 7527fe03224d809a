"""A bank's own table and labels file as a tag's inputs: the labels file's schema, the default training
date, the column audit (PII by name and by content, types, overrides) and the leakage guard, on real
DuckDB over Parquet/CSV files in a temp dir."""

from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import make_connection

from tagml.training.catalog import CatalogError, load_catalog
from tagml.training.dataset import TrainingDataError, default_train_as_of, wide_table_labels_sql

N = 600


def byo_tag(tmp: Path, source: dict | None = None, label: dict | None = None, **entry):
    """A binary BYO tag over `tmp/crm.parquet` and `tmp/labels.csv` (override any part)."""
    data = {
        "name": "big_spender",
        "description": "From the CRM wide table.",
        "kind": "model",
        "classes": ["small", "big"],
        "owner": "crm",
        "label": {
            "feature_source": {"path": str(tmp / "crm.parquet"), "id_column": "cust_no", "labels_path": str(tmp / "labels.csv"), **(source or {})},
            **(label or {}),
        },
        "model": {"trials": 1},
        **entry,
    }
    path = tmp / "catalog.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "tags": [data]}, allow_unicode=True))
    return load_catalog(path).tags[0]


def ids(n: int = N) -> list[str]:
    return [f"K{i:06d}" for i in range(n)]


def write_wide(tmp: Path, **columns) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({"cust_no": ids(), "segment": rng.choice(["gold", "silver", "bronze"], N), "monthly_spend": rng.gamma(2.0, 1000.0, N), **columns})
    frame.to_parquet(tmp / "crm.parquet")
    return frame


def write_labels(tmp: Path, frame: pd.DataFrame | None = None, name: str = "labels.csv", **columns) -> pd.DataFrame:
    rng = np.random.default_rng(2)
    if frame is None:
        frame = pd.DataFrame(
            {"cust_no": ids(), "label": rng.choice(["small", "big"], N), "label_date": [date(2026, 1, 1) + timedelta(days=i % 300) for i in range(N)]}
        )
    frame = frame.assign(**columns)
    path = tmp / name
    frame.to_parquet(path) if name.endswith(".parquet") else frame.to_csv(path, index=False)
    return frame


def labels_of(tmp: Path, tag, as_of: date = date(2027, 1, 1)) -> pd.DataFrame:
    con = make_connection(tmp)
    try:
        return con.execute(wide_table_labels_sql(tag, as_of, tmp)).df()
    finally:
        con.close()


# ---- the labels file -------------------------------------------------------------------------------


def test_labels_file_keeps_only_its_tag_its_sources_and_labels_known_on_the_date(tmp_path):
    frame = write_labels(tmp_path).head(8).copy()
    frame["tag"] = ["big_spender"] * 6 + ["other_tag"] * 2
    frame["source"] = ["crm", "crm", "crm", "survey", "crm", "crm", "crm", "crm"]
    frame["label_date"] = [date(2026, 1, 1)] * 8
    frame["known_date"] = [date(2026, 1, 1)] * 4 + [date(2026, 6, 1)] + [None] + [date(2026, 1, 1)] * 2
    write_labels(tmp_path, frame, name="labels.parquet")
    tag = byo_tag(tmp_path, {"labels_path": str(tmp_path / "labels.parquet")}, {"sources": ["crm"], "horizon_days": 10})
    got = labels_of(tmp_path, tag, date(2026, 3, 1))
    # rows 0-2 (crm, known), row 5 (known_date empty: label_date); not 3 (survey), 4 (known later), 6-7 (other tag)
    assert sorted(got["customer_id"]) == [ids()[i] for i in (0, 1, 2, 5)]
    assert list(got.columns) == ["customer_id", "label_date", "label", "as_of"]
    assert set(got["as_of"].dt.date) == {date(2025, 12, 22)}
    assert len(labels_of(tmp_path, tag, date(2026, 7, 1))) == 5


def test_labels_file_accepts_customer_id_and_applies_max_age(tmp_path):
    frame = write_labels(tmp_path).rename(columns={"cust_no": "customer_id"})
    write_labels(tmp_path, frame)
    tag = byo_tag(tmp_path, label={"max_age_days": 30})
    got = labels_of(tmp_path, tag, date(2026, 3, 1))
    assert len(got) and got["label_date"].min().date() >= date(2026, 1, 30)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f.drop(columns="label"), r"labels file .*labels.csv lacks column\(s\) 'label'; required: the id column, 'label' and 'label_date'"),
        (lambda f: f.drop(columns="cust_no"), r"lacks column\(s\) 'cust_no' \(or 'customer_id'\)"),
        (lambda f: f.assign(label_date=np.where(np.arange(N) == 3, "03/01/2026", f["label_date"].astype(str))), r"1 row\(s\) whose label_date is not a date"),
        (lambda f: f.assign(label_date=20260101), r"'label_date' is BIGINT; expected a date"),
        (lambda f: f.assign(cust_no=np.where(np.arange(N) < 2, None, f["cust_no"])), r"2 row\(s\) without a customer id \('cust_no'\)"),
        (lambda f: f.assign(known_date="soon"), r"600 row\(s\) whose known_date is not a date"),
        (lambda f: f.head(0), r"labels file .*labels.csv has no rows"),
    ],
)
def test_a_bad_labels_file_is_a_named_error(tmp_path, change, message):
    write_labels(tmp_path, change(write_labels(tmp_path)))
    tag = byo_tag(tmp_path)
    with pytest.raises(TrainingDataError, match=message) as caught:
        labels_of(tmp_path, tag)
    assert "K000" not in str(caught.value)  # ids never appear in an error


def test_sources_without_a_source_column_is_a_named_error(tmp_path):
    write_labels(tmp_path)
    tag = byo_tag(tmp_path, label={"sources": ["crm"]})
    with pytest.raises(TrainingDataError, match=r"label.sources is set but labels file .* has no 'source' column"):
        labels_of(tmp_path, tag)


def test_sources_of_the_staged_tag_labels_are_still_checked_at_load(tmp_path):
    with pytest.raises(CatalogError, match=r"label.sources: .*unknown label sources \['crm'\]"):
        byo_tag(tmp_path, {"labels_path": None}, {"sources": ["crm"]})


# ---- the default training date ---------------------------------------------------------------------


def test_default_training_date_is_the_newest_known_date_of_this_tags_labels(tmp_path):
    frame = write_labels(tmp_path)
    tag = byo_tag(tmp_path)
    assert default_train_as_of(tag, tmp_path) == max(frame["label_date"])  # no known_date column: label_date
    frame = frame.assign(known_date=[d + timedelta(days=90) for d in frame["label_date"]], tag="big_spender")
    other = frame.head(3).assign(tag="other_tag", known_date=date(2030, 1, 1))
    write_labels(tmp_path, pd.concat([frame, other]))
    assert default_train_as_of(tag, tmp_path) == max(frame["label_date"]) + timedelta(days=90)


def test_default_training_date_without_labels_of_the_tag_is_a_named_error(tmp_path):
    write_labels(tmp_path, tag="other_tag")
    with pytest.raises(TrainingDataError, match=r"tag 'big_spender': no labels in labels file .*labels.csv \(tag 'big_spender'\).*give train_as_of"):
        default_train_as_of(byo_tag(tmp_path), tmp_path)


def test_default_training_date_of_a_contract_tag_is_the_newest_staged_known_date(bank, con):
    newest = con.execute(f"SELECT max(known_date) FROM read_parquet('{bank['staged']}/tag_labels.parquet')").fetchone()[0]
    assert default_train_as_of(load_catalog().get("risk_appetite"), bank["staged"]) == newest
