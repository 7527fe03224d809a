"""The feature snapshot on Spark equals DuckDB's: the same query text, the same stored file.

Integers, dates and categoricals are compared exactly; doubles within 1e-9 relative, because sums of
doubles depend on the order rows are added in (DuckDB's own parallel sums differ run to run in the
last bit), and a null in one engine is a null in the other.
"""

import shutil
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import make_connection

from tagml.core.files import CorruptFileError
from tagml.features.customer_features import build_customer_features
from tagml.features.delivery import current_generation
from tagml.features.dictionary import FEATURE_NAMES, KEY_COLUMNS
from tagml.features.spark_features import build_customer_features_spark

pytestmark = [pytest.mark.spark, pytest.mark.slow]

AS_OF_DATES = [date(2026, 6, 30), date(2026, 6, 15), date(2026, 2, 28), date(2026, 4, 30), date(2026, 10, 31)]
RELATIVE = 1e-9


@pytest.fixture(scope="module", params=AS_OF_DATES, ids=[d.isoformat() for d in AS_OF_DATES])
def both_engines(request, spark, bank, tmp_path_factory):
    as_of = request.param
    out = tmp_path_factory.mktemp(f"features_{as_of}")
    con = make_connection(out)
    try:
        duck_rows = build_customer_features(con, bank["staged"], as_of, out / "duckdb" / "data.parquet")
    finally:
        con.close()
    spark_rows = build_customer_features_spark(spark, bank["staged"], as_of, out / "spark" / "data.parquet")
    assert spark_rows == duck_rows
    return out


def _differing(duck: pa.ChunkedArray, other: pa.ChunkedArray) -> int:
    """Rows where the two columns differ: beyond RELATIVE for doubles, at all otherwise (nulls must match)."""
    if not pa.types.is_floating(duck.type):
        same = pc.or_(pc.fill_null(pc.equal(duck, other), False), pc.and_(pc.is_null(duck), pc.is_null(other)))
        return int(pc.sum(pc.invert(same)).as_py() or 0)
    a, b = duck.to_numpy(zero_copy_only=False), other.to_numpy(zero_copy_only=False)
    both_null = np.isnan(a) & np.isnan(b)
    close = np.isclose(a, b, rtol=RELATIVE, atol=0.0) | both_null
    return int((~close).sum())


def test_spark_writes_duckdbs_snapshot(both_engines):
    duck = pq.read_table(both_engines / "duckdb" / "data.parquet")
    other = pq.read_table(both_engines / "spark" / "data.parquet")
    assert other.column_names == list(KEY_COLUMNS) + list(FEATURE_NAMES) == duck.column_names
    assert [f.type for f in other.schema] == [f.type for f in duck.schema], "one stored schema, whichever engine wrote it"
    assert other.column("customer_id").equals(duck.column("customer_id")), "rows in customer_id order, as DuckDB writes them"
    differing = {name: n for name in FEATURE_NAMES if (n := _differing(duck.column(name), other.column(name)))}
    assert differing == {}, f"features differing between DuckDB and Spark (rows): {differing}"
    assert sorted(p.name for p in (both_engines / "spark").iterdir()) == ["data.parquet"], "the Spark parts were removed"


def test_the_engines_agree_on_what_is_null(both_engines):
    duck = pq.read_table(both_engines / "duckdb" / "data.parquet")
    other = pq.read_table(both_engines / "spark" / "data.parquet")
    assert {n: duck.column(n).null_count for n in FEATURE_NAMES} == {n: other.column(n).null_count for n in FEATURE_NAMES}


def _copy_staged(bank, tmp_path: Path) -> Path:
    staged = tmp_path / "staged"
    shutil.copytree(current_generation(bank["staged"]), staged)
    return staged


def _old_target(tmp_path: Path) -> tuple[Path, bytes]:
    target = tmp_path / "features" / "as_of=2026-06-30" / "data.parquet"
    target.parent.mkdir(parents=True)
    pq.write_table(pa.table({"customer_id": ["old"]}), target)
    return target, target.read_bytes()


def test_a_missing_staged_table_is_named_and_leaves_the_old_snapshot(spark, bank, tmp_path):
    staged = _copy_staged(bank, tmp_path)
    (staged / "loans.parquet").unlink()
    target, before = _old_target(tmp_path)
    with pytest.raises(CorruptFileError, match=r"loans\.parquet.*stage loans again"):
        build_customer_features_spark(spark, staged, date(2026, 6, 30), target)
    assert target.read_bytes() == before
    assert [p.name for p in target.parent.iterdir()] == ["data.parquet"]


def test_a_failing_spark_job_leaves_the_old_snapshot_and_no_temporaries(spark, bank, tmp_path):
    staged = _copy_staged(bank, tmp_path)
    customers = pq.read_table(staged / "customers.parquet")
    # a date column stored as text: DuckDB's schema query binds it, Spark's job fails casting a value
    onboarding = pc.cast(customers.column("onboarding_date"), pa.string()).to_pylist()
    onboarding[0] = "not a date"
    index = customers.column_names.index("onboarding_date")
    pq.write_table(customers.set_column(index, "onboarding_date", pa.array(onboarding)), staged / "customers.parquet")
    target, before = _old_target(tmp_path)
    with pytest.raises(Exception, match="(?i)cast"):
        build_customer_features_spark(spark, staged, date(2026, 6, 30), target)
    assert target.read_bytes() == before
    assert [p.name for p in target.parent.iterdir()] == ["data.parquet"], "the Spark parts directory was removed"
    assert not [t.name for t in spark.catalog.listTables() if t.name.startswith("tagml_staged_")], "the temporary views were dropped"
