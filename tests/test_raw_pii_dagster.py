"""Bad raw deliveries carrying PII run through the real Dagster raw ingest job: not one PII value may
reach any file of DAGSTER_HOME (event log database, run storage, compute logs)."""

import shutil
from pathlib import Path

import dagster as dg
import pytest
from conftest import raw_glob

from tagml.core.settings import Settings
from tagml.core.storage import sql_literal
from tagml.features.contract import CUSTOMERS
from tagml.orchestration.definitions import build_definitions
from tagml.orchestration.jobs import RAW_INGEST_JOB

MARKERS = {
    "full_name": "Zmarkername Qiu",
    "phone": "13977712345",
    "national_id": "110101199001019876",
    "address": "77 Zmarkerstreet Road",
}
EMAIL = "zmarker@example.invalid"
DELIVERY = {"ops": {"raw_delivery": {"config": {"delivery_date": "2026-11-05"}}}}


def _bad_row(i: int, extra: str = "") -> str:
    return (
        f"CPII{i:05d},{MARKERS['full_name']},{MARKERS['phone']},{MARKERS['national_id']},{MARKERS['address']},"
        f"1980-01-01,F,single,0,bachelor,employee,east,1,2020-01-01,branch{extra}"
    )


def _customers_csv(con, bank, raw: Path, lines_after: list[str], header: bool = True) -> None:
    """The bank's customers as CSV (other tables stay valid), with `lines_after` appended."""
    path = raw / "customers.csv"
    con.execute(
        f"COPY (SELECT * FROM read_parquet({sql_literal(raw_glob(bank['raw'], 'customers'))}) ORDER BY customer_id) "
        f"TO {sql_literal(path)} (FORMAT CSV, HEADER {'true' if header else 'false'})"
    )
    shutil.rmtree(raw / "customers")
    with path.open("a") as fh:
        fh.write("\n".join(lines_after) + "\n")


def ragged(con, bank, raw):
    _customers_csv(con, bank, raw, [_bad_row(1, f",{EMAIL},EXTRA")])


def headerless(con, bank, raw):
    path = raw / "customers.csv"
    _customers_csv(con, bank, raw, [], header=False)
    path.write_text(_bad_row(2) + "\n" + path.read_text())


def bad_values_on_pii_rows(con, bank, raw):
    names = [c.name for c in CUSTOMERS.columns]
    row = _bad_row(3).split(",")
    row[names.index("region")] = "atlantis"
    _customers_csv(con, bank, raw, [",".join(row), _bad_row(4).replace("1980-01-01", "2090-01-01")])


def garbage_parquet(con, bank, raw):
    shutil.rmtree(raw / "customers")
    (raw / "customers.parquet").write_bytes(("PAR1" + " ".join(MARKERS.values()) + EMAIL).encode() * 50)


CASES = {"ragged_csv": ragged, "headerless_csv": headerless, "bad_values": bad_values_on_pii_rows, "garbage_parquet": garbage_parquet}


@pytest.fixture
def dagster_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


def test_bad_raw_leaves_no_pii_in_dagster_home(con, bank, tmp_path, dagster_home):
    instance = dg.DagsterInstance.get()  # a real SQLite instance under the temporary DAGSTER_HOME
    failures = {}
    for name, build in CASES.items():
        raw = tmp_path / f"raw_{name}"
        shutil.copytree(bank["raw"], raw)
        build(con, bank, raw)
        settings = Settings.from_env({"TAGML_HOME": str(tmp_path / "tagml"), "TAGML_RAW_DIR": str(raw), "DAGSTER_HOME": str(dagster_home)})
        settings.ensure_dirs()
        result = build_definitions(settings).resolve_job_def(RAW_INGEST_JOB).execute_in_process(instance=instance, raise_on_error=False, run_config=DELIVERY)
        assert not result.success, name
        failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
        failures[name] = failure.event_specific_data.error.message
    instance.dispose()

    assert "field_count" in failures["ragged_csv"] and "line" in failures["ragged_csv"]
    assert "header" in failures["headerless_csv"]
    assert "allowed_values" in failures["bad_values"] and "not_after_delivery" in failures["bad_values"]
    assert "readable" in failures["garbage_parquet"]

    files = [p for p in dagster_home.rglob("*") if p.is_file()]
    blobs = {p: p.read_bytes() for p in files}
    # the stores were written and are searched: the failures themselves are in them
    assert any(b"field_count" in blob for blob in blobs.values())
    for path, blob in blobs.items():
        for marker in [*MARKERS.values(), EMAIL]:
            assert marker.encode() not in blob, f"{marker!r} found in {path.relative_to(dagster_home)}"
