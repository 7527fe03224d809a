"""Turning domain check outcomes into Dagster asset-check results."""

import dagster as dg

from tagml.features.quality import CheckOutcome, QualityCheck


def check_spec(asset: str, check: QualityCheck) -> dg.AssetCheckSpec:
    """The asset-check spec of a check the domain declares (name, description, blocking from one place)."""
    return dg.AssetCheckSpec(check.name, asset=asset, description=check.description, blocking=check.blocking)


def check_result(outcome: CheckOutcome) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name=outcome.name,
        passed=outcome.passed,
        severity=dg.AssetCheckSeverity.ERROR if outcome.blocking else dg.AssetCheckSeverity.WARN,
        description=outcome.description,
        metadata={k: dg.MetadataValue.json(v) if isinstance(v, (dict, list)) else v for k, v in outcome.metadata.items()},
    )
