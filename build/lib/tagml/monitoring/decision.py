"""Whether a tag drifted: a pure function of the measures (monitoring/drift.py) and the tag's drift spec.

The rules, each reading the catalog's `drift:` entry of the tag (tagml.training.catalog.DriftSpec):

* a **feature** (overall or in a slice) is drifted when its PSI exceeds `feature_psi` and both sides
  hold at least MIN_SLICE_ROWS rows (a smaller slice is reported but never flagged);
* the tag is **feature-drifted** when the share of its features drifted overall exceeds
  `drifted_feature_share`, or when any of its `critical_features` is drifted;
* it is **prediction-drifted** when the overall class PSI exceeds `prediction_psi`;
* it is **performance-drifted** when the realised performance says so (monitoring/performance.py:
  the drop below the version's test metric exceeds `performance_drop`, on enough matured labels of
  the current champion);
* any one of the three makes the tag drifted, and each one that holds gives a reason.

No data is read here, so each rule is tested on hand-made numbers (tests/test_drift_decision.py).
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd

from tagml.training.catalog import UNKNOWN, DriftSpec

if TYPE_CHECKING:  # performance measures with this module's performance rule: imported for the annotation only
    from tagml.monitoring.performance import RealisedPerformance

MIN_SLICE_ROWS = 100  # a slice smaller than this on either side is reported but never flagged
REPORTED_FEATURES = 5  # drifted features named in the share reason, largest PSI first


@dataclass(frozen=True)
class DriftMeasures:
    """The whole-population numbers one tag's decision is taken on."""

    features: pd.DataFrame  # one row per feature of the model, in its order: feature, psi, reference_rows, current_rows
    prediction_psi: float  # PSI of the inferred class distribution against the reference's
    class_shares: pd.DataFrame  # one row per class: class, reference_share, current_share
    classes: tuple[str, ...]  # the tag's classes, in the order the reasons list them
    performance: "RealisedPerformance"


@dataclass(frozen=True)
class DriftDecision:
    drifted_features: list[str]  # drifted overall, largest PSI first
    drifted_feature_share: float
    critical_features_drifted: list[str]
    feature_drift: bool
    prediction_drift: bool
    performance_drift: bool
    reasons: list[str]

    @property
    def drifted(self) -> bool:
        return bool(self.feature_drift or self.prediction_drift or self.performance_drift)


def large_enough(table: pd.DataFrame) -> pd.Series:
    """Per row: both sides hold enough rows for their PSI to count (columns reference_rows, current_rows)."""
    return (table["reference_rows"] >= MIN_SLICE_ROWS) & (table["current_rows"] >= MIN_SLICE_ROWS)


def feature_drifted(table: pd.DataFrame, spec: DriftSpec) -> pd.Series:
    """Per row of a feature PSI table (overall or per slice): whether that feature counts as drifted there."""
    return (table["psi"] > spec.feature_psi) & large_enough(table)


def decide(measures: DriftMeasures, spec: DriftSpec) -> DriftDecision:
    """The tag's verdict and the reasons for it, from its measures and its catalog drift spec."""
    features = measures.features.assign(drifted=feature_drifted(measures.features, spec))
    drifted_features = features.loc[features["drifted"]].sort_values("psi", ascending=False)["feature"].tolist()
    share = len(drifted_features) / len(features)
    critical = [f for f in drifted_features if f in spec.critical_features]
    prediction_drift = measures.prediction_psi > spec.prediction_psi
    perf = measures.performance
    psi_of = features.set_index("feature")["psi"]
    reasons: list[str] = []
    if share > spec.drifted_feature_share:
        top = ", ".join(f"{f} {psi_of[f]:.2f}" for f in drifted_features[:REPORTED_FEATURES])
        reasons.append(
            f"{len(drifted_features)}/{len(features)} features ({share:.0%}) have PSI > {spec.feature_psi}, above {spec.drifted_feature_share:.0%}: {top}"
        )
    if critical:
        reasons.append("critical feature(s) drifted: " + ", ".join(f"{f} PSI {psi_of[f]:.2f}" for f in critical) + f" (> {spec.feature_psi})")
    if prediction_drift:
        reasons.append(
            f"class PSI {measures.prediction_psi:.3f} > {spec.prediction_psi}: {_shares(measures, 'reference_share')} -> {_shares(measures, 'current_share')}"
        )
    if perf.drifted:
        reasons.append(
            f"realised {perf.metric} {perf.realised:.3f} on {perf.partition} ({perf.labels} matured labels) is {perf.drop:.3f} "
            f"below the test {perf.expected:.3f} (> {spec.performance_drop})"
        )
    return DriftDecision(
        drifted_features=drifted_features,
        drifted_feature_share=share,
        critical_features_drifted=critical,
        feature_drift=share > spec.drifted_feature_share or bool(critical),
        prediction_drift=prediction_drift,
        performance_drift=perf.drifted,
        reasons=reasons,
    )


def describe_rules(spec: DriftSpec, metric: str) -> str:
    """`decide`'s rules for one tag in a line: what keeps it out of drift (the tag_drift asset check's description)."""
    rules = [f"drifted features <= {spec.drifted_feature_share:.0%} (PSI > {spec.feature_psi})"]
    if spec.critical_features:
        rules.append(f"no critical feature drifted ({', '.join(spec.critical_features)})")
    rules.append(f"class PSI <= {spec.prediction_psi}")
    if spec.label_delay_days:  # realised performance is measured only for delayed labels (monitoring/performance.py)
        rules.append(f"realised {metric} drop <= {spec.performance_drop}")
    return ", ".join(rules)


def _shares(measures: DriftMeasures, column: str) -> str:
    """'c1 40.0%, c2 60.0%' in the tag's class order, then `unknown` (inference's abstention) if present."""
    rows = measures.class_shares.set_index("class")[column]
    return ", ".join(f"{c} {rows.get(c, 0.0):.1%}" for c in [*measures.classes, UNKNOWN] if c in rows.index)


def performance_drifted(drop: float | None, spec: DriftSpec, measured_version: str | None, current_version: str) -> tuple[bool, str]:
    """(drifted, note): realised performance fell more than `spec.performance_drop` below the version's test
    metric, and that version still scores the tag."""
    if drop is None or not drop > spec.performance_drop:
        return False, ""
    if measured_version != current_version:
        # the version that made these predictions has been replaced since: re-evaluating the
        # current champion because its predecessor aged badly would retrain for nothing
        return False, f"measured on v{measured_version}, since replaced by v{current_version}"
    return True, ""
