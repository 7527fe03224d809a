"""A range of as_of partitions backfilled in ONE Dagster run gives the partitions three nightly runs give,
and does the work the nights share once (one Evidently child process for all the reports).

Real Dagster runs (the nightly job's assets, a partition range run as the backfill daemon launches a
BackfillPolicy.single_run backfill: the range tags), real MLflow, DuckDB and Evidently on a small bank.
customer_features is built by the nightly runs first (its asset is per partition until it takes a range).
"""

from datetime import date

import dagster as dg
import pandas as pd
import pytest

from tagml.core.settings import Settings
from tagml.features.synthetic import BankConfig, generate_bank
from tagml.monitoring.history import DriftHistory
from tagml.monitoring.reevaluation import events_from_result
from tagml.orchestration.definitions import build_definitions
from tagml.orchestration.jobs import NIGHTLY_SCORING_JOB, RAW_INGEST_JOB, TRAIN_ALL_JOB, reevaluation_run_config
from tagml.scoring.refresh import NO_EARLIER_PARTITION
from tagml.scoring.reuse import NO_PREVIOUS, REUSE_OFF
from tagml.scoring.store import ParquetTagStore
from tagml.training.catalog import load_catalog
from tests.conftest import make_connection, write_test_catalog

pytestmark = pytest.mark.slow  # a real Dagster loop on a 3,000-customer bank

TRAINED = date(2026, 8, 31)
NIGHTS = (date(2026, 10, 29), date(2026, 10, 30), date(2026, 10, 31))
RANGE_ASSETS = [dg.AssetKey("customer_tags"), dg.AssetKey("tag_drift"), dg.AssetKey("online_tags")]
RANGE_TAGS = {"dagster/asset_partition_range_start": NIGHTS[0].isoformat(), "dagster/asset_partition_range_end": NIGHTS[-1].isoformat()}
VOLATILE = ["scored_at"]  # when a row was scored: the only column a re-run may change


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    root = tmp_path_factory.mktemp("backfill")
    write_test_catalog(root / "catalog.yaml", ("risk_appetite", "value_tier"))
    env = {"TAGML_HOME": str(root / "home"), "TAGML_CATALOG": str(root / "catalog.yaml"), "TAGML_DRIFT_SAMPLE_ROWS": "500", "TAGML_THREADS": "1"}
    # every tag's report every night, so that the nightly runs and the range do the same Evidently work
    settings = Settings.from_env({**env, "TAGML_DRIFT_REPORT": "always"})
    settings.ensure_dirs()
    generate_bank(BankConfig(customers=3000, months=12, seed=11, drift="market_shock", drift_month="2026-10"), settings.raw_dir)
    defs = build_definitions(settings)
    catalog = load_catalog(settings.catalog_path)
    instance = dg.DagsterInstance.ephemeral()
    assert defs.resolve_job_def(RAW_INGEST_JOB).execute_in_process(instance=instance).success
    train = {"ops": {k: v for t in catalog.model_tags for k, v in reevaluation_run_config(t.name, TRAINED.isoformat())["ops"].items()}}
    assert defs.resolve_job_def(TRAIN_ALL_JOB).execute_in_process(instance=instance, run_config=train).success
    job = defs.resolve_job_def(NIGHTLY_SCORING_JOB)
    # both carry each weekly/monthly tag's inference within its period (the default); the nightly runs also reuse
    # the previous partition's output where they can, the backfill below does not: their equality is the equality
    # of nightly runs and one ranged run through Dagster, carried inferences included
    reuse = {"ops": {"customer_tags": {"config": {"reuse_unchanged": True}}}}
    nightly = {day: job.execute_in_process(instance=instance, partition_key=day.isoformat(), run_config=reuse) for day in NIGHTS}
    assert all(r.success for r in nightly.values())
    store = ParquetTagStore.in_warehouse(settings.warehouse_dir)
    with make_connection(root) as con:
        tags_by_night = {day: _tags(con, store, day) for day in NIGHTS}
        drift_by_night = {day: _drift(con, settings, day) for day in NIGHTS}
    reports = {p: p.stat().st_mtime_ns for p in settings.reports_dir.rglob("*.html")}
    # the backfill: the partitions are removed, then the range is materialized in one run
    for day in NIGHTS:
        for path in (settings.warehouse_dir / "customer_tags" / f"as_of={day}").glob("*.parquet"):
            path.unlink()
    backfill = job.execute_in_process(instance=instance, asset_selection=RANGE_ASSETS, tags=RANGE_TAGS)
    assert backfill.success
    return {
        "settings": settings,
        "instance": instance,
        "nightly": nightly,
        "backfill": backfill,
        "store": store,
        "root": root,
        "catalog": catalog,
        "tags_by_night": tags_by_night,
        "drift_by_night": drift_by_night,
        "reports": reports,
    }


def _tags(con, store: ParquetTagStore, day: date) -> pd.DataFrame:
    frame = con.execute(f"SELECT * EXCLUDE ({', '.join(VOLATILE)}) FROM {store.read_sql(day)} ORDER BY customer_id, tag").df()
    assert len(frame) > 0
    return frame


def _drift(con, settings: Settings, day: date) -> pd.DataFrame:
    summary = DriftHistory(settings.drift_dir).summary(con, day).set_index("tag").sort_index()
    return summary[["model_version", "drifted", "drifted_feature_share", "prediction_psi", "current_rows", "reference_rows"]]


def _materializations(result, asset: str) -> list:
    return [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == asset]


def test_the_range_is_one_run_that_materializes_every_partition(home):
    run = home["backfill"]
    for asset in ("customer_tags", "tag_drift", "online_tags"):
        assert sorted(e.partition for e in _materializations(run, asset)) == [d.isoformat() for d in NIGHTS], asset
    # the nightly runs were three runs, the backfill one
    assert len({r.run_id for r in home["nightly"].values()}) == 3


def test_the_backfilled_partitions_equal_the_nightly_ones(home):
    with make_connection(home["root"]) as con:
        for day in NIGHTS:
            pd.testing.assert_frame_equal(_tags(con, home["store"], day), home["tags_by_night"][day], obj=f"customer_tags {day}")
            pd.testing.assert_frame_equal(_drift(con, home["settings"], day), home["drift_by_night"][day], obj=f"drift {day}")
    # every report was rendered again by the range (none left from the nightly runs)
    assert home["reports"] and all(path.stat().st_mtime_ns > before for path, before in home["reports"].items())


def test_shared_work_once_one_evidently_child_for_the_range(home):
    nightly = [_materializations(r, "tag_drift")[0].materialization.metadata for r in home["nightly"].values()]
    assert [m["evidently_processes"].value for m in nightly] == [1, 1, 1]
    ranged = _materializations(home["backfill"], "tag_drift")
    # one child rendered every tag's report of the three nights
    assert {e.materialization.metadata["evidently_processes"].value for e in ranged} == {1}
    assert sum(len(v) for v in ranged[0].materialization.metadata["reports"].value.values()) == 3 * len(home["catalog"].model_tags)


def test_each_partition_of_the_range_carries_its_own_night_verdicts_for_the_sensor(home):
    for event in _materializations(home["backfill"], "tag_drift"):
        day = date.fromisoformat(event.partition)
        by_tag = event.materialization.metadata["drift_by_tag"].value
        got = {e.tag: e.drifted for e in events_from_result(0, day, by_tag)}
        nightly = _materializations(home["nightly"][day], "tag_drift")[0].materialization.metadata["drift_by_tag"].value
        assert got == {e.tag: e.drifted for e in events_from_result(0, day, nightly)} == home["drift_by_night"][day]["drifted"].to_dict()


def test_the_online_store_ends_on_the_newest_partition(home):
    event = _materializations(home["backfill"], "online_tags")[0]
    assert event.materialization.metadata["as_of"].value == NIGHTS[-1].isoformat()
    assert event.materialization.metadata["refreshed"].value is True


def test_each_night_carries_its_periods_inference_and_reuses_or_says_why_not(home):
    """customer_tags' `refresh` and `reuse` metadata: the first night has nothing to carry or reuse; each later night
    of the same week and month carries every earlier customer's inference and infers only the new customers (whose
    reuse, on a tree champion, splits into reused and rescored rows) or names why it cannot."""
    for position, (day, run) in enumerate(home["nightly"].items()):
        metadata = _materializations(run, "customer_tags")[0].materialization.metadata
        reuse, refresh, customers = metadata["reuse"].value, metadata["refresh"].value, metadata["customers"].value
        models = {t.name for t in home["catalog"].model_tags}
        assert set(reuse) == set(refresh) == models
        for tag in models:
            if position == 0:
                assert reuse[tag] == {"off": NO_PREVIOUS} and refresh[tag]["why"] == NO_EARLIER_PARTITION, (day, tag)
                continue
            carried, inferred = refresh[tag]["carried_rows"], refresh[tag]["inferred_rows"]
            assert carried > 0 and carried + inferred == customers, (day, tag, refresh[tag])
            if "off" in reuse[tag]:
                assert reuse[tag]["off"].startswith("only tree models"), (day, tag, reuse[tag])
            else:
                assert reuse[tag]["reused_rows"] + reuse[tag]["rescored_rows"] == inferred, (day, tag, reuse[tag])
    by_as_of = _materializations(home["backfill"], "customer_tags")[0].materialization.metadata["by_as_of"].value
    models = {t.name for t in home["catalog"].model_tags}
    assert all(night["reuse"] == {tag: {"off": REUSE_OFF} for tag in models} for night in by_as_of.values())  # off by default
    # the range carries from its own earlier nights, as the nightly runs did
    assert all(by_as_of[d.isoformat()]["refresh"][tag]["carried_rows"] > 0 for d in NIGHTS[1:] for tag in models)
