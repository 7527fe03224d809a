"""The feature snapshot of a bank's own table for one as_of (features/own_table.py `own_table_snapshot`):
point in time, only the model's columns, and a named error that writes nothing for each way it can fail."""

from datetime import date

import pandas as pd
import pytest

from tagml.core.suppression import Suppression, customer_hash
from tagml.features.own_table import OwnTableSnapshotError, own_table_snapshot
from tests.conftest import make_connection

FEATURES = {"segment": "categorical", 'spend "monthly"; DROP': "numeric"}  # a hostile column name, quoted


def _monthly(tmp_path):
    table = pd.DataFrame(
        {
            "cust_no": [1, 1, 2, 2, 3],
            "as_of": pd.to_datetime(["2026-01-31", "2026-02-28", "2026-01-31", "2026-03-31", "2026-03-31"]),
            "segment": ["a", "b", "a", "c", "c"],
            'spend "monthly"; DROP': [1, 2, 3, 4, 5],
            "holder_name": ["Ann", "Ann", "Bo", "Bo", "Cy"],
        }
    )
    path = tmp_path / "monthly.parquet"
    table.to_parquet(path)
    return str(path)


def test_latest_row_on_or_before_as_of_with_only_the_requested_columns(tmp_path):
    con = make_connection(tmp_path)
    target = tmp_path / "out" / "data.parquet"
    rows = own_table_snapshot(con, "t", _monthly(tmp_path), "cust_no", FEATURES, date(2026, 2, 28), target)
    frame = pd.read_parquet(target)
    assert rows == 2 and list(frame.columns) == ["customer_id", "as_of", *FEATURES]  # no PII column copied
    assert frame["customer_id"].tolist() == ["1", "2"] and frame["segment"].tolist() == ["b", "a"]
    assert frame['spend "monthly"; DROP'].dtype == "float64"
    later = own_table_snapshot(con, "t", _monthly(tmp_path), "cust_no", FEATURES, date(2026, 12, 31), target)
    assert later == 3 and pd.read_parquet(target)["segment"].tolist() == ["b", "c", "c"]


def test_erased_customers_never_come_back_from_the_banks_own_table(tmp_path):
    # the bank's table still holds customer 2 (tagml cannot rewrite it): the snapshot must leave them out
    con = make_connection(tmp_path)
    salt = "ab" * 32
    erased = Suppression(salt, frozenset({customer_hash(salt, "2"), customer_hash(salt, "someone else")}))
    target = tmp_path / "out" / "data.parquet"
    rows = own_table_snapshot(con, "t", _monthly(tmp_path), "cust_no", FEATURES, date(2026, 12, 31), target, erased)
    assert rows == 2 and pd.read_parquet(target)["customer_id"].tolist() == ["1", "3"]
    assert own_table_snapshot(con, "t", _monthly(tmp_path), "cust_no", FEATURES, date(2026, 12, 31), target, Suppression(salt, frozenset())) == 3


def test_a_static_csv_is_taken_whole_and_duplicates_are_a_named_error(tmp_path):
    con = make_connection(tmp_path)
    csv = tmp_path / "crm.csv"
    pd.DataFrame({"id": ["x", "y"], "segment": ["a", "b"], 'spend "monthly"; DROP': [1.5, 2.5]}).to_csv(csv, index=False)
    target = tmp_path / "snap.parquet"
    assert own_table_snapshot(con, "t", str(csv), "id", FEATURES, date(2026, 1, 1), target) == 2
    before = target.read_bytes()
    pd.DataFrame({"id": ["x", "x"], "segment": ["a", "b"], 'spend "monthly"; DROP': [1.5, 2.5]}).to_csv(csv, index=False)
    with pytest.raises(OwnTableSnapshotError, match=r"tag 't': feature table .*crm.csv has 1 duplicate row\(s\) of 'id'"):
        own_table_snapshot(con, "t", str(csv), "id", FEATURES, date(2026, 1, 1), target)
    assert target.read_bytes() == before


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", r"feature table .*gone.parquet does not exist"),
        ("corrupt", r"cannot read feature table .*broken.parquet"),
        ("no_id", r"has no id column 'client'"),
        ("no_feature", r"lacks 1 feature column\(s\) the model uses: \['income'\]"),
        ("too_early", r"has no rows dated on or before 2025-12-31"),
    ],
)
def test_each_failure_is_named_and_writes_nothing(tmp_path, case, message):
    con = make_connection(tmp_path)
    path, id_column, features, as_of = _monthly(tmp_path), "cust_no", dict(FEATURES), date(2026, 3, 31)
    if case == "missing":
        path = str(tmp_path / "gone.parquet")
    elif case == "corrupt":
        path = str(tmp_path / "broken.parquet")
        (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    elif case == "no_id":
        id_column = "client"
    elif case == "no_feature":
        features["income"] = "numeric"
    else:
        as_of = date(2025, 12, 31)
    target = tmp_path / "snap.parquet"
    with pytest.raises(OwnTableSnapshotError, match=message) as err:
        own_table_snapshot(con, "t", path, id_column, features, as_of, target)
    assert "Ann" not in str(err.value) and not target.exists()
