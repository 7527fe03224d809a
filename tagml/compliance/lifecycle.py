"""The tag lifecycle: draft -> approved -> published -> retired, one event per decision in the governance store.

A tag never recorded is `draft`. Each event keeps the catalog entry's content hash: when the entry has
changed since it was approved (or published), the tag is `draft (changed since approval)` until someone
approves the new definition. Only `published` tags reach exports and lookups; scoring scores every tag.

Four-eyes: the person who publishes a tag must not be the one who approved it (the catalog has no
editor record, so that is the separation this store can enforce). Names and reasons are stored as data.
"""

import json
import sqlite3
from collections.abc import Mapping
from dataclasses import astuple, dataclass

from tagml.core.governance import GovernanceStore, Table, utc_now
from tagml.training.catalog import Catalog, TagSpec

DRAFT, APPROVED, PUBLISHED, RETIRED = "draft", "approved", "published", "retired"
STATUSES = (DRAFT, APPROVED, PUBLISHED, RETIRED)
# retired -> draft is allowed (a tag may come back), but only through a new approval before it is published again
TRANSITIONS: Mapping[str, tuple[str, ...]] = {
    DRAFT: (APPROVED,),
    APPROVED: (PUBLISHED, DRAFT),
    PUBLISHED: (RETIRED, DRAFT),
    RETIRED: (DRAFT,),
}
MAX_NAME, MAX_REASON = 200, 2000

STATUS_EVENTS = Table(
    "tag_status_events",
    ddl=(
        (
            "CREATE TABLE IF NOT EXISTS tag_status_events (id INTEGER PRIMARY KEY AUTOINCREMENT, tag TEXT NOT NULL, "
            "status TEXT NOT NULL CHECK (status IN ('draft', 'approved', 'published', 'retired')), by TEXT NOT NULL, at TEXT NOT NULL, "
            "reason TEXT NOT NULL, entry_hash TEXT NOT NULL)"
        ),
        "CREATE INDEX IF NOT EXISTS tag_status_events_by_tag ON tag_status_events (tag, id)",
    ),
)
_COLUMNS = "tag, status, by, at, reason, entry_hash"


class LifecycleError(ValueError):
    """A transition the lifecycle does not allow, or a missing name or reason."""


class FourEyesError(LifecycleError):
    """The approver of a tag tried to publish it too."""


@dataclass(frozen=True)
class StatusEvent:
    tag: str
    status: str
    by: str
    at: str
    reason: str
    entry_hash: str


@dataclass(frozen=True)
class TagStatus:
    """Where a tag stands now: its effective status, and the last recorded event (None: never recorded)."""

    tag: str
    status: str
    changed_since_approval: bool
    last: StatusEvent | None

    @property
    def label(self) -> str:
        return f"{self.status} (changed since approval)" if self.changed_since_approval else self.status

    @property
    def allowed(self) -> tuple[str, ...]:
        return TRANSITIONS[self.status]


def effective_status(tag: str, entry_hash: str, last: StatusEvent | None) -> TagStatus:
    """A changed definition loses its approval (and its publication); a retired tag stays retired."""
    if last is None:
        return TagStatus(tag, DRAFT, False, None)
    changed = last.status in (APPROVED, PUBLISHED) and last.entry_hash != entry_hash
    return TagStatus(tag, DRAFT if changed else last.status, changed, last)


def _last_events(con: sqlite3.Connection, tags: list[str]) -> dict[str, StatusEvent]:
    rows = con.execute(
        f"SELECT {_COLUMNS} FROM tag_status_events e WHERE id = (SELECT max(id) FROM tag_status_events WHERE tag = e.tag) "
        f"AND tag IN (SELECT value FROM json_each(?))",
        [json.dumps(tags)],
    ).fetchall()
    return {row[0]: StatusEvent(*row) for row in rows}


def statuses(governance: GovernanceStore, catalog: Catalog) -> dict[str, TagStatus]:
    """Every catalog tag's status, in catalog order. A store that does not exist yet means every tag is a draft (nothing is created)."""
    names = [t.name for t in catalog.tags]
    last: dict[str, StatusEvent] = {}
    if governance.path.exists():
        with governance.read(STATUS_EVENTS) as con:
            last = _last_events(con, names)
    return {t.name: effective_status(t.name, t.content_hash(), last.get(t.name)) for t in catalog.tags}


def published_tags(governance: GovernanceStore, catalog: Catalog) -> frozenset[str]:
    """The tags exports and lookups may show."""
    return frozenset(name for name, status in statuses(governance, catalog).items() if status.status == PUBLISHED)


def history(governance: GovernanceStore, tag: str) -> list[StatusEvent]:
    """Every recorded event of `tag`, oldest first."""
    if not governance.path.exists():
        return []
    with governance.read(STATUS_EVENTS) as con:
        rows = con.execute(f"SELECT {_COLUMNS} FROM tag_status_events WHERE tag = ? ORDER BY id", [tag]).fetchall()
    return [StatusEvent(*row) for row in rows]


def _checked(value: str, what: str, limit: int) -> str:
    if not value or not value.strip():
        raise LifecycleError(f"a {what} is required")
    if len(value) > limit:
        raise LifecycleError(f"the {what} is longer than {limit} characters")
    return value


def _transition(governance: GovernanceStore, spec: TagSpec, to: str, by: str, reason: str) -> TagStatus:
    by, reason = _checked(by, "name (--by)", MAX_NAME), _checked(reason, "reason (--reason)", MAX_REASON)
    entry_hash = spec.content_hash()
    with governance.transaction(STATUS_EVENTS) as con:
        current = effective_status(spec.name, entry_hash, _last_events(con, [spec.name]).get(spec.name))
        if to not in current.allowed:
            allowed = ", ".join(current.allowed)
            raise LifecycleError(f"tag {spec.name!r} is {current.label}: it cannot become {to}; from {current.status} it can become: {allowed}")
        if to == PUBLISHED and current.last is not None and current.last.by.casefold() == by.casefold():
            raise FourEyesError(f"tag {spec.name!r} was approved by {by!r}: another person must publish it (four-eyes)")
        event = StatusEvent(spec.name, to, by, utc_now(), reason, entry_hash)
        con.execute(f"INSERT INTO tag_status_events ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)", astuple(event))
    return effective_status(spec.name, entry_hash, event)


def approve(governance: GovernanceStore, spec: TagSpec, by: str, reason: str) -> TagStatus:
    """Approve the catalog entry as it is now (its hash is recorded)."""
    return _transition(governance, spec, APPROVED, by, reason)


def publish(governance: GovernanceStore, spec: TagSpec, by: str, reason: str = "published") -> TagStatus:
    """Publish an approved tag: from now on exports and lookups show it. `by` must not be its approver."""
    return _transition(governance, spec, PUBLISHED, by, reason)


def retire(governance: GovernanceStore, spec: TagSpec, by: str, reason: str) -> TagStatus:
    """Take a published tag out of exports and lookups for good (reopen it to start again)."""
    return _transition(governance, spec, RETIRED, by, reason)


def reopen(governance: GovernanceStore, spec: TagSpec, by: str, reason: str) -> TagStatus:
    """Back to draft (withdraw an approval or a publication, or bring back a retired tag): it needs a new approval."""
    return _transition(governance, spec, DRAFT, by, reason)
