"""Batch scoring on Spark (real local[2]) against the DuckDB path: the same tags, reasons and schema, the same all-or-nothing partition."""

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tagml.scoring.score import TAG_ROW_SCHEMA, CoverageError, ScoringError, UnscorableTagsError, resolve_champion, score_partition
from tagml.scoring.spark_scoring import score_partition_spark
from tagml.training.catalog import load_catalog
from tests import test_scoring
from tests.conftest import write_test_catalog
from tests.test_scoring import AS_OF

pytestmark = [pytest.mark.spark, pytest.mark.slow]

world = test_scoring.world  # a trained, promoted risk_appetite champion and a feature snapshot (fixture)

KEYS = ["tag", "customer_id"]
EXACT = [
    "as_of",
    "value",
    "source",
    "inferred_value",
    "observed_value",
    "observed_mismatch",
    "assessment",
    "assessed_on",
    "producer",
    "model_version",
    "mlflow_run_id",
]


def _both(spark, world, tmp_path, features=None, catalog=None, **kwargs):
    args = (world["client"], catalog or world["catalog"], features or world["features"], world["staged"], AS_OF)
    duck = score_partition(world["con"], *args, tmp_path / "duckdb" / "data.parquet", **kwargs)
    on_spark = score_partition_spark(spark, world["con"], *args, tmp_path / "spark" / "data.parquet", **kwargs)
    return duck, on_spark


def _rows(path):
    return pd.read_parquet(path).sort_values(KEYS).reset_index(drop=True)


def test_spark_scores_every_tag_as_duckdb_does(spark, world, tmp_path):
    # suitability too: the DuckDB step on the driver, committed with Spark's parts
    catalog = load_catalog(write_test_catalog(tmp_path / "catalog.yaml", ("risk_appetite", "value_tier", "lifecycle_stage", "suitability")))
    duck, on_spark = _both(spark, world, tmp_path, catalog=catalog)
    # the same file schema as the DuckDB path's (Parquet keeps TAG_ROW_SCHEMA's second timestamps as milliseconds)
    assert pq.read_schema(on_spark.path) == pq.read_schema(duck.path) and pq.read_schema(on_spark.path).names == TAG_ROW_SCHEMA.names
    assert (on_spark.rows, on_spark.customers) == (duck.rows, duck.customers) and on_spark.coverage.passed
    assert set(on_spark.per_tag) == {"risk_appetite", "value_tier", "lifecycle_stage", "suitability"}
    a, b = _rows(duck.path), _rows(on_spark.path)
    pd.testing.assert_frame_equal(a[KEYS + EXACT], b[KEYS + EXACT])
    assert a.reasons.map(list).tolist() == b.reasons.map(list).tolist()
    assert (a.scored_at.notna() & b.scored_at.notna()).all()
    model = a.tag == "risk_appetite"
    assert ((a.probability[model] - b.probability[model]).abs() < 1e-6).all() and b.probability[~model].isna().all()
    proba_a, proba_b = a.probabilities[model].map(dict), b.probabilities[model].map(dict)
    assert all(x.keys() == y.keys() and all(abs(x[k] - y[k]) < 1e-6 for k in x) for x, y in zip(proba_a, proba_b))
    banded = b.tag.isin(["value_tier", "lifecycle_stage"])
    assert b.probabilities[~model].isna().all() and (b.reasons[banded].map(len) == 0).all() and (b.reasons[b.tag == "suitability"].map(len) > 0).all()
    # the comparison means something: the model tag has observed overrides and reasons, the rule tags several values
    assert (b.source[model] == "observed").any() and (b.reasons[model].map(len) > 0).mean() > 0.95
    assert b[b.tag == "value_tier"].value.nunique() > 1 and b[b.tag == "suitability"].value.nunique() == 4
    assert b.assessment[model].notna().all() and b.assessed_on[model].notna().any()
    assert [p.name for p in on_spark.path.parent.iterdir()] == ["data.parquet"]


def test_spark_without_reasons_matches_duckdb_without_reasons(spark, world, tmp_path):
    duck, on_spark = _both(spark, world, tmp_path, with_reasons=False, skip={"lifecycle_stage": "not under test"})
    a, b = _rows(duck.path), _rows(on_spark.path)
    assert (b.reasons.map(len) == 0).all() and set(b.tag) == {"risk_appetite", "value_tier"}
    pd.testing.assert_frame_equal(a[KEYS + EXACT], b[KEYS + EXACT])


def _old_partition(tmp_path):
    target = tmp_path / "tags" / f"as_of={AS_OF}" / "data.parquet"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"the previous partition")
    return target


def _untouched(target):
    assert target.read_bytes() == b"the previous partition"
    assert [p.name for p in target.parent.iterdir()] == ["data.parquet"]


def test_a_snapshot_missing_a_champion_feature_leaves_the_old_partition(spark, world, tmp_path):
    features = tmp_path / "features.parquet"
    table = pq.read_table(world["features"])
    dropped = resolve_champion(world["client"], world["catalog"].get("risk_appetite")).info.features[0]
    pq.write_table(table.drop_columns([dropped]), features)
    target = _old_partition(tmp_path)
    with pytest.raises(UnscorableTagsError, match=f"tag 'risk_appetite': feature table {features} lacks 1 column"):
        score_partition_spark(spark, world["con"], world["client"], world["catalog"], features, world["staged"], AS_OF, target)
    _untouched(target)


def test_a_failed_spark_task_or_coverage_check_leaves_the_old_partition(spark, world, tmp_path):
    table = pq.read_table(world["features"])
    # a rule column DuckDB cannot compare with a number: the worker's sandbox fails, named by tag and by DuckDB's error
    broken = tmp_path / "broken.parquet"
    pq.write_table(table.set_column(table.column_names.index("aum_total"), "aum_total", table.column("aum_total").cast("string").fill_null("n/a")), broken)
    target = _old_partition(tmp_path)
    args = (world["client"], world["catalog"])
    with pytest.raises(ScoringError, match="rule tag 'value_tier': the Spark scoring job failed, nothing was written: .*BinderException: Binder Error"):
        score_partition_spark(spark, world["con"], *args, broken, world["staged"], AS_OF, target, skip={"risk_appetite": "not under test"})
    _untouched(target)
    # a customer twice in the snapshot: every tag is scored, the coverage check refuses the parts
    doubled = tmp_path / "doubled.parquet"
    pq.write_table(pa.concat_tables([table, table.slice(0, 1)]), doubled)
    with pytest.raises(CoverageError, match="duplicate 'value_tier' rows"):
        score_partition_spark(spark, world["con"], *args, doubled, world["staged"], AS_OF, target)
    _untouched(target)


def _loaded_models(uri: str, version: str):
    def run(batches):
        import os
        import sys

        from tagml.scoring.spark_scoring import worker_model

        for batch in batches:
            model = worker_model(uri, "risk_appetite", version)
            # kept alive for the worker's life, so a second load could not reuse the first one's id
            sys.tagml_test_models = [*getattr(sys, "tagml_test_models", []), model]
            yield pa.RecordBatch.from_pydict({"pid": [os.getpid()] * batch.num_rows, "model": [id(model)] * batch.num_rows})

    return run


def test_each_python_worker_loads_the_champion_version_once(spark, world):
    version = resolve_champion(world["client"], world["catalog"].get("risk_appetite")).info.version
    seen = spark.range(0, 16, numPartitions=8).mapInArrow(_loaded_models(world["uri"], version), "pid long, model long").distinct().collect()
    per_worker = {}
    for row in seen:
        per_worker.setdefault(row.pid, set()).add(row.model)
    assert per_worker and all(len(models) == 1 for models in per_worker.values())
    assert len(seen) < 8  # 8 tasks ran on fewer workers, each reusing its model


def test_spark_carries_the_periods_inference_as_duckdb_does(spark, world, tmp_path):
    """Under a monthly refresh both engines keep the inference made earlier in the month (here marked by a
    changed top probability) and infer the customers without one."""
    from datetime import timedelta

    catalog = world["catalog"].model_copy(update={"tags": tuple(t.model_copy(update={"refresh": "monthly"}) for t in world["catalog"].tags)})
    full = score_partition(world["con"], world["client"], catalog, world["features"], world["staged"], AS_OF, tmp_path / "full.parquet")
    earlier = AS_OF - timedelta(days=3)
    table = pq.read_table(full.path)
    frame = table.to_pandas()
    frame["inferred_as_of"] = earlier
    frame["reasons"] = frame["reasons"].map(lambda r: [*r, "carried"] if len(r) else r)
    newcomers = frame.loc[frame.tag == "risk_appetite", "customer_id"].iloc[::7]
    frame = frame[~((frame.tag == "risk_appetite") & frame.customer_id.isin(newcomers))]
    previous = tmp_path / "previous.parquet"
    pq.write_table(pa.Table.from_pandas(frame, schema=table.schema, preserve_index=False), previous)
    duck, on_spark = _both(spark, world, tmp_path, catalog=catalog, previous_partition=previous)
    for summary in (duck, on_spark):
        refresh = summary.per_tag["risk_appetite"]["refresh"]
        assert refresh["inferred_rows"] == len(newcomers) and refresh["carried_rows"] == summary.customers - len(newcomers), refresh
    a, b = _rows(duck.path), _rows(on_spark.path)
    pd.testing.assert_frame_equal(a[KEYS + EXACT + ["inferred_as_of"]], b[KEYS + EXACT + ["inferred_as_of"]])
    assert a.reasons.map(list).tolist() == b.reasons.map(list).tolist()
    model = b.tag == "risk_appetite"
    carried = model & ~b.customer_id.isin(newcomers)
    assert (b.inferred_as_of[carried] == earlier).all() and (b.inferred_as_of[model & ~carried] == AS_OF).all()
    assert (b.reasons[carried].map(lambda r: len(r) == 0 or r[-1] == "carried")).all()
    assert not b.reasons[model & ~carried].map(lambda r: "carried" in list(r)).any()
