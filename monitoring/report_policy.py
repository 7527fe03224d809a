"""When tag_drift renders Evidently's HTML report: a policy, because its fixed cost dominated a small nightly.

The decision to re-evaluate a tag is tagml's, taken on the PSI of the whole population in DuckDB
(monitoring/decision.py), and it is computed every night whatever this policy says. The Evidently
report is a picture for a person: ~4-6 s to import Evidently plus ~7-11 s per model tag on its fixed
samples, 42 of the 49 s of the demo's nightly at 20k customers (bench/RESULTS.md). It is worth its
cost when somebody will look at it: on the night a tag drifts (its owner gets a red check and opens
the report) and once a week for every tag (a regular picture of slow change). On the other nights
the report is skipped, and it can be rendered later for any stored partition from the stored
features and tags (`report="always"` for that as_of: tag_drift's config or `tagml drift --report`).

Policies (TAGML_DRIFT_REPORT):
  on_drift_or_weekly (default)  the drifted tags' reports every night; every tag's on the weekly day
  on_drift                      the drifted tags' reports only
  always                        every tag's report every night (the behaviour before #14)
  never                         no report (PSI, decisions and history are unchanged)
The weekly day is TAGML_DRIFT_REPORT_WEEKDAY (0 = Monday ... 6 = Sunday; default 6) of the as_of.
"""

from dataclasses import dataclass
from datetime import date
from typing import Literal, get_args

ReportPolicy = Literal["on_drift_or_weekly", "on_drift", "always", "never"]
REPORT_POLICIES: tuple[str, ...] = get_args(ReportPolicy)
DEFAULT_REPORT_POLICY: ReportPolicy = "on_drift_or_weekly"
DEFAULT_REPORT_WEEKDAY = 6  # Sunday: the week's picture is there on Monday morning
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


@dataclass(frozen=True)
class ReportPlan:
    """Which tags of one as_of get an Evidently report, and why (for the asset's metadata)."""

    policy: str
    tags: tuple[str, ...]
    why: str


def report_policy(value: bool | str) -> str:
    """A policy from a policy name or the old boolean (True = always, False = never); a clear error otherwise."""
    if value is True:
        return "always"
    if value is False:
        return "never"
    if value not in REPORT_POLICIES:
        raise ValueError(f"unknown drift report policy {value!r}: one of {', '.join(REPORT_POLICIES)}")
    return value


def plan_reports(policy: bool | str, as_of: date, verdicts: dict[str, bool], weekday: int = DEFAULT_REPORT_WEEKDAY) -> ReportPlan:
    """The tags whose report runs for `as_of` given each tag's drift verdict (tag -> drifted)."""
    policy = report_policy(policy)
    if not 0 <= weekday <= 6:
        raise ValueError(f"drift report weekday {weekday} is not 0 (Monday) .. 6 (Sunday)")
    everyone = tuple(sorted(verdicts))
    drifted = tuple(t for t in everyone if verdicts[t])
    if policy == "always":
        return ReportPlan(policy, everyone, "policy 'always': every tag's report")
    if policy == "never":
        return ReportPlan(policy, (), "policy 'never': no report (PSI and decisions computed as every night)")
    if policy == "on_drift_or_weekly" and as_of.weekday() == weekday:
        return ReportPlan(policy, everyone, f"weekly report day ({WEEKDAYS[weekday]}): every tag's report")
    if drifted:
        return ReportPlan(policy, drifted, f"drifted tag(s) get their report: {', '.join(drifted)}")
    weekly = f"; the weekly report is on {WEEKDAYS[weekday]}s" if policy == "on_drift_or_weekly" else ""
    return ReportPlan(policy, (), f"no tag drifted: report skipped (policy {policy!r}{weekly}); render it on demand with report='always'")
