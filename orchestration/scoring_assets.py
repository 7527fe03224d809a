"""customer_tags: every customer's catalog tags for one as_of, each tag scored from its own feature
source (customer_features, or a bring-your-own tag's `<tag>/own_features`) by its champion."""

from contextlib import closing
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import dagster as dg
import pandas as pd
from pydantic import Field

from tagml.orchestration.own_table_assets import own_features_key
from tagml.orchestration.partitions import SINGLE_RUN_BACKFILL, as_of_dates
from tagml.orchestration.resources import MlflowResource, WarehouseResource
from tagml.orchestration.training_assets import tag_model_key
from tagml.scoring.coverage import unstable_tags
from tagml.scoring.score import CoverageError, ScoringError, ScoringSummary, UnscorableTagsError
from tagml.scoring.sources import needs_contract, own_features_table, own_tags
from tagml.training.catalog import Catalog

SCORING_GROUP = "scoring"


CHECK_SPECS = [
    dg.AssetCheckSpec(
        "coverage",
        asset="customer_tags",
        blocking=True,
        description="Every customer of the snapshot has every catalog tag exactly once, with a value among the tag's classes "
        "(or 'unknown' below its min_confidence). Checked on the scored file before it replaces the partition.",
    ),
    dg.AssetCheckSpec(
        "stability",
        asset="customer_tags",
        blocking=False,
        description="No tag changed value for more customers since the previous partition than its catalog's drift.max_changed_share.",
    ),
]


class ScoringConfig(dg.Config):
    skip_tags: list[str] = Field(
        default_factory=list,
        description="Publish the partition without these tags (e.g. one whose own table is late); recorded in the metadata as skipped_tags with skip_reason.",
    )
    skip_reason: str | None = Field(default=None, description="Why skip_tags are left out (required with skip_tags).")
    refresh_all: bool = Field(
        default=False,
        description="Infer every model tag for every customer tonight, whatever its catalog refresh (e.g. after a feature fix). "
        "Otherwise a weekly, monthly or quarterly tag keeps the inferences its period already made (from the previous partition) "
        "and infers only the customers without one; the metadata's `refresh` says, per tag, how many rows each way and why.",
    )
    reuse_unchanged: bool = Field(
        default=False,
        description="Reuse the previous partition's model output, exactly, for customers whose tree-model input crossed no split since "
        "(the partition is the same either way). Off by default: it pays only where most customers keep their split intervals "
        "overnight (inputs that move by month); with day-granular recency features few do, and loading last night's output "
        "then costs more than it saves (bench/RESULTS.md).",
    )


def feature_deps(catalog: Catalog) -> list:
    """The feature assets the catalog's tags are scored from: customer_features only when some tag reads it."""
    return [*(["customer_features"] if needs_contract(catalog) else []), *(own_features_key(t.name) for t in own_tags(catalog))]


@dataclass
class _ScoredNight:
    as_of: date
    summary: ScoringSummary
    distribution: pd.DataFrame
    changed: dict[str, float]
    unstable: dict[str, float]
    previous: date | None


def build_customer_tags_asset(partitions_def: dg.PartitionsDefinition, catalog: Catalog) -> dg.AssetsDefinition:
    @dg.asset(
        name="customer_tags",
        group_name=SCORING_GROUP,
        partitions_def=partitions_def,
        backfill_policy=SINGLE_RUN_BACKFILL,
        deps=[*feature_deps(catalog), *(tag_model_key(t.name) for t in catalog.model_tags)],
        check_specs=CHECK_SPECS,
        kinds={"parquet", "mlflow"},
        description="Every customer's rule and model tags for the as_of: value, class probabilities, reasons, observed vs inferred, and the model or rule version.",
    )
    def customer_tags(context: dg.AssetExecutionContext, config: ScoringConfig, warehouse: WarehouseResource, mlflow_store: MlflowResource):
        if config.skip_tags and not (config.skip_reason or "").strip():
            raise dg.Failure(description=f"skip_tags {config.skip_tags} needs a skip_reason (it is recorded with the partition)")
        skip = dict.fromkeys(config.skip_tags, config.skip_reason or "")
        store = warehouse.tag_store()
        nights: list[_ScoredNight] = []
        with closing(warehouse.connect()) as con:
            client = mlflow_store.client() if catalog.model_tags else None
            # a backfill's range in one run, oldest first: each night's stability compares with the night before it
            for as_of in as_of_dates(context):
                features = warehouse.features_path(as_of) if needs_contract(catalog) else None
                own = {t.name: own_features_table(Path(warehouse.warehouse_dir), t.name).path(as_of) for t in own_tags(catalog)}
                try:
                    with store.write_partition(as_of) as staged:
                        summary = warehouse.score_partition(
                            con,
                            client,
                            catalog,
                            features,
                            as_of,
                            staged,
                            own_features=own,
                            skip=skip,
                            previous_partition=store.partition_before(as_of),
                            honour_refresh=not config.refresh_all,
                            reuse_unchanged=config.reuse_unchanged,
                        )
                except UnscorableTagsError as err:
                    raise dg.Failure(description=f"{as_of}: {err}", metadata={"failed_tags": dg.MetadataValue.json(err.problems)}) from err
                except CoverageError as err:
                    # the file that failed was never published; report what was validated, then fail the step
                    yield dg.AssetCheckResult(check_name="coverage", passed=False, metadata=err.coverage.metadata(), description=str(err))
                    raise dg.Failure(description=str(err)) from err
                except ScoringError as err:
                    raise dg.Failure(description=str(err)) from err
                previous = [d for d in store.partitions() if d < as_of]
                changed = store.changed_share(con, previous[-1], as_of) if previous else {}
                nights.append(
                    _ScoredNight(as_of, summary, store.distribution(con, as_of), changed, unstable_tags(changed, catalog), previous[-1] if previous else None)
                )
        warehouse.publish_views()
        if len(nights) == 1:
            night = nights[0]
            yield dg.MaterializeResult(
                metadata=_night_metadata(store, night),
                check_results=[
                    dg.AssetCheckResult(check_name="coverage", passed=night.summary.coverage.passed, metadata=night.summary.coverage.metadata()),
                    _stability_result(night.changed, night.unstable, night.previous),
                ],
            )
            return
        # a range: Dagster records this metadata on every partition of the range, so it is keyed by as_of
        unstable = {f"{n.as_of}:{tag}": share for n in nights for tag, share in n.unstable.items()}
        yield dg.MaterializeResult(
            metadata={
                "partitions": len(nights),
                "as_of": f"{nights[0].as_of}..{nights[-1].as_of}",
                "seconds": round(sum(n.summary.seconds for n in nights), 1),
                "by_as_of": dg.MetadataValue.json(
                    {
                        n.as_of.isoformat(): {
                            "rows": n.summary.rows,
                            "customers": n.summary.customers,
                            "seconds": round(n.summary.seconds, 1),
                            "reuse": _reuse(n.summary),
                            "refresh": _refresh(n.summary),
                        }
                        for n in nights
                    }
                ),
                "changed_share_since_previous": dg.MetadataValue.json({n.as_of.isoformat(): n.changed for n in nights}),
                "skipped_tags": dg.MetadataValue.json(nights[-1].summary.skipped),
            },
            check_results=[
                dg.AssetCheckResult(
                    check_name="coverage",
                    passed=all(n.summary.coverage.passed for n in nights),
                    metadata={"partitions": len(nights), **nights[-1].summary.coverage.metadata()},
                ),
                _stability_result({f"{n.as_of}:{tag}": share for n in nights for tag, share in n.changed.items()}, unstable, nights[0].previous),
            ],
        )

    return customer_tags


def _refresh(summary: ScoringSummary) -> dict:
    return {t: v["refresh"] for t, v in summary.per_tag.items() if "refresh" in v}


def _reuse(summary: ScoringSummary) -> dict:
    return {t: v["reuse"] for t, v in summary.per_tag.items() if "reuse" in v}


def _night_metadata(store, night: "_ScoredNight") -> dict:
    summary = night.summary
    return {
        "rows": summary.rows,
        "customers": summary.customers,
        "path": dg.MetadataValue.path(store.location(night.as_of)),
        "producers": dg.MetadataValue.json({t: v["producer"] for t, v in summary.per_tag.items()}),
        # labels a source delivered outside the tag's classes: counted, never stored as values
        "observed_labels_outside_classes": dg.MetadataValue.json(
            {t: v["observed_labels_outside_classes"] for t, v in summary.per_tag.items() if v.get("observed_labels_outside_classes")}
        ),
        "seconds": round(summary.seconds, 1),
        # per model tag: rows whose output was the previous partition's (reused) and rows scored again, or why not
        "reuse": dg.MetadataValue.json(_reuse(summary)),
        # per model tag: rows that kept the refresh period's inference and rows inferred tonight, or why all were
        "refresh": dg.MetadataValue.json(_refresh(summary)),
        "skipped_tags": dg.MetadataValue.json(summary.skipped),
        "distribution": dg.MetadataValue.md(night.distribution.to_markdown(index=False)),
        "changed_share_since_previous": dg.MetadataValue.json(night.changed),
        "previous_partition": night.previous.isoformat() if night.previous else "none",
    }


def _stability_result(changed: dict[str, float], unstable: dict[str, float], previous: date | None) -> dg.AssetCheckResult:
    if unstable:
        description = "; ".join(f"{tag}: {share:.1%} of customers changed value since {previous}" for tag, share in unstable.items())
    else:
        description = "no previous partition" if previous is None else f"within each tag's max_changed_share since {previous}"
    return dg.AssetCheckResult(
        check_name="stability",
        passed=not unstable,
        severity=dg.AssetCheckSeverity.WARN,
        description=description,
        metadata={"changed_share": dg.MetadataValue.json(changed), "unstable_tags": dg.MetadataValue.json(sorted(unstable))},
    )
