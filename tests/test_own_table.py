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
from tagml.training.dataset import TrainingDataError, build_training_set, default_train_as_of, wide_table_labels_sql

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


# ---- the column audit: types, overrides, reserved names, PII by name and by content ----------------


def cn_id(i: int) -> str:
    """A national id number of the right shape with a valid check character."""
    body = f"110101{1970 + i % 40}{1 + i % 12:02d}{1 + i % 28:02d}{i % 1000:03d}"
    total = sum(int(d) * w for d, w in zip(body, (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)))
    return body + "10X98765432"[total % 11]


def card(i: int) -> str:
    """A 16-digit payment card number with a valid Luhn check digit."""
    body = f"4{i:014d}"
    total = sum((n - 9 if n > 9 else n) for n in (int(d) * (1 if k % 2 else 2) for k, d in enumerate(reversed(body))))
    return body + str((10 - total % 10) % 10)


def iban(i: int) -> str:
    bban = f"NWBK{i:014d}"
    check = 98 - int("".join(str(int(c, 36)) for c in bban + "GB00")) % 97
    return f"GB{check:02d}{bban}"


PII_NAMED = ["CustomerName", "PhoneNumber", "EmailAddress", "surname", "tel", "dob", "iban", "account_number", "card_number", "zip_code", "postcode", "street"]
PII_NAMED += ["姓名", "身份证号", "手机号", "客户名称", "holder-name", "Home.Address", "e_mail"]
LEAKY_NAMED = ["target", "bad_flag", "IsBad", "Label_Date", "known-date", "source", "BigSpenderScore", "outcome_12m"]


def audited_table(tmp: Path) -> pd.DataFrame:
    rng = np.random.default_rng(3)
    columns = {name: [f"x{i}" for i in range(N)] for name in PII_NAMED + LEAKY_NAMED}
    columns |= {
        "label": rng.choice(["small", "big"], N),
        "Split": "train",
        "customer_id": ids(),
        "contact": [f"13{i % 10}{i:08d}" for i in range(N)],  # CN mobile numbers under an innocent name
        "ref": [f"user{i}@example.com" for i in range(N)],
        "c1": [cn_id(i) for i in range(N)],
        "c2": [card(i) for i in range(N)],
        "c3": [iban(i) for i in range(N)],
        "c4": [13800000000 + i for i in range(N)],  # phone numbers stored as integers
        "intl": [f"+44 20 7946 {i:04d}" for i in range(N)],
        "remark": [f"{i}@x.cn" if i % 3 == 0 else "ok" for i in range(N)],  # a third e-mails: not PII by content
        "branch_code": rng.integers(100, 110, N),
        "amount_text": [f"{v:.2f}" for v in rng.gamma(2.0, 10.0, N)],
        "opened": pd.Timestamp("2020-01-01"),
        "opened_day": date(2020, 1, 1),
        "tags_list": [[1, 2]] * N,
        "blob": [b"\x00"] * N,
        "dropped": 1.0,
        'spend"); DROP TABLE t; --': rng.normal(size=N),  # a hostile name is only ever quoted
        "月均消费": rng.gamma(2.0, 100.0, N),  # monthly spend, named in Chinese: not PII
    }
    return write_wide(tmp, **columns)


def test_every_column_is_used_or_excluded_with_its_reason(tmp_path):
    audited_table(tmp_path)
    write_labels(tmp_path)
    tag = byo_tag(tmp_path, {"categorical": ["branch_code"], "numeric": ["amount_text"]}, features={"exclude": ["dropped"]})
    data = build_training_set(make_connection(tmp_path), tmp_path, tag, date(2027, 1, 1), tmp_path / "sets")
    decisions = {d.column: (d.use, d.reason) for d in data.audit.decisions}
    assert set(decisions) == set(pd.read_parquet(tmp_path / "crm.parquet").columns)
    used = {c: use for c, (use, _) in decisions.items() if use != "excluded"}
    assert used == {
        "segment": "categorical",
        "monthly_spend": "numeric",
        "remark": "categorical",
        "branch_code": "categorical",
        "amount_text": "numeric",
        'spend"); DROP TABLE t; --': "numeric",
        "月均消费": "numeric",
    }
    assert data.feature_names == tuple(used) and data.feature_types == used
    assert list(data.frame.columns) == ["customer_id", "as_of", "label", *used, "split"]
    assert data.frame["amount_text"].dtype == "float64" and data.frame["branch_code"].str.fullmatch(r"10\d").all()
    reason = {c: r for c, (_, r) in decisions.items()}
    assert reason["cust_no"] == "id column" and reason["dropped"] == "excluded by the catalog (features.exclude)"
    assert all(reason[c].startswith("reserved name") for c in ("label", "Split", "customer_id"))
    assert [c for c in PII_NAMED if not reason[c].startswith("PII by name")] == []
    assert [c for c in LEAKY_NAMED if not reason[c].startswith("leakage by name")] == []
    kinds = {c: reason[c] for c in ("contact", "ref", "c1", "c2", "c3", "c4", "intl")}
    assert kinds == {
        "contact": "PII by content (phone number: 100% of sampled values)",
        "ref": "PII by content (e-mail address: 100% of sampled values)",
        "c1": "PII by content (national id number: 100% of sampled values)",
        "c2": "PII by content (payment card number: 100% of sampled values)",
        "c3": "PII by content (IBAN: 100% of sampled values)",
        "c4": "PII by content (phone number: 100% of sampled values)",
        "intl": "PII by content (phone number: 100% of sampled values)",
    }
    assert all(reason[c].startswith("unsupported type") for c in ("opened", "opened_day", "tags_list", "blob"))
    assert "TIMESTAMP" in reason["opened"] and "DATE" in reason["opened_day"]
    recorded = (tmp_path / "sets" / "big_spender" / f"{data.snapshot_id}.columns.json").read_text()
    assert "13000000" not in recorded and "@example.com" not in recorded and "x1" not in recorded  # names, never values


def test_pii_kinds_by_value():
    from tagml.features.pii import pii_kind

    assert pii_kind(cn_id(5)) == "national id number" and pii_kind(cn_id(5)[:-1] + ("0" if cn_id(5)[-1] != "0" else "1")) is None
    assert pii_kind(card(7)) == "payment card number" and pii_kind(card(7)[:-1] + str((int(card(7)[-1]) + 1) % 10)) is None
    assert pii_kind(iban(3)) == "IBAN" and pii_kind("GB00NWBK00000000000003") is None
    assert pii_kind("+86 138-0013-8000") == "phone number" and pii_kind("010-62345678") == "phone number"
    assert pii_kind("Zhang.San@bank.com.cn") == "e-mail address"
    assert {pii_kind(v) for v in ("12345", "gold", "2026-01-01", "3.14", "1234567890123")} == {None}


@pytest.mark.parametrize(
    ("source", "features", "message"),
    [
        ({"categorical": ["branch"]}, {}, r"label.feature_source.categorical names column\(s\) \['branch'\] that feature table .*crm.parquet does not have"),
        (
            {"numeric": ["segment"]},
            {},
            r"label.feature_source.numeric: columns of feature table .*crm.parquet declared numeric hold values that are not numbers \('segment': 600 value\(s\)\)",
        ),
        ({}, {"include": ["monthly_spnd"]}, r"features.include names column\(s\) \['monthly_spnd'\]"),
        ({}, {"exclude": ["Segment"]}, r"features.exclude names column\(s\) \['Segment'\]"),
        (
            {"numeric": ["opened"]},
            {},
            r"label.feature_source.numeric declares column 'opened' of feature table .*, whose type TIMESTAMP cannot be used as numeric",
        ),
    ],
)
def test_catalog_column_choices_that_do_not_fit_the_table_are_named_errors(tmp_path, source, features, message):
    write_wide(tmp_path, opened=pd.Timestamp("2020-01-01"))
    write_labels(tmp_path)
    tag = byo_tag(tmp_path, source, features=features)
    with pytest.raises(TrainingDataError, match=r"tag 'big_spender': " + message):
        build_training_set(make_connection(tmp_path), tmp_path, tag, date(2027, 1, 1), tmp_path / "sets")
    assert not (tmp_path / "sets").exists()


def test_include_list_keeps_only_its_columns_and_says_why_the_others_are_out(tmp_path):
    write_wide(tmp_path, extra=1.0)
    write_labels(tmp_path)
    data = build_training_set(make_connection(tmp_path), tmp_path, byo_tag(tmp_path, features={"include": ["monthly_spend"]}), date(2027, 1, 1), tmp_path / "s")
    assert data.feature_names == ("monthly_spend",)
    assert data.audit.as_dict()["extra"] == {"use": "excluded", "reason": "not in the catalog's features.include"}


def test_a_column_declared_both_ways_is_a_catalog_error(tmp_path):
    with pytest.raises(CatalogError, match=r"label.feature_source: .*columns \['x'\] are declared both categorical and numeric"):
        byo_tag(tmp_path, {"categorical": ["x"], "numeric": ["x"]})


def test_relative_paths_of_an_own_table_are_read_from_the_catalog_files_folder(tmp_path):
    """The webserver, the daemon and a CLI call each start in another directory: a relative path must not depend on it."""
    folder = tmp_path / "config"
    folder.mkdir()
    entry = {
        "name": "t",
        "description": "d",
        "kind": "model",
        "classes": ["a", "b"],
        "owner": "o",
        "label": {"feature_source": {"path": "../tables/crm.parquet", "labels_path": "labels.csv"}},
        "model": {"trials": 1},
    }
    (folder / "catalog.yaml").write_text(yaml.safe_dump({"tags": [entry]}))
    source = load_catalog(folder / "catalog.yaml").tags[0].label.feature_source
    assert Path(source.path).is_absolute() and Path(source.path).resolve() == (tmp_path / "tables" / "crm.parquet").resolve()
    assert Path(source.labels_path) == folder.resolve() / "labels.csv"
    entry["label"]["feature_source"]["path"] = str(tmp_path / "abs.parquet")
    (folder / "catalog.yaml").write_text(yaml.safe_dump({"tags": [entry]}))
    assert load_catalog(folder / "catalog.yaml").tags[0].label.feature_source.path == str(tmp_path / "abs.parquet")


# ---- training on an own table, and what it reports -------------------------------------------------


@pytest.fixture
def store(tmp_path):
    from tagml.training.tracking import connect_tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return {"uri": uri, "artifacts": str(tmp_path / "artifacts"), "client": connect_tracking(uri)}


def test_wide_table_source_trains_logs_its_column_audit_and_scores_unseen_categories(tmp_path, store):
    import json

    from conftest import shipped_slices

    from tagml.training.registry import load_model
    from tagml.training.train import train_tag
    from tagml.training.versions import registered_model_name

    rng = np.random.default_rng(0)
    n = 1200
    segment = rng.choice(["gold", "silver", "bronze"], n)
    spend = rng.gamma(2.0, 1000.0, n)
    wide = pd.DataFrame(
        {"cust_no": ids(n), "segment": segment, "monthly_spend": spend, "holder_name": [f"Person {i}" for i in range(n)], "opened": pd.Timestamp("2020-01-01")}
    )
    wide.to_parquet(tmp_path / "crm.parquet")
    high = (spend > 2000) ^ (rng.random(n) < 0.1)
    labels = pd.DataFrame({"cust_no": ids(n), "label": np.where(high, "big", "small"), "label_date": pd.date_range("2026-01-01", periods=n, freq="6h").date})
    labels.to_csv(tmp_path / "labels.csv", index=False)
    tag = byo_tag(
        tmp_path, model={"family": "xgboost", "trials": 2, "timeout_seconds": 60, "search_space": {"max_depth": {"low": 2, "high": 3, "integer": True}}}
    )
    data = build_training_set(make_connection(tmp_path), tmp_path, tag, date(2027, 1, 1), tmp_path / "sets")
    assert data.feature_types == {"segment": "categorical", "monthly_spend": "numeric"}
    client = store["client"]
    result = train_tag(tag, data, client, shipped_slices(data), artifact_location=store["artifacts"], threads=1)
    assert result.metrics["accuracy"] > 0.8
    version = client.get_model_version(registered_model_name("big_spender"), result.version)
    assert json.loads(version.tags["feature_types"]) == data.feature_types
    logged = json.loads(Path(client.download_artifacts(result.run_id, "evaluation/columns.json", str(tmp_path))).read_text())
    assert logged["holder_name"] == {"use": "excluded", "reason": "PII by name (name)"}
    assert logged["opened"]["reason"].startswith("unsupported type TIMESTAMP") and logged["monthly_spend"]["use"] == "numeric"
    model = load_model(client, "big_spender", result.version)
    unseen = pd.DataFrame({"segment": ["platinum", None], "monthly_spend": [5000.0, 10.0]})
    assert model.predict_proba(unseen).shape == (2, 2)


def test_wide_table_without_its_id_column_is_a_named_error(tmp_path):
    pd.DataFrame({"x": [1.0]}).to_parquet(tmp_path / "crm.parquet")
    write_labels(tmp_path)
    with pytest.raises(TrainingDataError, match="has no id column 'cust_no'"):
        build_training_set(make_connection(tmp_path), tmp_path, byo_tag(tmp_path), date(2027, 1, 1), tmp_path / "sets")


def test_training_set_asset_defaults_its_date_and_shows_the_column_audit(tmp_path):
    import dagster as dg

    from tagml.orchestration.resources import WarehouseResource
    from tagml.orchestration.training_assets import build_training_assets

    audited_table(tmp_path)
    frame = write_labels(tmp_path)
    tag = byo_tag(tmp_path)
    catalog = load_catalog(tmp_path / "catalog.yaml")
    warehouse = WarehouseResource(
        raw_dir=str(tmp_path / "raw"), warehouse_dir=str(tmp_path / "wh"), duckdb_path=str(tmp_path / "wh.duckdb"), threads=1, memory_limit="1GB"
    )
    result = dg.materialize(build_training_assets(tag, catalog)[:1], resources={"warehouse": warehouse})
    metadata = result.asset_materializations_for_node(result.get_step_success_events()[0].step_key.split(".")[-1])[0].metadata
    assert metadata["train_as_of"].value == max(frame["label_date"]).isoformat()  # no run config: the newest label
    table = metadata["columns"].value
    assert "| 身份证号 | excluded | PII by name (身份证) |" in table and "| contact | excluded | PII by content (phone number" in table
    assert "| target | excluded | leakage by name (named 'target') |" in table and "| monthly_spend | numeric | inferred from type DOUBLE |" in table
    assert metadata["column_counts"].value == {"numeric": 5, "categorical": 3, "excluded": len(pd.read_parquet(tmp_path / "crm.parquet").columns) - 8}
    assert set(metadata["max_single_feature_auc"].value) == {"column", "auc"}
    assert "x1 |" not in table and "@example.com" not in table and "1300000" not in table
