"""Drift of one as_of partition for every model tag: features, predictions, realised performance.

For each model tag, against the reference of the version that scored the partition
(monitoring/reference.py: the population on the version's training date):

* **feature drift**: PSI of every feature of the model, set-based in DuckDB over all customers
  (monitoring/psi.py), overall and per slice (value tier by the catalog's rule, region). A feature
  is drifted when its PSI exceeds the tag's `drift.feature_psi` (default 0.2, the upper end of the
  conventional 0.1-0.25 "moderate shift" band); the tag is feature-drifted when the share of
  drifted features exceeds `drift.drifted_feature_share` or a critical feature drifted.
* **prediction drift**: PSI of the inferred class distribution in the tag store (`inferred_value`,
  not the observed override) against the same version's predictions on the reference population.
  Comparing predictions with predictions (rather than with the training labels' distribution)
  keeps the model's own bias and the labelled population's selection out of the number: on the
  reference the PSI is 0 by construction. Also per slice, and per class the mean probability and
  the PSI of the probability histogram.
* **realised performance** for tags with delayed labels (monitoring/performance.py).

Per tag: **measure** (monitoring/measures.py: the numbers above, nothing decided) -> **decide**
(monitoring/decision.py: a pure function of those numbers and the tag's catalog `drift:` spec; the
place to change a drift rule) -> **record** (here: the summary row and the per-feature and
per-class tables go to the drift history, monitoring/history.py, and an Evidently report on a fixed
sample is saved per tag and partition when the report policy asks for it, monitoring/report.py and
monitoring/report_policy.py). Locations come from the caller
(`DriftLocations`, built by orchestration's resources).
"""

import time
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow.parquet as pq
from mlflow.tracking import MlflowClient

from tagml.core.files import CorruptFileError, check_parquet
from tagml.core.storage import WarehouseLayout, quote, sql_literal
from tagml.core.suppression import load_suppression
from tagml.features.snapshot import open_feature_snapshot
from tagml.monitoring.decision import DriftDecision, decide, feature_drifted
from tagml.monitoring.history import FEATURES, PREDICTIONS, SUMMARY, DriftHistory
from tagml.monitoring.measures import TagInputs, TagMeasures, measure_tags
from tagml.monitoring.performance import RealisedPerformance, realised_performance, registry_decision_threshold, registry_test_metric
from tagml.monitoring.psi import ALL, BinCounter, parquet
from tagml.monitoring.reference import (
    SAMPLE_SALT,
    DriftInputError,
    monitored_model,
    reference_feature_counts,
    reference_population,
    reference_profile,
)
from tagml.monitoring.report import VERDICT_KEYS, ReportJob, ReportSummary, run_reports
from tagml.monitoring.report_policy import DEFAULT_REPORT_WEEKDAY, ReportPlan, plan_reports, report_policy
from tagml.scoring.rules import slice_expressions
from tagml.scoring.sources import feature_path, own_source
from tagml.scoring.store import TagStore, TagStoreError
from tagml.training.catalog import Catalog, TagSpec


@dataclass(frozen=True)
class DriftLocations:
    """Where drift reads its inputs and writes its results (the caller chooses them: orchestration's resources)."""

    warehouse_dir: Path
    tag_store: TagStore  # read through its interface: the embedded store or a bank's
    drift_dir: Path
    reports_dir: Path
    governance_db: Path | None = None  # erased customers are kept out of a BYO tag's reference population

    @property
    def staged_dir(self) -> Path:
        return WarehouseLayout(self.warehouse_dir).staged_dir

    @property
    def reference_dir(self) -> Path:
        return self.drift_dir / "reference"

    @property
    def history(self) -> DriftHistory:
        return DriftHistory(self.drift_dir)

    def features_path(self, tag: TagSpec, as_of: date) -> Path:
        """The snapshot the tag was scored from on `as_of`: customer_features, or a bring-your-own tag's own."""
        return feature_path(tag, self.warehouse_dir, as_of)

    def report_path(self, tag: str, as_of: date) -> Path:
        return self.reports_dir / tag / f"{as_of.isoformat()}.html"


@dataclass
class TagDrift:
    summary: dict[str, Any]
    features: pd.DataFrame
    predictions: pd.DataFrame
    report_job: ReportJob | None = None
    inputs: TagInputs | None = None  # kept until the report plan is known (the report's samples come from them)

    def attach_report(self, report: ReportSummary) -> None:
        """Evidently's per-column statistic and verdict on the samples, next to the PSI of everyone."""
        evidently = pd.DataFrame.from_dict(report.columns, orient="index")
        overall = self.features["slice_column"] == ALL
        for column, key, dtype in (("evidently_method", "method", object), ("evidently_value", "value", float), ("evidently_drifted", "drifted", object)):
            self.features[column] = self.features["feature"].map(evidently.get(key, pd.Series(dtype=dtype))).where(overall)
        left_out = self.features["feature"].map({c: f"not run: {why}" for c, why in report.excluded.items()})
        self.features["evidently_method"] = self.features["evidently_method"].where(~(overall & left_out.notna()), left_out)
        self.summary.update(
            report_path=str(report.path),
            report_sample_rows=min(report.sample_rows),
            evidently_drifted_share=report.drifted_share,
            evidently_drifted_columns=report.drifted_columns,
        )

    @property
    def tag(self) -> str:
        return self.summary["tag"]

    @property
    def drifted(self) -> bool:
        return bool(self.summary["drifted"])

    @property
    def reasons(self) -> list[str]:
        return list(self.summary["reasons"])


def tag_inputs(
    con: duckdb.DuckDBPyConnection,
    client: MlflowClient,
    catalog: Catalog,
    tag: TagSpec,
    as_of: date,
    locations: DriftLocations,
    sample_rows: int,
    bin_counter: BinCounter | None = None,
) -> TagInputs:
    """The checked partitions of `as_of`, the version that scored the tag there and its reference; a named error for each gap."""
    current = locations.features_path(tag, as_of)
    asset = "customer_features" if own_source(tag) is None else f"{tag.name}/own_features"
    if not current.exists():
        raise DriftInputError(f"tag {tag.name!r}: no {asset} partition for as_of {as_of} at {current}; materialize {asset} first")
    try:
        tags_sql = locations.tag_store.read_sql(as_of)  # a missing or unreadable partition: the store's named error
    except TagStoreError as err:
        raise DriftInputError(f"customer_tags of {as_of} ({locations.tag_store.location(as_of)}): {err}; run the scoring job first") from err
    try:
        if own_source(tag) is None:
            open_feature_snapshot(current, as_of)
        else:
            check_parquet(current, f"re-materialize {asset} for the partition {as_of.isoformat()}")
    except CorruptFileError as err:
        raise DriftInputError(str(err)) from err
    versions = con.execute(f"SELECT model_version, count(*) FROM {tags_sql} WHERE tag = ? GROUP BY 1 ORDER BY 2 DESC, 1", [tag.name]).fetchall()
    if not versions or versions[0][0] is None:
        raise DriftInputError(f"tag {tag.name!r} has no model-scored rows in the customer_tags partition of {as_of}")
    mm = monitored_model(client, tag, versions[0][0])
    columns = set(pq.read_schema(current).names)
    missing = [f for f in mm.features if f not in columns]
    if missing:
        raise DriftInputError(f"tag {tag.name!r}: the features of {as_of} lack {missing[:10]} that {mm.producer} uses")
    # an own-table tag: the slices its gate judged (recorded at registration; its snapshot holds only the
    # model's columns); a contract tag: the catalog's over the whole feature snapshot (value tier slices
    # life_stage's drift although aum_total is not one of its features)
    slices = slice_expressions(catalog, columns, tag, mm.slices if own_source(tag) is not None else None)
    suppression = load_suppression(locations.governance_db) if locations.governance_db is not None else None
    population = reference_population(con, tag, mm, locations.warehouse_dir, locations.staged_dir, locations.reference_dir, suppression)
    profile = reference_profile(con, client, mm, tag, population, slices, locations.reference_dir, sample_rows)
    reference_features = reference_feature_counts(con, mm, tag, population, slices, locations.reference_dir, bin_counter)
    return TagInputs(tag, as_of, mm, current, tags_sql, slices, population, profile, reference_features)


def compute_night_drift(
    con: duckdb.DuckDBPyConnection,
    client: MlflowClient,
    catalog: Catalog,
    tags: list[TagSpec],
    as_of: date,
    locations: DriftLocations,
    sample_rows: int = 5000,
    bin_counter: BinCounter | None = None,
) -> list[TagDrift]:
    """Drift of each model tag's partition on `as_of` against the reference of the version that scored it: measure
    (the tags' current sides counted together, monitoring/measures.py), decide, record; no report (the caller plans it).

    A tag's `seconds` is its own inputs, performance and decision plus an equal share of the shared scans.
    """
    own: list[float] = []
    night: list[TagInputs] = []
    performances: list[RealisedPerformance] = []
    for tag in tags:
        started = time.perf_counter()
        inputs = tag_inputs(con, client, catalog, tag, as_of, locations, sample_rows, bin_counter)
        night.append(inputs)
        # realised performance of the partition whose labels have matured
        performances.append(
            realised_performance(
                con,
                tag,
                as_of,
                locations.tag_store,
                locations.staged_dir,
                inputs.model.version,
                registry_test_metric(client, tag),
                registry_decision_threshold(client, tag),
            )
        )
        own.append(time.perf_counter() - started)
    started = time.perf_counter()
    measured = measure_tags(con, night, performances, bin_counter)
    shared = (time.perf_counter() - started) / len(tags)
    results = []
    for inputs, measures, seconds in zip(night, measured, own):
        started = time.perf_counter()
        tag = inputs.tag
        decision = decide(measures.for_decision(), tag.drift)
        summary = summary_row(inputs, measures, decision)
        features = measures.features.assign(threshold=tag.drift.feature_psi, drifted=feature_drifted(measures.features, tag.drift))
        meta = {"as_of": as_of, "tag": tag.name, "model_version": inputs.model.version}
        summary["seconds"] = seconds + shared + time.perf_counter() - started
        results.append(TagDrift(summary, features.assign(**meta), measures.predictions.assign(**meta), None, inputs))
    return results


def summary_row(inputs: TagInputs, measures: TagMeasures, decision: DriftDecision) -> dict[str, Any]:
    """The drift history's summary row of one tag: the decision, the numbers it was taken on and its thresholds."""
    mm, rules, perf = inputs.model, inputs.tag.drift, measures.performance
    overall = measures.overall_features
    worst = measures.worst_slice()
    return {
        "as_of": inputs.as_of,
        "tag": inputs.tag.name,
        "model_version": mm.version,
        "producer": mm.producer,
        "reference_as_of": mm.train_as_of,
        "reference_snapshot": str(mm.snapshot_path),
        "reference_population": str(inputs.population),
        "reference_rows": inputs.profile.rows,
        "current_rows": int(overall["current_rows"].iloc[0]),
        "n_features": len(overall),
        "drifted_features": decision.drifted_features,
        "drifted_feature_share": decision.drifted_feature_share,
        "feature_psi_threshold": rules.feature_psi,
        "drifted_feature_share_threshold": rules.drifted_feature_share,
        "critical_features_drifted": decision.critical_features_drifted,
        "feature_drift": decision.feature_drift,
        "prediction_psi": measures.prediction_psi,
        "prediction_psi_threshold": rules.prediction_psi,
        "prediction_drift": decision.prediction_drift,
        "probability_psi": float(measures.overall_predictions["probability_psi"].max()),
        "max_slice_prediction_psi": float(worst["slice_psi"]) if worst is not None else None,
        "max_slice": f"{worst['slice_column']}={worst['slice']}" if worst is not None else None,
        "performance_status": perf.status,
        "performance_metric": perf.metric,
        "performance_partition": perf.partition,
        "performance_labels": perf.labels,
        "performance_version": perf.version,
        "realised_metric": perf.realised,
        "expected_metric": perf.expected,
        "performance_drop": perf.drop,
        "performance_drop_threshold": rules.performance_drop,
        "performance_drift": decision.performance_drift,
        "performance_note": perf.note,
        "training_gap_share": inputs.profile.training_gap_share,
        "drifted": decision.drifted,
        "reasons": decision.reasons,
        "computed_at": datetime.now(UTC),
    }


def _report_job(con: duckdb.DuckDBPyConnection, inputs: TagInputs, summary: dict[str, Any], target: Path, sample_rows: int) -> ReportJob:
    """The Evidently report of one tag on fixed samples, headed by tagml's verdict (run later, in a child process)."""
    mm, tag = inputs.model, inputs.tag
    numeric = [f for f in mm.features if mm.kinds[f] != "categorical"]
    categorical = [f for f in mm.features if mm.kinds[f] == "categorical"]
    cols = ", ".join(f"f.{quote(c)}" for c in mm.features)
    # features and the inferred class only: the id orders the sample but is never selected
    current_sample = con.execute(
        f"SELECT {cols}, t.inferred_value AS prediction FROM {parquet(inputs.features_path)} f "
        f"JOIN (SELECT customer_id, inferred_value FROM {inputs.tags_sql} WHERE tag = ?) t ON t.customer_id = f.customer_id "
        f"ORDER BY hash(f.customer_id, {sql_literal(SAMPLE_SALT)}), f.customer_id LIMIT {int(sample_rows)}",
        [tag.name],
    ).df()
    return ReportJob(
        pd.read_parquet(inputs.profile.sample_path),
        current_sample,
        numeric,
        [*categorical, "prediction"],
        tag.drift.drifted_feature_share,
        target,
        {"tag": tag.name, "as_of": inputs.as_of.isoformat(), "model": mm.producer, "reference_as_of": mm.train_as_of.isoformat()},
        verdict={k: summary[k] for k in VERDICT_KEYS},
    )


@dataclass
class DriftRun:
    as_of: date
    results: list[TagDrift]
    paths: dict[str, Path]
    report_plan: ReportPlan | None = None  # which tags got an Evidently report, and why
    report_processes: int = 0  # Evidently child processes the call started (shared by every as_of of a range)

    def result(self, tag: str) -> TagDrift:
        return next(r for r in self.results if r.tag == tag)


def compute_drift(
    con: duckdb.DuckDBPyConnection,
    client: MlflowClient,
    catalog: Catalog,
    as_of: date,
    locations: DriftLocations,
    tags: list[str] | None = None,
    sample_rows: int = 5000,
    report: bool | str = True,
    bin_counter: BinCounter | None = None,
    report_weekday: int = DEFAULT_REPORT_WEEKDAY,
) -> DriftRun:
    """Drift of every (or the named) model tag for one as_of, written to the history in one go (`compute_drifts` of one day)."""
    return compute_drifts(con, client, catalog, [as_of], locations, tags, sample_rows, report, bin_counter, report_weekday)[0]


def compute_drifts(
    con: duckdb.DuckDBPyConnection,
    client: MlflowClient,
    catalog: Catalog,
    as_ofs: list[date],
    locations: DriftLocations,
    tags: list[str] | None = None,
    sample_rows: int = 5000,
    report: bool | str = True,
    bin_counter: BinCounter | None = None,
    report_weekday: int = DEFAULT_REPORT_WEEKDAY,
) -> list[DriftRun]:
    """Drift of every (or the named) model tag for each as_of (a night, or a backfill's range of nights).

    `bin_counter` counts the feature PSI's bins over every customer: DuckDB's `bin_counts` by default,
    the engine's when the caller (orchestration's resources) passes one (monitoring/spark_psi.py).
    `report` is the Evidently report policy (monitoring/report_policy.py; True = always, False = never):
    the PSI and the decisions are computed for every tag and as_of whatever it says. Evidently always
    runs on the fixed samples, and all the reports of the call run in one child process: a backfill of
    a month of nights imports Evidently once. Each (tag, version) reference is profiled once and
    cached (monitoring/reference.py), so the nights after the first read it.

    Every tag of every as_of is computed before anything is written: a tag whose inputs are missing
    fails the call with a named error and leaves the history as it was.
    """
    report_policy(report)  # an unknown policy fails before any work
    model_tags = [catalog.get(t) for t in tags] if tags else list(catalog.model_tags)
    not_model = [t.name for t in model_tags if t.kind != "model"]
    if not_model:
        raise DriftInputError(f"drift is monitored for model tags only; {not_model} are rule tags")
    if not model_tags:
        raise DriftInputError("the catalog has no model tags to monitor")
    nights: list[tuple[date, list[TagDrift], ReportPlan]] = []
    for as_of in as_ofs:
        results = compute_night_drift(con, client, catalog, model_tags, as_of, locations, sample_rows, bin_counter)
        plan = plan_reports(report, as_of, {r.tag: r.drifted for r in results}, report_weekday)
        for result in results:
            if result.tag in plan.tags and result.inputs is not None:
                result.report_job = _report_job(con, result.inputs, result.summary, locations.report_path(result.tag, as_of), sample_rows)
            result.inputs = None
        nights.append((as_of, results, plan))
    jobs = [r for _, results, _ in nights for r in results if r.report_job is not None]
    for result, summary in zip(jobs, run_reports([r.report_job for r in jobs])):
        result.attach_report(summary)
        result.report_job = None
    processes = 1 if jobs else 0  # run_reports: one child for all of them
    runs = []
    for as_of, results, plan in nights:
        frames = {
            SUMMARY: pd.DataFrame([r.summary for r in results]),
            FEATURES: pd.concat([r.features for r in results], ignore_index=True),
            PREDICTIONS: pd.concat([r.predictions for r in results], ignore_index=True),
        }
        runs.append(DriftRun(as_of, results, locations.history.write(con, as_of, frames), plan, processes))
    return runs
