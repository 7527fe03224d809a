"""The Evidently data-drift report of one tag and partition, on a fixed sample of each side.

Evidently's drift preset costs grow with rows x columns (minutes per 100,000 rows x 79 features on
two cores, bench/bench_drift.py), so the report runs on `sample_rows` rows per side (default 5,000)
while the numbers that decide anything (PSI per feature, class PSI, realised performance) are
computed set-based over the whole population in DuckDB. The sample holds the tag's features and the
inferred class (`prediction`) only: no customer id or PII ever reaches the HTML.

Effect of sampling on detection: with more than 1,000 rows Evidently uses distance measures
(normed Wasserstein for numbers, Jensen-Shannon for categories, threshold 0.1) whose sampling error
at 5,000 rows is around 0.01, so only features within about that distance of the threshold can flip;
bench/RESULTS.md reports how often the sample's per-feature verdicts agree with the full data's.

Each saved HTML opens with tagml's own header: which tag, as_of, model version and reference date it
is about, and tagml's verdict with the full-population numbers it is decided on, so that Evidently's
sample-based headline below it cannot be read as the decision. Columns Evidently cannot compute (all
missing on one side) are left out of its part and named in the header; their PSI still counts.
"""

import html
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from tagml.core.storage import atomic_replace

# what the header shows of tagml's decision: keys of the drift summary row (its full-population numbers)
VERDICT_KEYS = (
    "drifted",
    "reasons",
    "current_rows",
    "reference_rows",
    "drifted_feature_share",
    "feature_psi_threshold",
    "drifted_feature_share_threshold",
    "prediction_psi",
    "prediction_psi_threshold",
    "performance_status",
)


@dataclass(frozen=True)
class ReportSummary:
    path: Path
    sample_rows: tuple[int, int]  # reference, current
    drifted_columns: int
    drifted_share: float
    columns: dict[str, dict[str, Any]]  # column -> {method, threshold, value, drifted}
    excluded: dict[str, str] = field(default_factory=dict)  # column -> why Evidently did not see it


def evidently_columns(reference: pd.DataFrame, current: pd.DataFrame, columns: list[str]) -> tuple[list[str], dict[str, str]]:
    """The columns Evidently can compare, and why each other one is left out.

    Evidently raises ("An empty column ... was provided") for a column without a single value on
    either side; such a column went all-missing, which the PSI of the whole population reports as a
    large drift, so the report names it instead of crashing the run.
    """
    usable, excluded = [], {}
    for column in columns:
        empty = [side for side, frame in (("reference", reference), ("current", current)) if frame[column].notna().sum() == 0]
        if empty:
            excluded[column] = f"no values in the {' and '.join(empty)} sample"
        else:
            usable.append(column)
    return usable, excluded


def drift_report(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    numeric: list[str],
    categorical: list[str],
    drift_share: float,
    target: Path,
    metadata: dict[str, str] | None = None,
    verdict: dict[str, Any] | None = None,
) -> ReportSummary:
    """Run Evidently's DataDriftPreset on the two samples and save its HTML, headed by tagml's verdict, at `target` (atomically)."""
    columns = [*numeric, *categorical]
    reference, current = reference[columns].copy(), current[columns].copy()
    for frame in (reference, current):
        frame[numeric] = frame[numeric].astype("float64")
        frame[categorical] = frame[categorical].astype("object")
    usable, excluded = evidently_columns(reference, current, columns)
    # a locked temporary: a report run killed mid-write leaves nothing the next run does not remove
    with atomic_replace(target) as tmp:
        if usable:
            from evidently import (  # ~4 s to import: only where it is used
                DataDefinition,
                Dataset,
                Report,
            )
            from evidently.presets import DataDriftPreset

            num, cat = [c for c in numeric if c in usable], [c for c in categorical if c in usable]
            definition = DataDefinition(numerical_columns=num, categorical_columns=cat)
            report = Report([DataDriftPreset(drift_share=drift_share)], metadata=metadata or {}, include_tests=True)
            snapshot = report.run(
                current_data=Dataset.from_pandas(current[usable], data_definition=definition),
                reference_data=Dataset.from_pandas(reference[usable], data_definition=definition),
            )
            snapshot.save_html(str(tmp))
            result = snapshot.dict()
        else:
            tmp.write_text("<html><head></head><body><p>No column has values on both sides: Evidently was not run.</p></body></html>")
            result = {}
        tmp.write_text(with_header(tmp.read_text(), metadata or {}, verdict, excluded, (len(reference), len(current))))
    summary = summarise(result, target, (len(reference), len(current)))
    return ReportSummary(summary.path, summary.sample_rows, summary.drifted_columns, summary.drifted_share, summary.columns, excluded)


def header_html(metadata: dict[str, str], verdict: dict[str, Any] | None, excluded: dict[str, str], sample_rows: tuple[int, int]) -> str:
    """tagml's block at the top of a report: what the report is about and tagml's decision."""
    e = html.escape
    about = " | ".join(
        f"<b>{e(label)}</b> {e(str(metadata[key]))}"
        for key, label in (
            ("tag", "tag"),
            ("as_of", "as_of"),
            ("model", "model version"),
            ("reference_as_of", "reference (training) date"),
        )
        if metadata.get(key)
    )
    parts = [f"<h2 style='margin:0 0 6px 0'>tagml drift report</h2><div>{about}</div>"]
    if verdict is not None:
        drifted = bool(verdict["drifted"])
        colour = "#b00020" if drifted else "#1b5e20"
        headline = "DRIFTED" if drifted else "no drift (within the catalog's thresholds)"
        parts.append(
            f"<p style='font-size:1.2em;color:{colour};margin:8px 0'><b>tagml's verdict: {e(headline)}</b></p>"
            "<p style='margin:4px 0'>tagml decides on the PSI over the whole population "
            f"({int(verdict['current_rows']):,} customers against {int(verdict['reference_rows']):,} in the reference): "
            f"{verdict['drifted_feature_share']:.0%} of features with PSI &gt; {verdict['feature_psi_threshold']} "
            f"(threshold {verdict['drifted_feature_share_threshold']:.0%}), class PSI {verdict['prediction_psi']:.4f} "
            f"(threshold {verdict['prediction_psi_threshold']}), realised performance: {e(str(verdict['performance_status']))}.</p>"
        )
        reasons = list(verdict.get("reasons") or [])
        if reasons:
            parts.append("<ul style='margin:4px 0'>" + "".join(f"<li>{e(str(r))}</li>" for r in reasons) + "</ul>")
    parts.append(
        f"<p style='margin:4px 0;color:#555'>Below: Evidently's data-drift preset on a fixed sample of {sample_rows[0]:,} reference and "
        f"{sample_rows[1]:,} current rows, with its own tests. Its dataset-level verdict is informative, not tagml's decision.</p>"
    )
    if excluded:
        parts.append(
            "<p style='margin:4px 0'>Not in Evidently's part (its PSI above still counts): "
            + "; ".join(f"{e(c)} ({e(why)})" for c, why in sorted(excluded.items()))
            + "</p>"
        )
    return (
        "<header id='tagml-verdict' style='font-family:sans-serif;padding:12px 16px;border-bottom:2px solid #ccc;background:#fafafa'>"
        + "".join(parts)
        + "</header>"
    )


def with_header(page: str, metadata: dict[str, str], verdict: dict[str, Any] | None, excluded: dict[str, str], sample_rows: tuple[int, int]) -> str:
    """The saved page with tagml's header first in its body and a title naming the tag and as_of."""
    title = html.escape(f"tagml drift: {metadata.get('tag', '')} {metadata.get('as_of', '')}".strip())
    header = header_html(metadata, verdict, excluded, sample_rows)
    page = page.replace("<head>", f"<head><title>{title}</title>", 1)
    body = page.find("<body")
    if body < 0:
        return f"<html><head><title>{title}</title></head><body>{header}{page}</body></html>"
    end = page.index(">", body) + 1
    return page[:end] + header + page[end:]


def summarise(result: dict[str, Any], path: Path, sample_rows: tuple[int, int]) -> ReportSummary:
    """Per-column method, threshold, statistic and verdict from an Evidently snapshot's `dict()`."""
    columns: dict[str, dict[str, Any]] = {}
    count, share = 0, 0.0
    for metric in result.get("metrics", []):
        config = metric.get("config", {})
        kind = config.get("type", "")
        if kind.endswith("DriftedColumnsCount"):
            count, share = int(metric["value"]["count"]), float(metric["value"]["share"])
        elif kind.endswith("ValueDrift"):
            columns[config["column"]] = {"method": config.get("method"), "threshold": config.get("threshold"), "value": float(metric["value"])}
    for test in result.get("tests", []):
        params = test.get("metric_config", {}).get("params", {})
        if params.get("type", "").endswith("ValueDrift") and params.get("column") in columns:
            columns[params["column"]]["drifted"] = test.get("status") == "FAIL"
    return ReportSummary(path=path, sample_rows=sample_rows, drifted_columns=count, drifted_share=share, columns=columns)


@dataclass(frozen=True)
class ReportJob:
    """The arguments of one `drift_report` call."""

    reference: pd.DataFrame
    current: pd.DataFrame
    numeric: list[str]
    categorical: list[str]
    drift_share: float
    target: Path
    metadata: dict[str, str]
    verdict: dict[str, Any] | None = None


def _run(job: ReportJob) -> ReportSummary:
    return drift_report(job.reference, job.current, job.numeric, job.categorical, job.drift_share, job.target, job.metadata, job.verdict)


def report_start_method() -> str:
    """How the report child starts: forked (no re-import of Evidently) unless this process drives Spark.

    A child forked from a Spark driver inherits the py4j gateway's socket and objects, whose finalizers
    then talk to the parent's JVM from the child: it segfaulted in the Spark loop test's drift report.
    """
    if "fork" not in multiprocessing.get_all_start_methods():
        return "spawn"
    pyspark = sys.modules.get("pyspark")
    if pyspark is not None and getattr(getattr(pyspark, "SparkContext", None), "_active_spark_context", None) is not None:
        return "spawn"
    return "fork"


def run_reports(jobs: list[ReportJob]) -> list[ReportSummary]:
    """Run the reports in one child process (forked where that is safe: `report_start_method`).

    Evidently then never runs in the caller's process: its memory is returned when the child exits,
    and a Dagster process that had run Evidently next to DuckDB printed pages of DuckDB "leaked
    instance" warnings at exit (measured; a child that exits does not). One child for all the tags of
    a run pays Evidently's ~4 s import once.
    """
    if not jobs:
        return []
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context(report_start_method())) as pool:
        return list(pool.map(_run, jobs))
