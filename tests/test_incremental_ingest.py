"""Staging is proportional to what is new: a night's dated files are validated and written, every other staged file
is the previous generation's (same inode); a changed or overlapping period is refused unless restated; any failure
leaves the previous generation current and byte-identical."""

import os
import shutil
from datetime import date, timedelta
from pathlib import Path

import dagster as dg
import pytest

from tagml.core.settings import Settings
from tagml.core.storage import sql_literal, staged_files, staged_relation
from tagml.features import delivery as delivery_module
from tagml.features.contract import RAW_TABLES
from tagml.features.delivery import current_generation, generations_dir, stage_delivery
from tagml.features.manifest import MANIFEST, read_manifest
from tagml.features.raw import ContractError
from tagml.features.synthetic import BankConfig, generate_bank
from tagml.features.synthetic.deliveries import split_deliveries
from tagml.orchestration.definitions import build_definitions
from tagml.orchestration.jobs import RAW_INGEST_JOB

LAST = date(2026, 10, 31)  # the generated bank's last day (months end at the generator's 2026-10)
FIRST_NIGHT = date(2026, 10, 28)
EVENT_TABLES = ("transactions", "digital_events", "balances", "holdings")


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """A small generated bank, whole tables (2 months)."""
    out = tmp_path_factory.mktemp("incremental") / "generated"
    generate_bank(BankConfig(customers=800, months=2, seed=11), out)
    return out


@pytest.fixture
def night(generated, tmp_path):
    """A raw directory delivered through FIRST_NIGHT and staged once; `advance(day)` delivers and stages one more night."""
    raw, staged = tmp_path / "raw", tmp_path / "warehouse" / "raw"
    split_deliveries(generated, raw, FIRST_NIGHT)

    def stage(day: date, **kw):
        from tagml.core.storage import connect

        con = connect(threads=2, memory_limit="1GB")
        try:
            return stage_delivery(con, raw, staged, day + timedelta(days=1), **kw)
        finally:
            con.close()

    def advance(day: date, **kw):
        split_deliveries(generated, raw, day, days=[day])
        return stage(day, **kw)

    first = stage(FIRST_NIGHT)
    return {"raw": raw, "staged": staged, "stage": stage, "advance": advance, "first": first}


def file_state(staged: Path) -> dict[str, tuple[int, bytes]]:
    """Every staged file -> (inode, bytes) of the current generation."""
    generation = current_generation(staged)
    return {f.relative_to(generation).as_posix(): (f.stat().st_ino, f.read_bytes()) for spec in RAW_TABLES for f in staged_files(generation, spec.name)}


def rows(con, staged: Path, table: str) -> list[tuple]:
    return sorted(con.execute(f"SELECT * FROM {staged_relation(current_generation(staged), table)}").fetchall(), key=repr)


def rewrite_day(con, path: Path, sql_tail: str) -> None:
    """Replace a dated raw file by its rows changed by `sql_tail` (a SELECT list over `src`)."""
    tmp = path.with_name(".rewrite.parquet")
    con.execute(f"COPY (SELECT {sql_tail} FROM read_parquet({sql_literal(path)}) AS src) TO {sql_literal(tmp)} (FORMAT PARQUET)")
    os.replace(tmp, path)


def test_the_second_night_validates_and_writes_only_the_new_day(night):
    staged, before = night["staged"], file_state(night["staged"])
    day = FIRST_NIGHT + timedelta(days=1)
    result = night["advance"](day)
    validated = {t: i.validated for t, i in result.ingest.items() if i.validated}
    assert validated["transactions"] == (f"transactions/{day}.parquet",)
    assert validated["digital_events"] == (f"digital_events/{day}.parquet",)
    assert "balances" not in validated and "holdings" not in validated  # no month end on that day: month-end history not re-read
    assert result.changed_periods == {"transactions": [day], "digital_events": [day], "balances": [], "holdings": []}
    assert result.ingest["transactions"].skipped == len([k for k in before if k.startswith("transactions/")])
    after = file_state(staged)
    assert set(after) == set(before) | {f"transactions/{day}.parquet", f"digital_events/{day}.parquet"}
    for name, (inode, content) in before.items():
        if name.startswith(EVENT_TABLES):  # history: the same file, linked (snapshot tables may have changed that night)
            assert after[name] == (inode, content), name
    manifest = read_manifest(current_generation(staged))
    entry = manifest["inputs"][f"transactions/{day}.parquet"]
    assert entry["period"] == day.isoformat() and entry["rows"] == result.ingest["transactions"].rows_new > 0 and len(entry["sha256"]) == 64


def test_nothing_new_is_skipped_without_rehashing_and_full_rehashes(night):
    again = night["stage"](FIRST_NIGHT)
    assert all(not i.validated for i in again.ingest.values())
    assert all(i.hashed == 0 for i in again.ingest.values())  # size and mtime_ns matched the manifest
    assert all(days == [] for days in again.changed_periods.values())
    full = night["stage"](FIRST_NIGHT, full=True)
    assert full.ingest["transactions"].hashed == len(full.ingest["transactions"].validated) > 20
    assert all(days == [] for days in full.changed_periods.values())  # re-validated, and the same rows: nothing changed


def test_incremental_nights_equal_one_full_staging_of_the_same_data(night, generated, tmp_path, con):
    for offset in range(1, 4):  # through the month end: balances get a new period too
        result = night["advance"](FIRST_NIGHT + timedelta(days=offset))
    assert result.changed_periods["balances"] == [LAST]
    raw_full, staged_full = tmp_path / "raw_full", tmp_path / "full" / "raw"
    split_deliveries(generated, raw_full, LAST)
    stage_delivery(con, raw_full, staged_full, LAST + timedelta(days=1))
    for spec in RAW_TABLES:
        assert rows(con, night["staged"], spec.name) == rows(con, staged_full, spec.name), spec.name
    assert len(staged_files(current_generation(night["staged"]), "transactions")) == len(staged_files(current_generation(staged_full), "transactions"))


def test_a_changed_staged_day_is_refused_unless_restated_and_then_replaces_exactly_it(night, con):
    raw, staged = night["raw"], night["staged"]
    day = date(2026, 10, 10)
    path = raw / "transactions" / f"{day}.parquet"
    rewrite_day(con, path, "* REPLACE (amount * 2 AS amount)")
    before, generation = file_state(staged), current_generation(staged)
    with pytest.raises(ContractError) as info:
        night["stage"](FIRST_NIGHT)
    (violation,) = info.value.violations
    assert (violation.table, violation.rule) == ("transactions", "changed_delivery")
    assert f"transactions/{day}.parquet" in violation.detail and f"restate=[{day}]" in violation.detail
    assert file_state(staged) == before and current_generation(staged) == generation

    result = night["stage"](FIRST_NIGHT, restate=[day.isoformat()])
    assert result.changed_periods["transactions"] == [day] and result.ingest["transactions"].restated == (day,)
    assert result.changed_periods["digital_events"] == []
    after = file_state(staged)
    name = f"transactions/{day}.parquet"
    assert after[name][0] != before[name][0]
    assert con.execute(f"SELECT sum(amount) FROM read_parquet({sql_literal(current_generation(staged) / name)})").fetchone()[0] == pytest.approx(
        2 * con.execute(f"SELECT sum(amount) FROM read_parquet({sql_literal(generation / name)})").fetchone()[0]
    )
    assert {k: v for k, v in after.items() if k.startswith("transactions/") and k != name} == {
        k: v for k, v in before.items() if k.startswith("transactions/") and k != name
    }
    # a restatement of a period nothing was delivered for is named, not ignored
    with pytest.raises(ContractError, match="restate lists 2026-01-01"):
        night["stage"](FIRST_NIGHT, restate=["2026-01-01"])


def test_a_new_file_for_a_staged_period_is_an_overlap(night, con):
    raw, staged = night["raw"], night["staged"]
    day = date(2026, 10, 12)
    parquet = raw / "digital_events" / f"{day}.parquet"
    con.execute(f"COPY (SELECT * FROM read_parquet({sql_literal(parquet)})) TO {sql_literal(parquet.with_suffix('.csv'))} (FORMAT CSV, HEADER)")
    parquet.unlink()
    before = file_state(staged)
    with pytest.raises(ContractError) as info:
        night["stage"](FIRST_NIGHT)
    assert [(v.table, v.rule) for v in info.value.violations] == [("digital_events", "overlap")]
    assert f"digital_events/{day}.csv" in info.value.violations[0].detail
    assert file_state(staged) == before
    # the same rows again, restated from the CSV: accepted; the period's rows did not change, so it is not a changed period
    result = night["stage"](FIRST_NIGHT, restate=[day])
    assert result.ingest["digital_events"].restated == (day,) and result.changed_periods["digital_events"] == []
    assert file_state(staged)[f"digital_events/{day}.parquet"] == before[f"digital_events/{day}.parquet"]


def test_a_late_new_day_before_the_newest_staged_day_is_allowed(generated, tmp_path, con):
    raw, staged = tmp_path / "raw", tmp_path / "warehouse" / "raw"
    split_deliveries(generated, raw, FIRST_NIGHT)
    late = raw / "transactions" / "2026-10-03.parquet"
    held = tmp_path / "held.parquet"
    shutil.move(late, held)
    stage_delivery(con, raw, staged, FIRST_NIGHT + timedelta(days=1))
    shutil.move(held, late)
    arrived = stage_delivery(con, raw, staged, FIRST_NIGHT + timedelta(days=1))
    assert arrived.changed_periods["transactions"] == [date(2026, 10, 3)]
    assert arrived.ingest["transactions"].validated == ("transactions/2026-10-03.parquet",)


def new_day(night, generated) -> Path:
    """Deliver the next night's files (not yet staged) and return its transactions file."""
    day = FIRST_NIGHT + timedelta(days=1)
    split_deliveries(generated, night["raw"], day, days=[day])
    return night["raw"] / "transactions" / f"{day}.parquet"


def assert_unchanged(night, before, generation) -> None:
    staged = night["staged"]
    assert file_state(staged) == before and current_generation(staged) == generation
    assert [p.name for p in generations_dir(staged).iterdir() if p.name.startswith(".building")] == []


def test_an_unknown_customer_in_a_new_day_is_named_and_nothing_changes(night, generated, con):
    path = new_day(night, generated)
    n = con.execute(f"SELECT count(*) FROM read_parquet({sql_literal(path)})").fetchone()[0]
    first = f"(SELECT min(txn_id) FROM read_parquet({sql_literal(path)}))"
    rewrite_day(con, path, f"* REPLACE (CASE WHEN txn_id = {first} THEN 'CZZ-UNKNOWN' ELSE customer_id END AS customer_id)")
    before, generation = file_state(night["staged"]), current_generation(night["staged"])
    with pytest.raises(ContractError) as info:
        night["stage"](FIRST_NIGHT + timedelta(days=1))
    found = {(v.table, v.column, v.rule): v.n_rows for v in info.value.violations}
    assert found == {("transactions", "customer_id", "known_customer"): 1}, found
    assert n > 1
    assert_unchanged(night, before, generation)


def test_rows_outside_a_dated_files_period_name_the_file_column_and_count(night, generated, con):
    path = new_day(night, generated)
    n = con.execute(f"SELECT count(*) FROM read_parquet({sql_literal(path)})").fetchone()[0]
    rewrite_day(con, path, "* REPLACE (txn_ts - INTERVAL 1 DAY AS txn_ts)")
    before, generation = file_state(night["staged"]), current_generation(night["staged"])
    with pytest.raises(ContractError) as info:
        night["stage"](FIRST_NIGHT + timedelta(days=1))
    (violation,) = info.value.violations
    assert (violation.table, violation.column, violation.rule, violation.n_rows) == ("transactions", "txn_ts", "in_period", n)
    assert path.name in violation.detail
    assert_unchanged(night, before, generation)


def test_a_corrupt_new_file_fails_and_the_previous_generation_stays_current(night, generated):
    path = new_day(night, generated)
    path.write_bytes(b"PAR1 not really parquet " * 40)
    before, generation = file_state(night["staged"]), current_generation(night["staged"])
    with pytest.raises(ContractError) as info:
        night["stage"](FIRST_NIGHT + timedelta(days=1))
    assert {(v.table, v.rule) for v in info.value.violations} == {("transactions", "readable")}
    assert_unchanged(night, before, generation)


def test_a_crash_while_writing_leaves_the_previous_generation_current(night, generated, monkeypatch):
    new_day(night, generated)
    real = delivery_module.write_period_files
    calls = []

    def crash_on_second(*args, **kw):
        calls.append(1)
        written = real(*args, **kw)
        if len(calls) == 2:  # transactions written into the generation being built, then the process 'dies'
            raise RuntimeError("disk full (injected)")
        return written

    monkeypatch.setattr(delivery_module, "write_period_files", crash_on_second)
    before, generation = file_state(night["staged"]), current_generation(night["staged"])
    with pytest.raises(RuntimeError, match="injected"):
        night["stage"](FIRST_NIGHT + timedelta(days=1))
    assert len(calls) == 2
    assert_unchanged(night, before, generation)
    monkeypatch.undo()
    result = night["stage"](FIRST_NIGHT + timedelta(days=1))  # the next run stages the day
    assert result.changed_periods["transactions"] == [FIRST_NIGHT + timedelta(days=1)]


@pytest.mark.slow
def test_the_dagster_raw_delivery_restates_and_reports_what_it_staged(generated, tmp_path, monkeypatch, con):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    raw = tmp_path / "raw"
    split_deliveries(generated, raw, FIRST_NIGHT)
    settings = Settings.from_env({"TAGML_HOME": str(tmp_path / "tagml"), "TAGML_RAW_DIR": str(raw), "DAGSTER_HOME": str(home)})
    settings.ensure_dirs()
    job = build_definitions(settings).resolve_job_def(RAW_INGEST_JOB)
    instance = dg.DagsterInstance.get()
    config = {"delivery_date": (FIRST_NIGHT + timedelta(days=1)).isoformat()}
    assert job.execute_in_process(instance=instance, run_config={"ops": {"raw_delivery": {"config": config}}}).success
    day = date(2026, 10, 20)
    rewrite_day(con, raw / "transactions" / f"{day}.parquet", "* REPLACE (amount + 1 AS amount)")
    refused = job.execute_in_process(instance=instance, raise_on_error=False, run_config={"ops": {"raw_delivery": {"config": config}}})
    assert not refused.success
    result = job.execute_in_process(instance=instance, run_config={"ops": {"raw_delivery": {"config": {**config, "restate": [day.isoformat()]}}}})
    meta = {m.asset_key.to_user_string(): m.metadata for m in result.asset_materializations_for_node("raw_delivery")}
    instance.dispose()
    txn = meta["raw_transactions"]
    assert txn["files_staged"].value == 1 and txn["periods_restated"].value == day.isoformat() and txn["changed_periods"].value == day.isoformat()
    assert txn["files_skipped"].value > 20 and txn["rows_new"].value > 0
    assert meta["raw_customers"]["carried_over"].value is True
    assert (current_generation(settings.warehouse_dir / "raw") / MANIFEST).is_file()
