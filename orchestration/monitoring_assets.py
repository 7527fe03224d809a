"""tag_drift: per as_of, every model tag's feature, prediction and performance drift, with one
non-blocking asset check per tag that turns red (ERROR) when the tag's catalog thresholds are crossed."""

from contextlib import closing
from datetime import date
from pathlib import Path

import dagster as dg
import pandas as pd
from pydantic import Field

from tagml.monitoring.decision import describe_rules
from tagml.monitoring.drift import DriftRun, compute_drift
from tagml.monitoring.reevaluation import drift_verdict
from tagml.monitoring.reference import DriftInputError
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
    report: bool = Field(default=True, description="Write the Evidently HTML report (the PSI numbers are computed either way).")


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
        deps=["customer_tags", *feature_deps(catalog)],
        check_specs=checks,
        kinds={"evidently", "duckdb", "parquet"},
        description="Per model tag: PSI of every feature and of the inferred classes against the population the scoring model was trained on, "
        "realised performance of matured labels, an Evidently report; numbers in the drift history.",
    )
    def tag_drift(
        context: dg.AssetExecutionContext,
        config: DriftConfig,
        warehouse: WarehouseResource,
        mlflow_store: MlflowResource,
        monitoring: MonitoringResource,
    ):
        as_of = date.fromisoformat(context.partition_key)
        sample_rows = config.sample_rows or monitoring.sample_rows
        with closing(warehouse.connect()) as con:
            try:
                run = compute_drift(
                    con,
                    mlflow_store.client(),
                    catalog,
                    as_of,
                    monitoring.locations(warehouse),
                    config.tags,
                    sample_rows,
                    config.report,
                    bin_counter=warehouse.drift_bin_counter(),
                )
            except (DriftInputError, KeyError) as err:
                raise dg.Failure(description=str(err)) from err
        metadata: dict = {
            "as_of": as_of.isoformat(),
            "drifted_tags": dg.MetadataValue.json([r.tag for r in run.results if r.drifted]),
            "summary": dg.MetadataValue.md(_summary_markdown(run)),
            "history": dg.MetadataValue.path(str(run.paths["drift_summary"])),
            DRIFT_BY_TAG: dg.MetadataValue.json({r.tag: drift_verdict(r.drifted, r.reasons) for r in run.results}),
        }
        for result in run.results:
            if result.summary.get("report_path"):
                metadata[f"report_{result.tag}"] = dg.MetadataValue.path(result.summary["report_path"])
                # a link the UI opens (the report is a local file next to the warehouse)
                metadata[f"report_{result.tag}_url"] = dg.MetadataValue.url(Path(result.summary["report_path"]).resolve().as_uri())
        yield dg.MaterializeResult(metadata=metadata)
        computed = {r.tag: r.summary for r in run.results}
        stored = _stored_summaries(warehouse, monitoring, as_of, [t.name for t in catalog.model_tags if t.name not in computed])
        for tag in catalog.model_tags:
            yield _check_result(tag.name, computed.get(tag.name) or stored.get(tag.name), fresh=tag.name in computed)

    return tag_drift


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
