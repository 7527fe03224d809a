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
"""

import multiprocessing
import os
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd


@dataclass(frozen=True)
class ReportSummary:
    path: Path
    sample_rows: tuple[int, int]  # reference, current
    drifted_columns: int
    drifted_share: float
    columns: dict[str, dict[str, Any]]  # column -> {method, threshold, value, drifted}


def drift_report(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    numeric: list[str],
    categorical: list[str],
    drift_share: float,
    target: Path,
    metadata: dict[str, str] | None = None,
) -> ReportSummary:
    """Run Evidently's DataDriftPreset on the two samples and save its HTML at `target` (atomically)."""
    from evidently import DataDefinition, Dataset, Report  # ~4 s to import: only where it is used
    from evidently.presets import DataDriftPreset

    columns = [*numeric, *categorical]
    reference, current = reference[columns].copy(), current[columns].copy()
    for frame in (reference, current):
        frame[numeric] = frame[numeric].astype("float64")
        frame[categorical] = frame[categorical].astype("object")
    definition = DataDefinition(numerical_columns=numeric, categorical_columns=categorical)
    report = Report([DataDriftPreset(drift_share=drift_share)], metadata=metadata or {}, include_tests=True)
    snapshot = report.run(
        current_data=Dataset.from_pandas(current, data_definition=definition),
        reference_data=Dataset.from_pandas(reference, data_definition=definition),
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.stem}.{uuid.uuid4().hex}.tmp.html")
    try:
        snapshot.save_html(str(tmp))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return summarise(snapshot.dict(), target, (len(reference), len(current)))


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


def _run(job: ReportJob) -> ReportSummary:
    return drift_report(job.reference, job.current, job.numeric, job.categorical, job.drift_share, job.target, job.metadata)


def run_reports(jobs: list[ReportJob]) -> list[ReportSummary]:
    """Run the reports in one child process (forked where the platform allows).

    Evidently then never runs in the caller's process: its memory is returned when the child exits,
    and a Dagster process that had run Evidently next to DuckDB printed pages of DuckDB "leaked
    instance" warnings at exit (measured; a child that exits does not). One child for all the tags of
    a run pays Evidently's ~4 s import once.
    """
    if not jobs:
        return []
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context(method)) as pool:
        return list(pool.map(_run, jobs))
