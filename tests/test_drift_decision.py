"""The drift decision on hand-made measures: every rule of monitoring/decision.py, no data read."""

from datetime import date

import pandas as pd
import pytest

from tagml.monitoring.decision import MIN_SLICE_ROWS, DriftMeasures, decide, describe_rules, feature_drifted, performance_drifted
from tagml.monitoring.performance import RealisedPerformance
from tagml.monitoring.psi import MISSING
from tagml.training.catalog import DriftSpec

SPEC = DriftSpec(feature_psi=0.2, drifted_feature_share=0.3, prediction_psi=0.2, performance_drop=0.05)
NOT_MONITORED = RealisedPerformance("not monitored", "log_loss")
ENOUGH = MIN_SLICE_ROWS


def _measures(
    psi: dict[str, float],
    rows: dict[str, tuple[int, int]] | None = None,
    prediction_psi: float = 0.0,
    shares: dict[str, tuple[float, float]] | None = None,
    performance: RealisedPerformance = NOT_MONITORED,
) -> DriftMeasures:
    rows = rows or {}
    features = pd.DataFrame([(f, p, *rows.get(f, (1000, 1000))) for f, p in psi.items()], columns=["feature", "psi", "reference_rows", "current_rows"])
    shares = shares or {"low": (0.5, 0.5), "high": (0.5, 0.5)}
    class_shares = pd.DataFrame([(c, r, s) for c, (r, s) in shares.items()], columns=["class", "reference_share", "current_share"])
    return DriftMeasures(features, prediction_psi, class_shares, ("low", "high"), performance)


def _ten(drifted: int, psi: float = 0.5) -> dict[str, float]:
    return {f"f{i}": psi if i < drifted else 0.01 for i in range(10)}


def test_nothing_crossed_is_no_drift_and_no_reason():
    decision = decide(_measures(_ten(0), prediction_psi=0.05), SPEC)
    assert not decision.drifted and decision.reasons == []
    assert decision.drifted_features == [] and decision.drifted_feature_share == 0


@pytest.mark.parametrize(("psi", "drifted"), [(0.2, False), (0.2001, True)])
def test_a_feature_is_drifted_only_strictly_above_feature_psi(psi, drifted):
    decision = decide(_measures({"a": psi}), SPEC)
    assert decision.drifted_features == (["a"] if drifted else [])


@pytest.mark.parametrize(
    ("reference_rows", "current_rows", "drifted"),
    [(ENOUGH - 1, 5000, False), (5000, ENOUGH - 1, False), (ENOUGH, ENOUGH, True)],
)
def test_a_feature_with_too_few_rows_on_either_side_is_never_flagged(reference_rows, current_rows, drifted):
    table = pd.DataFrame({"psi": [3.0], "reference_rows": [reference_rows], "current_rows": [current_rows]})
    assert feature_drifted(table, SPEC).tolist() == [drifted]
    assert decide(_measures({"a": 3.0}, rows={"a": (reference_rows, current_rows)}), SPEC).feature_drift is drifted


def test_the_share_of_drifted_features_must_exceed_the_spec_share():
    at = decide(_measures(_ten(3)), SPEC)  # 30% is not above 30%
    assert at.drifted_features == ["f0", "f1", "f2"] and at.drifted_feature_share == pytest.approx(0.3)
    assert not at.feature_drift and not at.drifted and at.reasons == []
    above = decide(_measures(_ten(4)), SPEC)
    assert above.feature_drift and above.drifted
    assert above.reasons == ["4/10 features (40%) have PSI > 0.2, above 30%: f0 0.50, f1 0.50, f2 0.50, f3 0.50"]


def test_the_share_reason_names_the_five_largest_psi_first():
    psi = {"a": 0.3, "b": 0.9, "c": 0.25, "d": 0.7, "e": 0.4, "f": 0.6, "g": 0.01}
    decision = decide(_measures(psi), SPEC)
    assert decision.drifted_features == ["b", "d", "f", "e", "a", "c"]
    assert decision.reasons == ["6/7 features (86%) have PSI > 0.2, above 30%: b 0.90, d 0.70, f 0.60, e 0.40, a 0.30"]


def test_one_drifted_critical_feature_is_enough():
    spec = SPEC.model_copy(update={"critical_features": ("f0", "f9")})
    decision = decide(_measures(_ten(1, psi=0.45)), spec)
    assert decision.feature_drift and decision.drifted and decision.critical_features_drifted == ["f0"]
    assert decision.reasons == ["critical feature(s) drifted: f0 PSI 0.45 (> 0.2)"]
    # a critical feature below the threshold, or on too few rows, decides nothing
    assert not decide(_measures(_ten(0)), spec).drifted
    assert not decide(_measures(_ten(1), rows={"f0": (ENOUGH - 1, 1000)}), spec).drifted


def test_share_and_critical_reasons_both_given():
    spec = SPEC.model_copy(update={"critical_features": ("f1",)})
    decision = decide(_measures(_ten(5)), spec)
    assert [r.split(":")[0] for r in decision.reasons] == ["5/10 features (50%) have PSI > 0.2, above 30%", "critical feature(s) drifted"]


@pytest.mark.parametrize(("psi", "drifted"), [(0.2, False), (0.21, True)])
def test_predictions_drift_strictly_above_prediction_psi_with_the_shares_in_class_order(psi, drifted):
    shares = {"unknown": (0.0, 0.1), MISSING: (0.0, 0.05), "high": (0.3, 0.6), "low": (0.7, 0.25)}
    decision = decide(_measures(_ten(0), prediction_psi=psi, shares=shares), SPEC)
    assert decision.prediction_drift is drifted and decision.drifted is drifted and not decision.feature_drift
    expected = [f"class PSI {psi:.3f} > 0.2: low 70.0%, high 30.0%, unknown 0.0% -> low 25.0%, high 60.0%, unknown 10.0%"]
    assert decision.reasons == (expected if drifted else [])


def test_a_performance_drop_flagged_by_the_measure_drifts_the_tag_with_its_numbers():
    perf = RealisedPerformance(
        "measured", "log_loss", partition=date(2026, 8, 1), labels=400, version="3", realised=0.71, expected=0.6, drop=0.11, drifted=True
    )
    decision = decide(_measures(_ten(0), performance=perf), SPEC)
    assert decision.performance_drift and decision.drifted and not decision.feature_drift and not decision.prediction_drift
    assert decision.reasons == ["realised log_loss 0.710 on 2026-08-01 (400 matured labels) is 0.110 below the test 0.600 (> 0.05)"]


def test_a_measured_performance_not_flagged_decides_nothing():
    # e.g. the drop was measured on a version replaced since (monitoring/performance.py): no reason, no drift
    perf = RealisedPerformance("measured", "log_loss", labels=400, version="2", realised=0.71, expected=0.6, drop=0.11, drifted=False, note="replaced")
    decision = decide(_measures(_ten(0), performance=perf), SPEC)
    assert not decision.performance_drift and not decision.drifted and decision.reasons == []


def test_every_rule_at_once_gives_every_reason_in_order():
    perf = RealisedPerformance("measured", "roc_auc", partition=date(2026, 8, 1), labels=80, version="1", realised=0.6, expected=0.8, drop=0.2, drifted=True)
    spec = SPEC.model_copy(update={"critical_features": ("f0",)})
    decision = decide(_measures(_ten(4), prediction_psi=0.5, performance=perf), spec)
    assert decision.drifted and [r.split(" ")[0] for r in decision.reasons] == ["4/10", "critical", "class", "realised"]


def test_the_rules_described_are_the_rules_decided():
    assert describe_rules(SPEC, "log_loss") == "drifted features <= 30% (PSI > 0.2), class PSI <= 0.2"
    delayed = SPEC.model_copy(update={"label_delay_days": 90, "critical_features": ("f0", "f1")})
    assert describe_rules(delayed, "roc_auc") == (
        "drifted features <= 30% (PSI > 0.2), no critical feature drifted (f0, f1), class PSI <= 0.2, realised roc_auc drop <= 0.05"
    )


def test_the_drift_check_of_a_tag_with_critical_features_names_them():
    # the check's description once listed the share and class rules only, while one critical feature alone drifts the tag
    import dagster as dg

    from tagml.orchestration.monitoring_assets import build_tag_drift_asset, drift_check_name
    from tagml.training.catalog import load_catalog

    catalog = load_catalog()
    asset = build_tag_drift_asset(dg.DailyPartitionsDefinition(start_date="2026-01-01"), catalog)
    descriptions = {spec.name: spec.description for spec in asset.check_specs}
    risk = catalog.get("risk_appetite")
    assert risk.drift.critical_features
    assert descriptions[drift_check_name("risk_appetite")] == f"risk_appetite: {describe_rules(risk.drift, risk.promotion.metric)}"
    assert all(f in descriptions[drift_check_name("risk_appetite")] for f in risk.drift.critical_features)


@pytest.mark.parametrize(
    ("drop", "measured", "expected"),
    [
        (None, "3", (False, "")),  # no test metric recorded on the version
        (0.05, "3", (False, "")),  # at the threshold: not above it
        (0.051, "3", (True, "")),
        (0.2, "2", (False, "measured on v2, since replaced by v3")),  # the version that aged badly is gone
    ],
)
def test_performance_drifts_only_above_the_drop_and_only_for_the_version_still_scoring(drop, measured, expected):
    assert performance_drifted(drop, SPEC, measured, "3") == expected
