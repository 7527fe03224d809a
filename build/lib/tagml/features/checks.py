"""What a data-quality check is, for the domain: declared once (name, what it asserts, whether a
failure blocks), run into an outcome; orchestration turns both into Dagster asset checks."""

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CheckOutcome:
    """What one run of a check found (metadata: aggregates only, never customer-level values)."""

    name: str
    passed: bool
    description: str
    blocking: bool = True
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class QualityCheck:
    """One check the domain runs: its name, what it asserts and whether a failure blocks. The one
    declaration both the outcome and orchestration's asset-check spec are made from."""

    name: str
    description: str
    blocking: bool = True

    def outcome(self, passed: bool, metadata: dict[str, Any], finding: str = "") -> CheckOutcome:
        """The result of running this check; `finding` (aggregates only) names what failed."""
        description = f"{self.description} {finding}" if finding else self.description
        return CheckOutcome(self.name, bool(passed), description, self.blocking, metadata)
