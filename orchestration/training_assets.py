"""Per model tag, generated from the catalog: `<tag>/training_set` -> `<tag>/tag_model`, whose blocking
`promotion_gate` check records the champion/challenger decision."""

from contextlib import closing
from datetime import date
from typing import Any

import dagster as dg
from mlflow.tracking import MlflowClient
from pydantic import Field

from tagml.core.settings import home_relative, resolve_home_path
from tagml.monitoring.stability import score_stability
from tagml.orchestration.raw_assets import raw_asset_name
from tagml.orchestration.resources import MlflowResource, WarehouseResource
from tagml.scoring.rules import slice_expressions
from tagml.training.catalog import Catalog, TagSpec
from tagml.training.dataset import (
    LABEL_COLUMN,
    SPLIT_COLUMN,
    TrainingSet,
    build_training_set,
    default_train_as_of,
    load_training_set,
)
from tagml.training.evaluate import slice_sources
from tagml.training.fairness import load_demographics
from tagml.training.model_card import ModelCard, card_location, log_model_card
from tagml.training.registry import GateDecision, apply_gate, evaluate_gate
from tagml.training.tracking import model_version_url, run_url, ui_base_url
from tagml.training.train import TrainResult, train_tag
from tagml.training.versions import registered_model_name

TRAINING_GROUP = "training"


class TrainingConfig(dg.Config):
    train_as_of: str | None = Field(
        default=None, description="Use labels known on this date (YYYY-MM-DD). Default: the newest known_date of the tag's labels file, else of tag_labels."
    )
    trials: int | None = Field(default=None, description="Override the catalog's Optuna trial budget (e.g. 2 for a smoke run).")
    seed: int = Field(default=0, description="Seed for the split, Optuna's sampler and the models.")


def training_set_key(tag: str) -> dg.AssetKey:
    return dg.AssetKey([tag, "training_set"])


def tag_model_key(tag: str) -> dg.AssetKey:
    return dg.AssetKey([tag, "tag_model"])


def build_training_assets(tag: TagSpec, catalog: Catalog) -> list[dg.AssetsDefinition]:
    return [_training_set_asset(tag), _tag_model_asset(tag, catalog)]


def _training_set_asset(tag: TagSpec) -> dg.AssetsDefinition:
    @dg.asset(
        key=training_set_key(tag.name),
        group_name=TRAINING_GROUP,
        deps=[raw_asset_name("tag_labels"), raw_asset_name("customers"), raw_asset_name("transactions")],
        description=f"{tag.name}: labels joined to point-in-time features at each label's date, split {tag.split.method}.",
        kinds={"duckdb", "parquet"},
    )
    def training_set(context: dg.AssetExecutionContext, config: TrainingConfig, warehouse: WarehouseResource) -> dg.Output[str]:
        train_as_of = date.fromisoformat(config.train_as_of) if config.train_as_of else default_train_as_of(tag, warehouse.staged_dir)
        with closing(warehouse.connect()) as con:
            data = build_training_set(con, warehouse.staged_dir, tag, train_as_of, warehouse.training_sets_dir, seed=config.seed)
        balance = data.frame.groupby([SPLIT_COLUMN, LABEL_COLUMN]).size().unstack(fill_value=0)
        return dg.Output(
            home_relative(data.snapshot_path),
            metadata={
                "rows": len(data.frame),
                "train_as_of": train_as_of.isoformat(),
                "snapshot_id": data.snapshot_id,
                "snapshot_path": dg.MetadataValue.path(str(data.snapshot_path)),
                "features": len(data.feature_names),
                "dropped_labels": data.dropped_labels,
                "unknown_labels": data.unknown_labels,  # count per label value outside the classes
                "class_balance": dg.MetadataValue.md(balance.to_markdown()),
                # every column of the feature source, used or excluded and why (names only, never values)
                "columns": dg.MetadataValue.md(data.audit.markdown()),
                "column_counts": data.audit.counts(),
                "max_single_feature_auc": _max_single_feature_auc(data),
            },
        )

    return training_set


def _max_single_feature_auc(data: TrainingSet) -> dict[str, Any]:
    """The feature that alone predicts the label best, as the leakage guard measured it (its threshold: the tag's leakage spec)."""
    scored = [d for d in data.audit.decisions if d.single_feature_auc is not None]
    best = max(scored, key=lambda d: d.single_feature_auc, default=None)
    return {"column": best.column, "auc": round(best.single_feature_auc, 4)} if best else {}


def _tag_model_asset(tag: TagSpec, catalog: Catalog) -> dg.AssetsDefinition:
    @dg.asset(
        key=tag_model_key(tag.name),
        group_name=TRAINING_GROUP,
        ins={"snapshot_path": dg.AssetIn(key=training_set_key(tag.name))},
        check_specs=[
            dg.AssetCheckSpec(
                "promotion_gate",
                asset=tag_model_key(tag.name),
                blocking=True,
                description=f"Challenger beats the champion on {tag.promotion.metric} by {tag.promotion.margin} and the baseline by "
                f"{tag.promotion.baseline_margin}, "
                f"calibration error <= {tag.promotion.max_calibration_error}, slices >= {tag.promotion.slice_floor}.",
            )
        ],
        description=f"{tag.name}: Optuna-tuned {tag.model.family if tag.model else ''} model logged to MLflow and registered as challenger.",
        kinds={"mlflow", "xgboost"},
    )
    def tag_model(
        context: dg.AssetExecutionContext,
        config: TrainingConfig,
        snapshot_path: str,
        mlflow_store: MlflowResource,
        warehouse: WarehouseResource,
    ):
        data = load_training_set(resolve_home_path(snapshot_path), tag)
        client = mlflow_store.client()
        # the gate and drift judge the same segments: the tag's slices as drift defines them (recorded on the version)
        slices = slice_expressions(catalog, set(data.feature_names), tag, slice_sources(tag, data))
        result = train_tag(
            tag,
            data,
            client,
            slices,
            artifact_location=mlflow_store.artifact_location,
            seed=config.seed,
            threads=warehouse.threads,
            trials=config.trials,
            run_tags={"dagster_run_id": context.run.run_id},
            demographics=load_demographics(warehouse.staged_dir),  # the fairness slices' gender and age, never features
        )
        decision = apply_gate(client, evaluate_gate(client, tag, result.version, data, slices))
        context.log.info(decision.summary())
        # the card's next revision, now with the gate's decision and the score stability against the newest features
        card = log_model_card(client, tag.name, result.version, score_stability(client, tag, result.version, warehouse.layout.customer_features))
        ui = ui_base_url(mlflow_store.tracking_uri, mlflow_store.ui_url)
        metadata = {**_model_metadata(tag, result, ui), **_card_metadata(client, tag, card)}
        yield dg.MaterializeResult(metadata=metadata, check_results=[_gate_check_result(decision)])

    return tag_model


def _model_metadata(tag: TagSpec, result: TrainResult, ui: str) -> dict[str, Any]:
    """What a trained version shows in Dagster: its registry links, test and baseline metrics (aggregates only)."""
    return {
        "model_version": result.version,
        "mlflow_run_id": result.run_id,
        "model_uri": result.model_uri,
        "model_family": result.family,  # the tuned family, or the logistic baseline when it scored better on validation
        "mlflow_run": dg.MetadataValue.url(run_url(ui, result.experiment_id, result.run_id)),
        "mlflow_model_version": dg.MetadataValue.url(model_version_url(ui, registered_model_name(tag.name), result.version)),
        **{f"test_{k}": round(v, 4) for k, v in result.metrics.items() if not k.startswith(("precision_", "recall_", "support_"))},
        **{f"baseline_{k}": round(v, 4) for k, v in result.baseline_metrics.items()},
        "best_params": dg.MetadataValue.json(result.best_params),
        "seconds": dg.MetadataValue.json({k: round(v, 1) for k, v in result.seconds.items()}),
    }


def _card_metadata(client: MlflowClient, tag: TagSpec, card: ModelCard) -> dict[str, Any]:
    """Where the version's model card is (the run's artifacts), and which revision and gate decision it shows."""
    location = card_location(client, tag.name, card.version)
    link = dg.MetadataValue.url(location) if "://" in location and not location.startswith("file:") else dg.MetadataValue.path(location.removeprefix("file://"))
    return {"model_card": link, "model_card_revision": card.revision, "model_card_gate": card.record["gate"]["decision"]}


def _gate_check_result(decision: GateDecision) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name="promotion_gate",
        passed=decision.promoted,
        # a rejected challenger leaves a working champion in place: warn; without one, it is an error
        severity=dg.AssetCheckSeverity.WARN if decision.champion_version else dg.AssetCheckSeverity.ERROR,
        description=decision.summary(),
        metadata={
            "decision": "promoted" if decision.promoted else "rejected",
            "reasons": dg.MetadataValue.json(decision.reasons),
            "challenger_version": decision.challenger_version,
            "champion_version_before": decision.champion_version or "none",
            f"challenger_{decision.metric}": round(decision.challenger_metric, 4),
            f"champion_{decision.metric}": round(decision.champion_metric, 4) if decision.champion_metric is not None else "n/a",
        },
    )


def build_all_training_assets(catalog: Catalog) -> list[dg.AssetsDefinition]:
    return [asset for tag in catalog.model_tags for asset in build_training_assets(tag, catalog)]
