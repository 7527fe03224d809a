"""Which tags to re-evaluate (retrain -> gate -> re-score) after drift, as a pure function of the
drift results and a small cursor, so that the sensor wrapping it is trivially idempotent.

Three guards make one drift event start one re-evaluation and never a loop:

1. The cursor remembers up to which *position* the drift results have been read: the storage id of
   the last `tag_drift` materialization in Dagster's event log. Positions are assigned when a result
   is stored, so a partition computed earlier but stored later (two runs of a backfill) comes after
   the cursor and is read, which a wall-clock `computed_at` cursor would drop for good. A second
   evaluation on the same results sees nothing new.
2. Each request carries the run key `reevaluate-<tag>-<as_of>`; Dagster launches a run key once per
   sensor, whatever happens to the cursor (a run executed in process by `tagml demo` carries the
   same key and sensor tags, tagml.orchestration.sensors.in_process_run_tags, so it counts too).
3. A per-tag cooldown, in *data* days (as_of), not wall-clock: after a re-evaluation of a tag for
   as_of D, drift of that tag at an as_of before D + cooldown is skipped (the retrained model's
   reference may still be mostly pre-drift, so the next days would otherwise flag it again), and
   drift at an as_of older than D (a backfill) never triggers. Data days make the decision the same
   for the same inputs, whenever the sensor happens to run.

The re-evaluation job itself never materializes tag_drift, so it cannot produce the drift that would
trigger it again.
"""

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import Any


def run_key(tag: str, as_of: date) -> str:
    return f"reevaluate-{tag}-{as_of.isoformat()}"


@dataclass(frozen=True)
class DriftEvent:
    """One tag's drift result for one as_of, as the planner needs it.

    `position` orders results by when they were stored (Dagster's event storage id), not computed.
    """

    tag: str
    as_of: date
    drifted: bool
    reasons: tuple[str, ...]
    position: int


@dataclass(frozen=True)
class Reevaluation:
    tag: str
    as_of: date
    reasons: tuple[str, ...]

    @property
    def run_key(self) -> str:
        return run_key(self.tag, self.as_of)


@dataclass
class Cursor:
    """What the sensor remembers between evaluations (serialised as JSON in Dagster's cursor)."""

    seen_through: int | None = None  # the position (storage id) of the last result read
    last_requested: dict[str, date] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str | None) -> "Cursor":
        if not text:
            return cls()
        raw = json.loads(text)
        seen = raw.get("seen_through")
        return cls(
            # a cursor of the wall-clock era (an ISO time) restarts from the first result: run keys keep
            # that from launching anything twice
            seen_through=seen if isinstance(seen, int) else None,
            last_requested={t: date.fromisoformat(d) for t, d in raw.get("last_requested", {}).items()},
        )

    def dumps(self) -> str:
        return json.dumps(
            {
                "seen_through": self.seen_through,
                "last_requested": {t: d.isoformat() for t, d in sorted(self.last_requested.items())},
            }
        )


@dataclass
class Plan:
    requests: list[Reevaluation]
    skipped: list[tuple[str, date, str]]  # (tag, as_of, why)
    cursor: Cursor

    def describe_skips(self) -> str:
        return "; ".join(f"{tag}@{as_of}: {why}" for tag, as_of, why in self.skipped)


def plan_reevaluations(events: Iterable[DriftEvent], cursor: Cursor, cooldown_days: int, model_tags: Iterable[str]) -> Plan:
    """Re-evaluations for the drifted (tag, as_of) pairs not yet seen, oldest first, within the cooldown rules."""
    known = set(model_tags)
    last = dict(cursor.last_requested)
    seen = cursor.seen_through
    requests: list[Reevaluation] = []
    skipped: list[tuple[str, date, str]] = []
    for event in sorted(events, key=lambda e: (e.as_of, e.tag, e.position)):
        if cursor.seen_through is not None and event.position <= cursor.seen_through:
            continue
        seen = event.position if seen is None or event.position > seen else seen
        if not event.drifted:
            continue
        previous = last.get(event.tag)
        if event.tag not in known:
            skipped.append((event.tag, event.as_of, "not a model tag of the catalog"))
        elif previous is not None and event.as_of < previous:
            skipped.append((event.tag, event.as_of, f"older than the re-evaluation already requested for {previous}"))
        elif previous is not None and (event.as_of - previous).days < cooldown_days:
            skipped.append((event.tag, event.as_of, f"cooldown: re-evaluated for {previous}, less than {cooldown_days} days before"))
        elif any(r.tag == event.tag and r.as_of == event.as_of for r in requests):
            continue
        else:
            requests.append(Reevaluation(event.tag, event.as_of, event.reasons))
            last[event.tag] = event.as_of
    return Plan(requests, skipped, Cursor(seen_through=seen, last_requested=last))


def drift_verdict(drifted: bool, reasons: Iterable[str]) -> dict[str, Any]:
    """One tag's verdict as a stored drift result carries it (JSON): what `events_from_result` reads back."""
    return {"drifted": bool(drifted), "reasons": [str(r) for r in reasons]}


# A single-run backfill records one materialization per partition with the same metadata: its verdicts are
# keyed by as_of under this key (not a valid tag name), and each partition's events take their night's.
BY_AS_OF = "(by as_of)"


def events_from_result(position: int, as_of: date, by_tag: Mapping[str, Any]) -> list[DriftEvent]:
    """DriftEvents of one stored drift result: per tag a `drift_verdict` (of the result's as_of, for a backfilled range)."""
    if BY_AS_OF in by_tag:
        by_tag = by_tag[BY_AS_OF].get(as_of.isoformat(), {})
    return [
        DriftEvent(tag, as_of, bool(result["drifted"]), tuple(str(r) for r in result.get("reasons") or ()), position) for tag, result in sorted(by_tag.items())
    ]
