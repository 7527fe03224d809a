"""Realised performance of a tag whose labels arrive late (churn in the next 90 days).

On as_of D, the outcomes observed at D - delay are known. The tag-store partition of that date (or
the nearest earlier one) holds what the model then said; joining it to the labels with
label_date = that partition's as_of and known_date <= D gives the model's real performance on a
date it had not seen, to compare with the test metric recorded on the version at registration.
"""

from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
from mlflow.tracking import MlflowClient

from tagml.core.storage import sql_literal
from tagml.monitoring.decision import performance_drifted
from tagml.scoring.sources import known_labels_sql
from tagml.scoring.store import TagStore
from tagml.training.catalog import TagSpec
from tagml.training.evaluate import core_metrics
from tagml.training.registry import LOWER_IS_BETTER
from tagml.training.versions import parse_version, registered_model_name

MIN_LABELS = 50  # below this the realised metric is reported but never flags drift


@dataclass(frozen=True)
class RealisedPerformance:
    status: str  # measured | not monitored | no partition | no matured labels | too few labels
    metric: str
    partition: date | None = None
    labels: int = 0
    version: str | None = None
    realised: float | None = None
    expected: float | None = None
    drop: float | None = None
    drifted: bool = False
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def realised_performance(
    con: duckdb.DuckDBPyConnection,
    tag: TagSpec,
    as_of: date,
    store: TagStore,
    staged_dir: Path,
    current_version: str,
    expected_metric: Callable[[str], float | None],
    decision_threshold: Callable[[str], float | None] | None = None,
) -> RealisedPerformance:
    """The promotion metric on the matured labels of the partition `label_delay_days` before `as_of`.

    `expected_metric(version)` gives the test metric recorded on a version (see `registry_test_metric`);
    `decision_threshold(version)` a binary tag's threshold (see `registry_decision_threshold`), at which the
    class-decision metrics are measured as the gate measured them.
    """
    metric = tag.promotion.metric
    delay = tag.drift.label_delay_days
    if not delay:
        return RealisedPerformance("not monitored", metric, note="labels arrive with the record (drift.label_delay_days = 0)")
    target = as_of - timedelta(days=delay)
    earlier = [d for d in store.partitions() if d <= target]
    if not earlier:
        return RealisedPerformance("no partition", metric, note=f"no tag partition on or before {target} to compare outcomes with")
    partition = earlier[-1]
    rows = _matured_outcomes(con, tag, as_of, store, staged_dir, partition)
    if not rows:
        return RealisedPerformance(
            "no matured labels",
            metric,
            partition=partition,
            note=f"no {tag.label_tag} labels dated {partition} known by {as_of}",
        )
    versions = sorted({r[2] for r in rows if r[2] is not None})
    version = max(versions, key=lambda v: sum(r[2] == v for r in rows)) if versions else None
    classes = list(tag.classes)
    index = {c: k for k, c in enumerate(classes)}
    kept = [r for r in rows if r[0] in index and r[1]]
    y = np.array([index[r[0]] for r in kept])
    proba = np.array([[dict(r[1]).get(c, 0.0) for c in classes] for r in kept], dtype="float64")
    expected = expected_metric(version) if version is not None else None
    if len(kept) < MIN_LABELS or len(np.unique(y)) < 2:
        return RealisedPerformance(
            "too few labels",
            metric,
            partition=partition,
            labels=len(kept),
            version=version,
            expected=expected,
            note=f"{len(kept)} matured labels ({len(np.unique(y))} classes); at least {MIN_LABELS} of two classes are needed",
        )
    threshold = decision_threshold(version) if decision_threshold is not None and version is not None else None
    realised = core_metrics(y, proba, len(classes), threshold)[metric]
    drop = None if expected is None else (realised - expected if metric in LOWER_IS_BETTER else expected - realised)
    drifted, note = performance_drifted(drop, tag.drift, version, str(current_version))
    return RealisedPerformance(
        "measured",
        metric,
        partition=partition,
        labels=len(kept),
        version=version,
        realised=float(realised),
        expected=expected,
        drop=None if drop is None else float(drop),
        drifted=drifted,
        note=note,
    )


def registry_test_metric(client: MlflowClient, tag: TagSpec) -> Callable[[str], float | None]:
    """The promotion metric each version recorded on its test set at registration (tag test_<metric>)."""

    def lookup(version: str) -> float | None:
        mv = client.get_model_version(registered_model_name(tag.name), version)
        return parse_version(tag.name, mv).test_metrics.get(tag.promotion.metric)

    return lookup


def registry_decision_threshold(client: MlflowClient, tag: TagSpec) -> Callable[[str], float | None]:
    """The decision threshold each version recorded at registration (None: the most probable class)."""

    def lookup(version: str) -> float | None:
        mv = client.get_model_version(registered_model_name(tag.name), version)
        return parse_version(tag.name, mv).decision_threshold

    return lookup


def _matured_outcomes(con: duckdb.DuckDBPyConnection, tag: TagSpec, as_of: date, store: TagStore, staged_dir: Path, partition: date) -> list[tuple]:
    """(label, probabilities, model version) per customer: the labels dated `partition` known by `as_of`
    (from the tag's own labels file for a bring-your-own tag), joined to what the tag store said on that partition."""
    return con.execute(
        f"SELECT l.label, t.probabilities, t.model_version FROM "
        f"(SELECT customer_id::VARCHAR AS customer_id, arg_max(label, known_date) AS label FROM ({known_labels_sql(tag, as_of, staged_dir)}) "
        f"WHERE label_date = DATE {sql_literal(partition)} GROUP BY 1) l "
        f"JOIN {store.read_sql(partition)} t ON t.customer_id = l.customer_id AND t.tag = ?",
        [tag.name],
    ).fetchall()
