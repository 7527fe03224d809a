"""Drift of one as_of partition for every model tag: features, predictions, realised performance.

For each model tag, against the reference of the version that scored the partition
(monitoring/reference.py: the population on the version's training date):

* **feature drift**: PSI of every feature of the model, set-based in DuckDB over all customers
  (monitoring/psi.py), overall and per slice (value tier by the catalog's rule, region). A feature
  is drifted when its PSI exceeds the tag's `drift.feature_psi` (default 0.2, the upper end of the
  conventional 0.1-0.25 "moderate shift" band); the tag is feature-drifted when the share of
  drifted features exceeds `drift.drifted_feature_share`.
* **prediction drift**: PSI of the inferred class distribution in the tag store (`inferred_value`,
  not the observed override) against the same version's predictions on the reference population.
  Comparing predictions with predictions (rather than with the training labels' distribution)
  keeps the model's own bias and the labelled population's selection out of the number: on the
  reference the PSI is 0 by construction. Also per slice, and per class the mean probability and
  the PSI of the probability histogram.
* **realised performance** for tags with delayed labels (monitoring/performance.py).

The numbers go to the drift history (monitoring/history.py) and an Evidently report on a fixed
sample is saved per tag and partition (monitoring/report.py).
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

from features.snapshot import open_feature_snapshot
from monitoring.history import FEATURES, PREDICTIONS, SUMMARY, DriftHistory
from monitoring.performance import realised_performance, registry_test_metric
from monitoring.psi import ALL, MISSING, parquet, psi_from_counts
from monitoring.psi import feature_psi as compute_feature_psi
from monitoring.reference import (
    PROBABILITY_BINS,
    SAMPLE_SALT,
    DriftInputError,
    ReferenceProfile,
    monitored_model,
    reference_population,
    reference_profile,
)
from monitoring.report import ReportJob, ReportSummary, run_reports
from scoring.rules import rule_case_sql, rule_columns
from scoring.store import TagStore
from tagml.core.files import CorruptFileError, check_parquet
from tagml.core.settings import Settings
from tagml.core.storage import features_path, quote, sql_literal, staged_dir_of
from training.catalog import Catalog, TagSpec

# what the report's header shows of tagml's decision (the summary row's full-population numbers)
VERDICT_KEYS = (
    "drifted", "reasons", "current_rows", "reference_rows", "drifted_feature_share", "feature_psi_threshold",
    "drifted_feature_share_threshold", "prediction_psi", "prediction_psi_threshold", "performance_status",
)
MIN_SLICE_ROWS = 100  # a slice smaller than this on either side is reported but never flagged
SLICE_SOURCES = ("value_tier", "region")  # a rule tag of the catalog, or else a feature column


@dataclass(frozen=True)
class DriftLocations:
    """Where drift reads its inputs and writes its results (all from Settings)."""

    warehouse_dir: Path
    tag_store_dir: Path
    drift_dir: Path
    reports_dir: Path

    @classmethod
    def from_settings(cls, settings: Settings) -> "DriftLocations":
        return cls(settings.warehouse_dir, settings.warehouse_dir / "customer_tags", settings.drift_dir, settings.reports_dir)

    @property
    def staged_dir(self) -> Path:
        return staged_dir_of(self.warehouse_dir)

    @property
    def reference_dir(self) -> Path:
        return self.drift_dir / "reference"

    @property
    def history(self) -> DriftHistory:
        return DriftHistory(self.drift_dir)

    def features_path(self, as_of: date) -> Path:
        return features_path(self.warehouse_dir, as_of)

    def report_path(self, tag: str, as_of: date) -> Path:
        return self.reports_dir / tag / f"{as_of.isoformat()}.html"


@dataclass
class TagDrift:
    summary: dict[str, Any]
    features: pd.DataFrame
    predictions: pd.DataFrame
    report_job: ReportJob | None = None

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


def slice_expressions(catalog: Catalog, columns: set[str]) -> dict[str, str]:
    """SQL per slice over a feature snapshot: a rule tag's bands (value tier) or a feature column (region).

    A rule's SQL is generated from its checked parse tree (scoring.rules); a slice whose columns the
    snapshot lacks is left out, as a missing feature column is.
    """
    out = {}
    for name in SLICE_SOURCES:
        rule = next((t for t in catalog.rule_tags if t.name == name), None)
        if rule is not None:
            if set(rule_columns(rule)) <= columns:
                out[name] = rule_case_sql(rule)
        elif name in columns:
            out[name] = quote(name)
    return out


def _rollup(finest: pd.DataFrame, slices: list[str], keys: list[str]) -> pd.DataFrame:
    """Counts per (slice_column, slice, *keys) from counts per (each slice..., *keys)."""
    parts = [finest.groupby(keys, as_index=False)["n"].sum().assign(slice_column=ALL, slice=ALL)]
    for name in slices:
        part = finest.groupby([name, *keys], as_index=False)["n"].sum().rename(columns={name: "slice"})
        parts.append(part.assign(slice_column=name))
    return pd.concat(parts, ignore_index=True)[["slice_column", "slice", *keys, "n"]]


def _current_predictions(con: duckdb.DuckDBPyConnection, tags_path: Path, features: Path, tag: str, slices: dict[str, str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(class counts per slice, probability bins per class) of one tag in a tag-store partition."""
    slice_cols = "".join(f"coalesce(({expr})::VARCHAR, {sql_literal(MISSING)}) AS {quote(name)}, " for name, expr in slices.items())
    finest = con.execute(
        f"SELECT {slice_cols}coalesce(t.inferred_value, {sql_literal(MISSING)}) AS class, count(*) AS n "
        f"FROM (SELECT customer_id, inferred_value FROM {parquet(tags_path)} WHERE tag = ?) t "
        f"JOIN (SELECT * FROM {parquet(features)}) f ON f.customer_id = t.customer_id GROUP BY ALL",
        [tag],
    ).df()
    counts = _rollup(finest, list(slices), ["class"])
    bins = con.execute(
        f"SELECT e.key AS class, least(floor(e.value * {PROBABILITY_BINS}), {PROBABILITY_BINS - 1})::INTEGER AS bin, "
        f"count(*) AS n, sum(e.value) AS total FROM (SELECT unnest(map_entries(probabilities)) AS e FROM {parquet(tags_path)} "
        f"WHERE tag = ? AND probabilities IS NOT NULL) GROUP BY ALL",
        [tag],
    ).df()
    return counts, bins


def _prediction_table(
    profile_counts: pd.DataFrame, current_counts: pd.DataFrame, profile: ReferenceProfile, current_bins: pd.DataFrame, classes: tuple[str, ...]
) -> pd.DataFrame:
    """Per slice and class: reference and current counts and shares, the slice's class PSI; overall also probabilities."""
    ref = profile_counts.rename(columns={"class": "bin"})
    cur = current_counts.rename(columns={"class": "bin"})
    psi = psi_from_counts(ref, cur, ["slice_column", "slice"]).rename(columns={"psi": "slice_psi"})
    merged = ref.merge(cur, on=["slice_column", "slice", "bin"], how="outer", suffixes=("_ref", "_cur")).fillna({"n_ref": 0, "n_cur": 0})
    merged = merged.merge(psi[["slice_column", "slice", "slice_psi", "reference_rows", "current_rows"]], on=["slice_column", "slice"])
    merged["reference_share"] = merged["n_ref"] / merged["reference_rows"].where(merged["reference_rows"] > 0)
    merged["current_share"] = merged["n_cur"] / merged["current_rows"].where(merged["current_rows"] > 0)
    table = merged.rename(columns={"bin": "class", "n_ref": "reference_count", "n_cur": "current_count"})
    # probabilities: overall only (a class's mean probability and the PSI of its histogram)
    ref_bins = profile.probability_bins.rename(columns={"bin": "b"}).assign(bin=lambda d: d["b"].astype(str)).drop(columns="b")
    cur_bins = current_bins.assign(bin=current_bins["bin"].astype(str))[["class", "bin", "n"]]
    prob_psi = psi_from_counts(ref_bins, cur_bins, ["class"]).set_index("class")["psi"]
    current_total = current_bins.groupby("class")["total"].sum()
    current_rows = current_bins.groupby("class")["n"].sum()
    overall = table["slice_column"] == ALL
    table.loc[overall, "reference_mean_probability"] = table.loc[overall, "class"].map({c: s / profile.rows for c, s in profile.probability_sums.items()})
    table.loc[overall, "current_mean_probability"] = table.loc[overall, "class"].map(current_total / current_rows)
    table.loc[overall, "probability_psi"] = table.loc[overall, "class"].map(prob_psi)
    order = {c: i for i, c in enumerate(classes)}
    table["_o"] = table["class"].map(order).fillna(len(order))
    return table.sort_values(["slice_column", "slice", "_o"]).drop(columns=["_o"]).reset_index(drop=True)


def _shares(frame: pd.DataFrame, column: str, classes: tuple[str, ...]) -> str:
    rows = frame.set_index("class")[column]
    return ", ".join(f"{c} {rows.get(c, 0.0):.1%}" for c in [*classes, "unknown"] if c in rows.index)


def compute_tag_drift(
    con: duckdb.DuckDBPyConnection,
    client: MlflowClient,
    catalog: Catalog,
    tag: TagSpec,
    as_of: date,
    locations: DriftLocations,
    sample_rows: int = 5000,
    report: bool = True,
) -> TagDrift:
    """Drift of one model tag's partition against the reference of the version that scored it."""
    started = time.perf_counter()
    store = TagStore(locations.tag_store_dir)
    current = locations.features_path(as_of)
    if not current.exists():
        raise DriftInputError(f"no customer_features partition for as_of {as_of} at {current}; materialize customer_features first")
    tags_path = store.partition_path(as_of)
    if not tags_path.exists():
        raise DriftInputError(f"no customer_tags partition for as_of {as_of} at {tags_path}; run the scoring job first")
    try:
        open_feature_snapshot(current, as_of)
        check_parquet(tags_path, f"re-run the scoring job (customer_tags) for the partition {as_of.isoformat()}")
    except CorruptFileError as err:
        raise DriftInputError(str(err)) from err
    versions = con.execute(
        f"SELECT model_version, count(*) FROM {parquet(tags_path)} WHERE tag = ? GROUP BY 1 ORDER BY 2 DESC, 1", [tag.name]
    ).fetchall()
    if not versions or versions[0][0] is None:
        raise DriftInputError(f"tag {tag.name!r} has no model-scored rows in the customer_tags partition of {as_of}")
    mm = monitored_model(client, tag, versions[0][0])
    columns = set(pq.read_schema(current).names)
    missing = [f for f in mm.features if f not in columns]
    if missing:
        raise DriftInputError(f"tag {tag.name!r}: the features of {as_of} lack {missing[:10]} that {mm.producer} uses")
    slices = slice_expressions(catalog, columns)
    population = reference_population(con, mm, locations.warehouse_dir, locations.staged_dir, locations.reference_dir)
    profile = reference_profile(con, client, mm, tag, population, slices, locations.reference_dir, sample_rows)
    rules = tag.drift

    # features: PSI over every customer, overall and per slice
    feats = compute_feature_psi(con, population, current, mm.kinds, slices)
    big_enough = (feats["reference_rows"] >= MIN_SLICE_ROWS) & (feats["current_rows"] >= MIN_SLICE_ROWS)
    feats["threshold"] = rules.feature_psi
    feats["drifted"] = (feats["psi"] > rules.feature_psi) & big_enough
    overall = feats[feats["slice_column"] == ALL]
    drifted_features = overall.loc[overall["drifted"]].sort_values("psi", ascending=False)["feature"].tolist()
    share = len(drifted_features) / len(overall)
    critical = [f for f in drifted_features if f in rules.critical_features]
    feature_drift = share > rules.drifted_feature_share or bool(critical)

    # predictions: the tag store's inferred classes against the version's reference predictions
    current_counts, current_bins = _current_predictions(con, tags_path, current, tag.name, slices)
    predictions = _prediction_table(profile.class_counts, current_counts, profile, current_bins, mm.classes)
    all_rows = predictions[predictions["slice_column"] == ALL]
    prediction_psi = float(all_rows["slice_psi"].iloc[0])
    prediction_drift = prediction_psi > rules.prediction_psi
    per_slice = predictions[(predictions["slice_column"] != ALL) & (predictions["reference_rows"] >= MIN_SLICE_ROWS) & (predictions["current_rows"] >= MIN_SLICE_ROWS)]
    per_slice = per_slice.drop_duplicates(["slice_column", "slice"]).sort_values("slice_psi", ascending=False)
    max_slice = per_slice.iloc[0] if len(per_slice) else None

    # realised performance of the partition whose labels have matured
    perf = realised_performance(con, tag, as_of, store, locations.staged_dir, mm.version, registry_test_metric(client, tag))

    reasons: list[str] = []
    psi_of = overall.set_index("feature")["psi"]
    if share > rules.drifted_feature_share:
        top = ", ".join(f"{f} {psi_of[f]:.2f}" for f in drifted_features[:5])
        reasons.append(f"{len(drifted_features)}/{len(overall)} features ({share:.0%}) have PSI > {rules.feature_psi}, above {rules.drifted_feature_share:.0%}: {top}")
    if critical:
        reasons.append("critical feature(s) drifted: " + ", ".join(f"{f} PSI {psi_of[f]:.2f}" for f in critical) + f" (> {rules.feature_psi})")
    if prediction_drift:
        reasons.append(
            f"class PSI {prediction_psi:.3f} > {rules.prediction_psi}: {_shares(all_rows, 'reference_share', mm.classes)} "
            f"-> {_shares(all_rows, 'current_share', mm.classes)}"
        )
    if perf.drifted:
        reasons.append(
            f"realised {perf.metric} {perf.realised:.3f} on {perf.partition} ({perf.labels} matured labels) is {perf.drop:.3f} "
            f"below the test {perf.expected:.3f} (> {rules.performance_drop})"
        )
    summary_row = {
        "as_of": as_of,
        "tag": tag.name,
        "model_version": mm.version,
        "producer": mm.producer,
        "reference_as_of": mm.train_as_of,
        "reference_snapshot": str(mm.snapshot_path),
        "reference_population": str(population),
        "reference_rows": profile.rows,
        "current_rows": int(overall["current_rows"].iloc[0]),
        "n_features": len(overall),
        "drifted_features": drifted_features,
        "drifted_feature_share": share,
        "feature_psi_threshold": rules.feature_psi,
        "drifted_feature_share_threshold": rules.drifted_feature_share,
        "critical_features_drifted": critical,
        "feature_drift": feature_drift,
        "prediction_psi": prediction_psi,
        "prediction_psi_threshold": rules.prediction_psi,
        "prediction_drift": prediction_drift,
        "probability_psi": float(all_rows["probability_psi"].max()),
        "max_slice_prediction_psi": float(max_slice["slice_psi"]) if max_slice is not None else None,
        "max_slice": f"{max_slice['slice_column']}={max_slice['slice']}" if max_slice is not None else None,
        "performance_status": perf.status,
        "performance_metric": perf.metric,
        "performance_partition": perf.partition,
        "performance_labels": perf.labels,
        "performance_version": perf.version,
        "realised_metric": perf.realised,
        "expected_metric": perf.expected,
        "performance_drop": perf.drop,
        "performance_drop_threshold": rules.performance_drop,
        "performance_drift": perf.drifted,
        "performance_note": perf.note,
        "training_gap_share": profile.training_gap_share,
        "drifted": bool(feature_drift or prediction_drift or perf.drifted),
        "reasons": reasons,
        "computed_at": datetime.now(UTC),
        "seconds": time.perf_counter() - started,
    }
    job = None
    if report:
        numeric = [f for f in mm.features if mm.kinds[f] != "categorical"]
        categorical = [f for f in mm.features if mm.kinds[f] == "categorical"]
        cols = ", ".join(f"f.{quote(c)}" for c in mm.features)
        # features and the inferred class only: the id orders the sample but is never selected
        current_sample = con.execute(
            f"SELECT {cols}, t.inferred_value AS prediction FROM {parquet(current)} f "
            f"JOIN (SELECT customer_id, inferred_value FROM {parquet(tags_path)} WHERE tag = ?) t ON t.customer_id = f.customer_id "
            f"ORDER BY hash(f.customer_id, {sql_literal(SAMPLE_SALT)}), f.customer_id LIMIT {int(sample_rows)}",
            [tag.name],
        ).df()
        job = ReportJob(
            pd.read_parquet(profile.sample_path), current_sample, numeric, [*categorical, "prediction"],
            rules.drifted_feature_share, locations.report_path(tag.name, as_of),
            {"tag": tag.name, "as_of": as_of.isoformat(), "model": mm.producer, "reference_as_of": mm.train_as_of.isoformat()},
            verdict={k: summary_row[k] for k in VERDICT_KEYS},
        )

    meta = {"as_of": as_of, "tag": tag.name, "model_version": mm.version}
    return TagDrift(summary_row, feats.assign(**meta), predictions.assign(**meta), job)


@dataclass
class DriftRun:
    as_of: date
    results: list[TagDrift]
    paths: dict[str, Path]

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
    report: bool = True,
) -> DriftRun:
    """Drift of every (or the named) model tag for one as_of, written to the history in one go.

    Every tag is computed before anything is written: a tag whose inputs are missing fails the run
    with a named error and leaves the history as it was.
    """
    model_tags = [catalog.get(t) for t in tags] if tags else list(catalog.model_tags)
    not_model = [t.name for t in model_tags if t.kind != "model"]
    if not_model:
        raise DriftInputError(f"drift is monitored for model tags only; {not_model} are rule tags")
    if not model_tags:
        raise DriftInputError("the catalog has no model tags to monitor")
    results = [compute_tag_drift(con, client, catalog, tag, as_of, locations, sample_rows, report) for tag in model_tags]
    jobs = [r for r in results if r.report_job is not None]
    for result, summary in zip(jobs, run_reports([r.report_job for r in jobs])):
        result.attach_report(summary)
        result.report_job = None
    frames = {
        SUMMARY: pd.DataFrame([r.summary for r in results]),
        FEATURES: pd.concat([r.features for r in results], ignore_index=True),
        PREDICTIONS: pd.concat([r.predictions for r in results], ignore_index=True),
    }
    paths = locations.history.write(con, as_of, frames)
    return DriftRun(as_of, results, paths)
