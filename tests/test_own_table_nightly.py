"""Bring-your-own (BYO) tags scored nightly next to the contract tags, with real Dagster runs, MLflow,
DuckDB and Evidently: the shipped catalog plus two tags on a bank's own tables (a binary one on a
static CRM table, a 5-class one on a table of monthly as_of snapshots), built from the session bank's
customers so that ids overlap. Trained on 2026-08-31, scored for 2026-09-30 and 2026-10-31, drift
measured, looked up and exported; then the partition policy (one missing snapshot names its tag,
skip_tags publishes the others) and a BYO-only catalog scored with no raw contract data at all."""

import shutil
from datetime import date

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import yaml

from tagml.cli.lookup import customer_tags as lookup_tags
from tagml.core.settings import Settings
from tagml.monitoring.history import DriftHistory
from tagml.orchestration.definitions import build_definitions
from tagml.orchestration.jobs import NIGHTLY_SCORING_JOB, RAW_INGEST_JOB, TRAIN_ALL_JOB, reevaluate_job_name, reevaluation_run_config
from tagml.orchestration.own_table_assets import own_features_key
from tagml.scoring.sources import own_features_table
from tagml.scoring.store import ParquetTagStore
from tagml.training.catalog import load_catalog
from tests.conftest import make_connection, publish_tags, write_test_catalog

pytestmark = pytest.mark.slow  # five trainings and four nightly runs on the 3,000-customer session bank

TRAINED, BEFORE, AFTER, BYO_ONLY = date(2026, 8, 31), date(2026, 9, 30), date(2026, 10, 31), date(2026, 10, 15)
CONTRACT_TAGS = ("risk_appetite", "life_stage", "churn_90d", "value_tier", "lifecycle_stage")
MONTHS = pd.to_datetime(["2026-05-31", "2026-06-30", "2026-07-31", "2026-08-31", "2026-09-30", "2026-10-31"])
STATIC_CUSTOMERS, MONTHLY_CUSTOMERS, LATE_CUSTOMERS = 2800, 2500, 300  # the late ones appear in the October snapshot only


def _own_tables(ids: np.ndarray, root) -> dict:
    """A static CRM table (with PII columns) + labels file, and a monthly wealth table + labels file."""
    rng = np.random.default_rng(3)
    crm_ids = ids[:STATIC_CUSTOMERS]
    spend = rng.gamma(2.0, 1000.0, len(crm_ids))
    segment = rng.choice(["gold", "silver", "bronze"], len(crm_ids))
    crm = pd.DataFrame({"cust_no": crm_ids, "segment": segment, "monthly_spend": spend, "holder_name": [f"Person {i}" for i in range(len(crm_ids))]})
    crm.to_parquet(root / "crm.parquet")
    # not linear in spend: a band, shifted for gold customers
    big = ((spend > 1500) & (spend < 4000)) | ((segment == "gold") & (spend > 800))
    big ^= rng.random(len(crm_ids)) < 0.08
    labelled = rng.random(len(crm_ids)) < 0.6
    dates = pd.Timestamp("2026-03-01") + pd.to_timedelta(rng.integers(0, 180, len(crm_ids)), unit="D")
    labels = pd.DataFrame({"cust_no": crm_ids, "label": np.where(big, "big", "small"), "label_date": dates.date})[labelled]
    # outcomes of the 2026-09-30 partition, known a month later: realised performance at 2026-10-31
    matured = pd.DataFrame({"cust_no": crm_ids, "label": np.where(big, "big", "small"), "label_date": BEFORE})[~labelled]
    pd.concat([labels, matured]).to_csv(root / "crm_labels.csv", index=False)

    frames = []
    base = rng.normal(0, 1, MONTHLY_CUSTOMERS + LATE_CUSTOMERS)
    channel = rng.choice(["app", "branch", "web"], len(base))
    for k, month in enumerate(MONTHS):
        present = len(base) if k == len(MONTHS) - 1 else MONTHLY_CUSTOMERS
        score = base[:present] + 0.05 * k + rng.normal(0, 0.2, present)
        frames.append(pd.DataFrame({"customer_id": ids[:present], "as_of": month, "wealth_score": score, "channel": channel[:present]}))
    wealth = pd.concat(frames, ignore_index=True)
    wealth.to_parquet(root / "wealth.parquet")
    # five bands of the score, reversed for branch customers (trees find it, a linear model does not)
    signed = np.where(wealth["channel"] == "branch", -wealth["wealth_score"], wealth["wealth_score"])
    band = np.digitize(signed, [-0.85, -0.25, 0.25, 0.85])
    # one label in eight recorded a band off: without noise the tag is learnt perfectly, which the gate refuses as a leak
    band = np.clip(band + np.where(rng.random(len(band)) < 0.125, rng.choice([-1, 1], len(band)), 0), 0, 4)
    wealth["label"] = np.array(["W1", "W2", "W3", "W4", "W5"])[band]
    known = wealth[(wealth["as_of"] <= pd.Timestamp(TRAINED)) & (rng.random(len(wealth)) < 0.35)]
    labels = known.assign(label_date=known["as_of"].dt.date)[["customer_id", "label", "label_date"]]
    labels.to_parquet(root / "wealth_labels.parquet")
    return {
        "crm": root / "crm.parquet",
        "wealth": root / "wealth.parquet",
        "crm_ids": crm_ids,
        "late": ids[MONTHLY_CUSTOMERS : MONTHLY_CUSTOMERS + LATE_CUSTOMERS],
    }


def _byo_entries(root) -> list[dict]:
    model = {"family": "xgboost", "trials": 1, "timeout_seconds": 60}
    promotion = {"max_calibration_error": 0.5, "slice_floor": 0.0}
    common = {"kind": "model", "owner": "crm", "model": model, "promotion": {"metric": "accuracy", **promotion}, "split": {"method": "stratified"}}
    return [
        {
            **common,
            "name": "big_spender",
            "description": "From the CRM's own customer table.",
            "classes": ["small", "big"],
            "label": {"feature_source": {"path": str(root / "crm.parquet"), "id_column": "cust_no", "labels_path": str(root / "crm_labels.csv")}},
            "drift": {"label_delay_days": (AFTER - BEFORE).days},
        },
        {
            **common,
            "name": "wealth_band",
            "description": "From the wealth team's monthly snapshots.",
            "classes": ["W1", "W2", "W3", "W4", "W5"],
            "label": {"feature_source": {"path": str(root / "wealth.parquet"), "labels_path": str(root / "wealth_labels.parquet")}},
        },
    ]


def _train_config(catalog) -> dict:
    return {"ops": {k: v for t in catalog.model_tags for k, v in reevaluation_run_config(t.name, TRAINED.isoformat())["ops"].items()}}


@pytest.fixture(scope="module")
def nightly(bank, tmp_path_factory):
    root = tmp_path_factory.mktemp("own_table_nightly")
    catalog_path = write_test_catalog(root / "catalog.yaml", CONTRACT_TAGS)
    entries = yaml.safe_load(catalog_path.read_text())
    entries["tags"] += _byo_entries(root)
    catalog_path.write_text(yaml.safe_dump(entries))
    env = {"TAGML_HOME": str(root / "home"), "TAGML_CATALOG": str(catalog_path), "TAGML_DRIFT_SAMPLE_ROWS": "500", "TAGML_THREADS": "1"}
    settings = Settings.from_env(env)
    settings.ensure_dirs()
    shutil.copytree(bank["raw"], settings.raw_dir, dirs_exist_ok=True)
    ids = pd.read_parquet(bank["raw"] / "customers", columns=["customer_id"])["customer_id"].sort_values().to_numpy()
    tables = _own_tables(ids, root)
    defs = build_definitions(settings)
    catalog = load_catalog(catalog_path)
    instance = dg.DagsterInstance.ephemeral()
    runs = {"ingest": defs.resolve_job_def(RAW_INGEST_JOB).execute_in_process(instance=instance)}
    runs["train"] = defs.resolve_job_def(TRAIN_ALL_JOB).execute_in_process(instance=instance, run_config=_train_config(catalog))
    for day, report in ((BEFORE, True), (AFTER, False)):  # one Evidently report per tag is enough here (~10 s each)
        config = {"ops": {"tag_drift": {"config": {"report": report}}}}
        runs[day] = defs.resolve_job_def(NIGHTLY_SCORING_JOB).execute_in_process(instance=instance, partition_key=day.isoformat(), run_config=config)
    return {"root": root, "settings": settings, "defs": defs, "catalog": catalog, "instance": instance, "runs": runs, "tables": tables, "env": env}


def _partition(nightly, day: date) -> pd.DataFrame:
    return pd.read_parquet(ParquetTagStore.in_warehouse(nightly["settings"].warehouse_dir).partition_path(day))


def _materialization(result, key: str):
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == key]
    return event.materialization


def test_byo_tags_are_scored_from_their_own_tables_next_to_the_contract_tags(nightly):
    runs = nightly["runs"]
    assert runs["train"].success and runs[BEFORE].success and runs[AFTER].success
    for day, monthly in ((BEFORE, MONTHLY_CUSTOMERS), (AFTER, MONTHLY_CUSTOMERS + LATE_CUSTOMERS)):
        customers = len(pd.read_parquet(nightly["settings"].warehouse_dir / "customer_features" / f"as_of={day}" / "data.parquet", columns=["customer_id"]))
        tags = _partition(nightly, day)
        per_tag = tags.groupby("tag")["customer_id"].nunique().to_dict()
        # each tag covers the customers of ITS source: the contract's, the CRM table's, the wealth snapshot's of the day
        assert per_tag == {**dict.fromkeys(CONTRACT_TAGS, customers), "big_spender": STATIC_CUSTOMERS, "wealth_band": monthly}
        byo = tags[tags["tag"].isin(["big_spender", "wealth_band"])]
        assert byo["model_version"].notna().all() and set(byo["producer"]) == {"tagml-big_spender/1", "tagml-wealth_band/1"}
        assert (byo[byo["tag"] == "big_spender"]["source"] == "observed").any()  # the labels file's observed labels win
        [coverage] = [c for c in runs[day].get_asset_check_evaluations() if c.check_name == "coverage"]
        assert coverage.passed and coverage.metadata["expected_rows"].value == len(tags)
    # point in time: a customer first in the October snapshot is tagged from October only
    assert set(nightly["tables"]["late"]) <= set(_partition(nightly, AFTER).query("tag == 'wealth_band'")["customer_id"])
    assert not set(nightly["tables"]["late"]) & set(_partition(nightly, BEFORE).query("tag == 'wealth_band'")["customer_id"])


def test_own_snapshots_hold_the_champions_features_only(nightly):
    warehouse = nightly["settings"].warehouse_dir
    crm = pd.read_parquet(own_features_table(warehouse, "big_spender").path(BEFORE))
    assert list(crm.columns) == ["customer_id", "as_of", "segment", "monthly_spend"]  # never holder_name
    wealth = pd.read_parquet(own_features_table(warehouse, "wealth_band").path(AFTER))
    assert list(wealth.columns) == ["customer_id", "as_of", "wealth_score", "channel"] and len(wealth) == MONTHLY_CUSTOMERS + LATE_CUSTOMERS
    meta = _materialization(nightly["runs"][BEFORE], "big_spender/own_features").metadata
    assert meta["champion"].value == "tagml-big_spender/1" and meta["features"].value == ["segment", "monthly_spend"]
    assert "Person" not in str(meta)


def test_drift_history_has_rows_for_the_byo_tags(nightly):
    with make_connection(nightly["root"]) as con:
        for day in (BEFORE, AFTER):
            summary = DriftHistory(nightly["settings"].drift_dir).summary(con, day).set_index("tag")
            assert {"big_spender", "wealth_band", "risk_appetite"} <= set(summary.index)
            assert summary.loc["wealth_band", "n_features"] == 2 and summary.loc["wealth_band", "reference_as_of"].date() == TRAINED
    # realised performance of the BYO tag from its own labels file: the 2026-09-30 outcomes against that partition
    assert summary.loc["big_spender", "performance_status"] == "measured" and summary.loc["big_spender", "performance_labels"] > 500
    # the static table was not snapshotted on the training date: its reference was built into the drift cache
    assert list((nightly["settings"].drift_dir / "reference" / "own_features" / "big_spender").glob("v1/as_of=2026-08-31/data.parquet"))
    checks = {c.check_name: c for c in nightly["runs"][AFTER].get_asset_check_evaluations()}
    assert "wealth_band_drift" in checks and "big_spender_drift" in checks


def test_lookup_and_export_show_byo_tags_next_to_the_contract_tags(nightly, tmp_path):
    customer = str(nightly["tables"]["crm_ids"][0])
    publish_tags(nightly["settings"])
    result = lookup_tags(nightly["settings"], customer, BEFORE, lineage=True)
    by_tag = {t["tag"]: t for t in result["tags"]}
    assert set(by_tag) == {*CONTRACT_TAGS, "big_spender", "wealth_band"}
    assert by_tag["big_spender"]["model_version"] == "1" and by_tag["big_spender"]["lineage"]
    assert set(by_tag["wealth_band"]["probabilities"]) == {"W1", "W2", "W3", "W4", "W5"}
    store = ParquetTagStore.in_warehouse(nightly["settings"].warehouse_dir)
    with make_connection(tmp_path) as con:
        rows = store.export(con, BEFORE, "csv", tmp_path / "tags.csv")
    exported = pd.read_csv(tmp_path / "tags.csv")
    assert rows == len(exported) and {"big_spender", "wealth_band"} <= set(exported["tag"])


def test_a_missing_own_snapshot_names_its_tag_and_skip_tags_publishes_the_others(nightly):
    defs, instance, settings = nightly["defs"], nightly["instance"], nightly["settings"]
    published = ParquetTagStore.in_warehouse(settings.warehouse_dir).partition_path(AFTER)
    before = published.read_bytes()
    job = defs.resolve_job_def(NIGHTLY_SCORING_JOB)
    # the bank's table gone missing: its own_features step fails by name and keeps the snapshot it had
    snapshot = own_features_table(settings.warehouse_dir, "wealth_band").path(AFTER)
    kept = snapshot.read_bytes()
    table = nightly["tables"]["wealth"]
    table.rename(table.with_suffix(".away"))
    try:
        gone = job.execute_in_process(
            instance=instance, partition_key=AFTER.isoformat(), asset_selection=[own_features_key("wealth_band")], raise_on_error=False
        )
    finally:
        table.with_suffix(".away").rename(table)
    [failure] = [e for e in gone.all_events if e.event_type_value == "STEP_FAILURE"]
    assert f"tag 'wealth_band': feature table {table} does not exist" in failure.event_specific_data.error.message
    assert snapshot.read_bytes() == kept
    snapshot.unlink()  # as if that table had never arrived for the partition
    failed = job.execute_in_process(instance=instance, partition_key=AFTER.isoformat(), asset_selection=[dg.AssetKey("customer_tags")], raise_on_error=False)
    assert not failed.success
    [failure] = [e for e in failed.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.event_specific_data.error.message
    assert "1 tag(s) cannot be scored" in message and "tag 'wealth_band': no own feature snapshot for as_of 2026-10-31" in message
    assert "materialize wealth_band/own_features first" in message and "big_spender" not in message
    assert published.read_bytes() == before

    config = {"ops": {"customer_tags": {"config": {"skip_tags": ["wealth_band"], "skip_reason": "wealth table late (INC-42)"}}}}
    skipped = job.execute_in_process(instance=instance, partition_key=AFTER.isoformat(), asset_selection=[dg.AssetKey("customer_tags")], run_config=config)
    meta = _materialization(skipped, "customer_tags").metadata
    assert meta["skipped_tags"].value == {"wealth_band": "wealth table late (INC-42)"}
    tags = _partition(nightly, AFTER)
    assert "wealth_band" not in set(tags["tag"]) and {"big_spender", *CONTRACT_TAGS} <= set(tags["tag"])
    [coverage] = [c for c in skipped.get_asset_check_evaluations() if c.check_name == "coverage"]
    assert coverage.passed and coverage.metadata["tags"].value == len(CONTRACT_TAGS) + 1


def test_the_reevaluation_job_of_a_byo_tag_retakes_its_own_snapshot(nightly):
    job = nightly["defs"].resolve_job_def(reevaluate_job_name("wealth_band"))
    keys = job.asset_layer.selected_asset_keys
    assert own_features_key("wealth_band") in keys and dg.AssetKey("customer_tags") in keys


def test_a_byo_only_catalog_scores_without_any_raw_contract_data(nightly):
    """Same registry and home, a catalog of the two BYO tags only, and neither raw files nor staged tables."""
    root, settings = nightly["root"], nightly["settings"]
    byo_catalog = root / "byo.yaml"
    byo_catalog.write_text(yaml.safe_dump({"version": 1, "tags": _byo_entries(root)}))
    empty_raw = root / "no_raw"
    empty_raw.mkdir()
    staged = settings.warehouse_dir / "raw"
    staged.rename(root / "staged_away")
    try:
        byo = Settings.from_env({**nightly["env"], "TAGML_CATALOG": str(byo_catalog), "TAGML_RAW_DIR": str(empty_raw)})
        defs = build_definitions(byo)
        job = defs.resolve_job_def(NIGHTLY_SCORING_JOB)
        assert not {k.to_user_string() for k in job.asset_layer.selected_asset_keys} & {"customer_features", "raw_customers"}
        config = {"ops": {"tag_drift": {"config": {"report": False}}}}
        run = job.execute_in_process(instance=dg.DagsterInstance.ephemeral(), partition_key=BYO_ONLY.isoformat(), run_config=config)
    finally:
        (root / "staged_away").rename(staged)
    assert run.success
    tags = _partition(nightly, BYO_ONLY)
    assert tags.groupby("tag")["customer_id"].nunique().to_dict() == {"big_spender": STATIC_CUSTOMERS, "wealth_band": MONTHLY_CUSTOMERS}
    assert not (settings.warehouse_dir / "customer_features" / f"as_of={BYO_ONLY}").exists()


def test_own_features_backfill_a_range_in_one_run(nightly):
    """A range of nights of a BYO snapshot as ONE run (BackfillPolicy.single_run): every night's file as a
    nightly run writes it, the champion resolved once, the metadata keyed by as_of."""
    defs, instance, settings = nightly["defs"], nightly["instance"], nightly["settings"]
    table = own_features_table(settings.warehouse_dir, "wealth_band")
    job = defs.resolve_job_def(NIGHTLY_SCORING_JOB)
    single = job.execute_in_process(instance=instance, partition_key=AFTER.isoformat(), asset_selection=[own_features_key("wealth_band")])
    assert single.success
    nightly_file = pd.read_parquet(table.path(AFTER))  # a nightly run's snapshot of 2026-10-31
    nights = [date(2026, 10, 29), date(2026, 10, 30), AFTER]
    tags = {"dagster/asset_partition_range_start": nights[0].isoformat(), "dagster/asset_partition_range_end": nights[-1].isoformat()}
    run = job.execute_in_process(instance=instance, asset_selection=[own_features_key("wealth_band")], tags=tags)
    assert run.success
    materializations = [e for e in run.get_asset_materialization_events() if e.asset_key == own_features_key("wealth_band")]
    assert sorted(e.partition for e in materializations) == [n.isoformat() for n in nights]
    assert len({e.step_key for e in materializations}) == 1  # one step for the whole range
    rows = materializations[0].materialization.metadata["rows_by_as_of"].value
    # the monthly table's latest snapshot on or before each night: 2026-09-30's customers, then October's
    assert rows == {"2026-10-29": MONTHLY_CUSTOMERS, "2026-10-30": MONTHLY_CUSTOMERS, "2026-10-31": MONTHLY_CUSTOMERS + LATE_CUSTOMERS}
    pd.testing.assert_frame_equal(pd.read_parquet(table.path(AFTER)), nightly_file)
    for night in nights[:2]:
        assert len(pd.read_parquet(table.path(night))) == MONTHLY_CUSTOMERS
