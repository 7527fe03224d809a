"""tag_drift: per as_of, every model tag's feature, prediction and performance drift, with one
non-blocking asset check per tag that turns red (ERROR) when the tag's catalog thresholds are crossed.

The PSI and the decisions run for every tag every night; the Evidently report only as the report
policy says (monitoring/report_policy.py, TAGML_DRIFT_REPORT: by default a drifted tag's report that
night and every tag's on the weekly day), and the materialization says which path ran and why.

A backfill of a range of as_of partitions runs as one Dagster run (BackfillPolicy.single_run,
orchestration/partitions.py): the body computes every night of `context.partition_keys` in one
`compute_drifts` call (one Evidently child for all the reports, each reference profiled once).
Dagster records one materialization per partition of a range with the same metadata, so a range's
per-tag verdicts are keyed by as_of (`drift_by_tag` = {BY_AS_OF: {as_of: {tag: verdict}}}, read by
monitoring/reevaluation.py's `events_from_result`), and each tag's check covers the whole range.
"""

from contextlib import closing
from datetime import date
from pathlib import Path

import dagster as dg
import pandas as pd
from pydantic import Field

from tagml.monitoring.decision import describe_rules
from tagml.monitoring.drift import DriftRun, compute_drifts
from tagml.monitoring.reevaluation import BY_AS_OF, drift_verdict
from tagml.monitoring.reference import DriftInputError
from tagml.orchestration.partitions import SINGLE_RUN_BACKFILL, as_of_dates
from tagml.orchestration.resources import (
    MlflowResource,
    MonitoringResource,
    WarehouseResource,
)
from tagml.orchestration.scoring_assets import feature_deps
from tagml.training.catalog import Catalog

MONITORING_GROUP = "monitoring"
# The per-tag verdicts of the tags computed in a run, in tag_drift's metadata: what the drift sensor
# plans from (aggregates and reasons only, never customer values).
DRIFT_BY_TAG = "drift_by_tag"


class DriftConfig(dg.Config):
    tags: list[str] | None = Field(default=None, description="Model tags to monitor (default: every model tag of the catalog).")
    sample_rows: int | None = Field(default=None, description="Rows per side in the Evidently report (default from TAGML_DRIFT_SAMPLE_ROWS).")
    report: bool | None = Field(
        default=None,
        description="Evidently HTML reports: None = the monitoring resource's policy (TAGML_DRIFT_REPORT), True = every tag's now "
        "(e.g. on demand for a stored partition), False = none. The PSI numbers and decisions are computed either way.",
    )


def drift_check_name(tag: str) -> str:
    return f"{tag}_drift"


def _summary_markdown(run: DriftRun) -> str:
    frame = pd.DataFrame(
        [
            {
                "tag": r.tag,
                "model": r.summary["producer"],
                "drifted": "DRIFTED" if r.drifted else "ok",
                "drifted features": f"{r.summary['drifted_feature_share']:.0%} (> {r.summary['drifted_feature_share_threshold']:.0%})",
                "class PSI": f"{r.summary['prediction_psi']:.4f} (> {r.summary['prediction_psi_threshold']})",
                "realised": r.summary["performance_status"]
                if r.summary["realised_metric"] is None
                else f"{r.summary['performance_metric']} {r.summary['realised_metric']:.3f} vs {r.summary['expected_metric']:.3f}",
                "worst slice": f"{r.summary['max_slice']} ({r.summary['max_slice_prediction_psi']:.4f})" if r.summary["max_slice"] else "",
            }
            for r in run.results
        ]
    )
    return frame.to_markdown(index=False)


def build_tag_drift_asset(partitions_def: dg.PartitionsDefinition, catalog: Catalog) -> dg.AssetsDefinition:
    checks = [
        dg.AssetCheckSpec(
            drift_check_name(tag.name),
            asset="tag_drift",
            blocking=False,  # a drifted tag is news for its owner, not a reason to stop anything downstream
            description=f"{tag.name}: {describe_rules(tag.drift, tag.promotion.metric)}",
        )
        for tag in catalog.model_tags
    ]

    @dg.asset(
        name="tag_drift",
        group_name=MONITORING_GROUP,
        partitions_def=partitions_def,
        backfill_policy=SINGLE_RUN_BACKFILL,
        deps=["customer_tags", *feature_deps(catalog)],
        check_specs=checks,
        kinds={"evidently", "duckdb", "parquet"},
        description="Per model tag: PSI of every feature and of the inferred classes against the population the scoring model was trained on, "
        "realised performance of matured labels, an Evidently report (by the report policy); numbers in the drift history.",
    )
    def tag_drift(
        context: dg.AssetExecutionContext,
        config: DriftConfig,
        warehouse: WarehouseResource,
        mlflow_store: MlflowResource,
        monitoring: MonitoringResource,
    ):
        as_ofs = as_of_dates(context)
        sample_rows = config.sample_rows or monitoring.sample_rows
        policy = monitoring.report_policy if config.report is None else config.report
        with closing(warehouse.connect()) as con:
            try:
                runs = compute_drifts(
                    con,
                    mlflow_store.client(),
                    catalog,
                    as_ofs,
                    monitoring.locations(warehouse),
                    config.tags,
                    sample_rows,
                    policy,
                    bin_counter=warehouse.drift_bin_counter(),
                    report_weekday=monitoring.report_weekday,
                )
            except (DriftInputError, KeyError, ValueError) as err:
                raise dg.Failure(description=str(err)) from err
        yield dg.MaterializeResult(metadata=_metadata(runs))
        newest = runs[-1]
        computed = {r.tag: r.summary for r in newest.results}
        stored = _stored_summaries(warehouse, monitoring, newest.as_of, [t.name for t in catalog.model_tags if t.name not in computed])
        for tag in catalog.model_tags:
            check = _check_result(tag.name, computed.get(tag.name) or stored.get(tag.name), fresh=tag.name in computed)
            yield check if len(runs) == 1 else _range_check(check, tag.name, runs)

    return tag_drift


def _metadata(runs: list[DriftRun]) -> dict:
    """One night's metadata as before #14; a range's keyed by as_of where it differs between nights (Dagster copies it to each partition)."""
    newest = runs[-1]
    plans = {run.as_of.isoformat(): run.report_plan for run in runs}
    metadata: dict = {
        "as_of": newest.as_of.isoformat() if len(runs) == 1 else f"{runs[0].as_of.isoformat()}..{newest.as_of.isoformat()}",
        "partitions": len(runs),
        "drifted_tags": dg.MetadataValue.json(
            [r.tag for r in newest.results if r.drifted] if len(runs) == 1 else {d: [r.tag for r in run.results if r.drifted] for d, run in _by_day(runs)}
        ),
        "summary": dg.MetadataValue.md(
            "\n\n".join(f"**{d}**\n\n{_summary_markdown(run)}" if len(runs) > 1 else _summary_markdown(run) for d, run in _by_day(runs))
        ),
        "history": dg.MetadataValue.path(str(newest.paths["drift_summary"])),
        # which report path ran and why (the PSI and the decisions above ran for every tag either way)
        "report_policy": newest.report_plan.policy if newest.report_plan else "always",
        "evidently_processes": newest.report_processes,  # one for a whole range: Evidently imported once
        "reports": dg.MetadataValue.json({d: list(p.tags) if p else [] for d, p in plans.items()}),
        "report_why": dg.MetadataValue.json({d: p.why if p else "" for d, p in plans.items()})
        if len(runs) > 1
        else (newest.report_plan.why if newest.report_plan else ""),
        DRIFT_BY_TAG: dg.MetadataValue.json(
            _verdicts(newest) if len(runs) == 1 else {BY_AS_OF: {d: _verdicts(run) for d, run in _by_day(runs)}},
        ),
    }
    for result in newest.results if len(runs) == 1 else []:
        if result.summary.get("report_path"):
            metadata[f"report_{result.tag}"] = dg.MetadataValue.path(result.summary["report_path"])
            # a link the UI opens (the report is a local file next to the warehouse)
            metadata[f"report_{result.tag}_url"] = dg.MetadataValue.url(Path(result.summary["report_path"]).resolve().as_uri())
    if len(runs) > 1:
        paths = {f"{d}/{r.tag}": r.summary["report_path"] for d, run in _by_day(runs) for r in run.results if r.summary.get("report_path")}
        metadata["report_paths"] = dg.MetadataValue.json(paths)
    return metadata


def _by_day(runs: list[DriftRun]) -> list[tuple[str, DriftRun]]:
    return [(run.as_of.isoformat(), run) for run in runs]


def _verdicts(run: DriftRun) -> dict:
    return {r.tag: drift_verdict(r.drifted, r.reasons) for r in run.results}


def _range_check(newest: dg.AssetCheckResult, tag: str, runs: list[DriftRun]) -> dg.AssetCheckResult:
    """A tag's check over a backfilled range: red when the tag drifted on any night (Dagster takes one result per check and run)."""
    evaluated = [run for run in runs if any(r.tag == tag for r in run.results)]
    if not evaluated:
        return newest
    drifted = [run.as_of.isoformat() for run in evaluated if run.result(tag).drifted]
    return dg.AssetCheckResult(
        check_name=newest.check_name,
        passed=not drifted,
        severity=dg.AssetCheckSeverity.ERROR,
        description=(
            f"drifted on {len(drifted)} of {len(evaluated)} nights: {', '.join(drifted)}"
            if drifted
            else f"within the catalog's drift thresholds on all {len(evaluated)} nights"
        )
        + f"; the newest ({runs[-1].as_of.isoformat()}): {newest.description}",
        metadata={**newest.metadata, "nights": len(evaluated), "drifted_nights": dg.MetadataValue.json(drifted)},
    )


def _stored_summaries(warehouse: WarehouseResource, monitoring: MonitoringResource, as_of: date, tags: list[str]) -> dict[str, dict]:
    """Summary rows already in the history for tags this run did not recompute (config.tags)."""
    if not tags:
        return {}
    from tagml.monitoring.history import DriftHistoryError

    with closing(warehouse.connect()) as con:
        try:
            frame = monitoring.locations(warehouse).history.summary(con, as_of)
        except DriftHistoryError:
            return {}
    return {row["tag"]: row for row in frame.to_dict("records") if row["tag"] in tags}


def _number(value) -> float | None:
    return None if value is None or pd.isna(value) else float(value)


def _check_result(tag: str, summary: dict | None, fresh: bool) -> dg.AssetCheckResult:
    """A drifted tag's check fails with ERROR severity (red); it never blocks anything downstream."""
    if summary is None:
        # a run for other tags, and nothing stored for this one: say so rather than claim a verdict
        return dg.AssetCheckResult(
            check_name=drift_check_name(tag),
            passed=True,
            severity=dg.AssetCheckSeverity.WARN,
            description="not evaluated in this run (config.tags) and no stored result for this partition",
            metadata={"evaluated": False},
        )
    reasons = list(summary["reasons"])
    realised = _number(summary.get("realised_metric"))
    return dg.AssetCheckResult(
        check_name=drift_check_name(tag),
        passed=not bool(summary["drifted"]),
        severity=dg.AssetCheckSeverity.ERROR,
        description=("; ".join(reasons) or "within the catalog's drift thresholds") + ("" if fresh else " (stored result, not recomputed in this run)"),
        metadata={
            "model": summary["producer"],
            "reference_as_of": str(summary["reference_as_of"])[:10],
            "drifted_feature_share": round(float(summary["drifted_feature_share"]), 4),
            "drifted_feature_share_threshold": float(summary["drifted_feature_share_threshold"]),
            "drifted_features": dg.MetadataValue.json([str(f) for f in list(summary["drifted_features"])[:20]]),
            "critical_features_drifted": dg.MetadataValue.json([str(f) for f in list(summary["critical_features_drifted"])]),
            "prediction_psi": round(float(summary["prediction_psi"]), 5),
            "prediction_psi_threshold": float(summary["prediction_psi_threshold"]),
            "performance": str(summary["performance_status"]),
            **({"realised_metric": round(realised, 4)} if realised is not None else {}),
            **(
                {"report": dg.MetadataValue.path(summary["report_path"]), "report_url": dg.MetadataValue.url(Path(summary["report_path"]).resolve().as_uri())}
                if isinstance(summary.get("report_path"), str)
                else {}
            ),
        },
    )
