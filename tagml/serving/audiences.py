"""Audience selection (圈人): a small, validated JSON query language over tags, compiled to set-based
DuckDB SQL over the tag store's partition (values only as parameters), with counts, exports and
contact-frequency caps.

The query language (docs/AUDIENCES.md): AND/OR/NOT of conditions on one tag each: `in` a list of
its classes, `probability` at least x, `changed` from/to classes since a date; and `consent` to a
purpose. Unknown tags, classes or purposes, and tags the caller may not see, are refused naming the
place in the query (AudienceQueryError), before any SQL runs.
"""

from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import duckdb

from tagml.core.settings import Settings


class AudienceQueryError(ValueError):
    """A query that does not parse, or names an unknown tag, class or purpose (says where, as a path into the query)."""


class AudienceError(LookupError):
    """An audience that cannot be made as asked (no partition, an unknown audience id, nothing selected)."""


@dataclass(frozen=True)
class ContactCap:
    """A customer already in `max_audiences` audiences of the same purpose in the last `days` days is left out (0: no cap)."""

    max_audiences: int
    days: int

    @classmethod
    def from_settings(cls, settings: Settings) -> "ContactCap":
        return cls(settings.contact_cap_audiences, settings.contact_cap_days)


@dataclass(frozen=True)
class AudienceCount:
    """How many customers a query selects on one partition, and how many are left out and why."""

    as_of: str
    matched: int  # customers matching the query
    excluded: dict[str, int] = field(default_factory=dict)  # reason -> customers left out (no_consent, withdrawn, contact_cap)
    selected: int = 0  # matched minus every exclusion
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AudienceSources:
    """What audiences read and write: the tag store, the staged consents, the catalog, the governance store,
    and tagml's own record of which customers were selected for which audience (the contact history)."""

    store: Any  # TagStore
    staged_dir: Path
    catalog: Any  # Catalog
    governance: Any  # GovernanceStore
    audiences_dir: Path

    @classmethod
    def from_settings(cls, settings: Settings) -> "AudienceSources":
        raise NotImplementedError


def parse_query(payload: Any, catalog: Any, visible_tags: Collection[str] | None = None) -> Any:
    """The validated query (raises AudienceQueryError); `visible_tags`: the tags the caller may use (None: every published one)."""
    raise NotImplementedError


def count_audience(
    con: duckdb.DuckDBPyConnection,
    sources: AudienceSources,
    query: Any,
    *,
    purpose: str | None = None,
    as_of: date | None = None,
    cap: ContactCap | None = None,
    visible_tags: Collection[str] | None = None,
) -> AudienceCount:
    """Count the customers `query` selects on the partition on or before `as_of`, with the exclusions of `purpose` and `cap`."""
    raise NotImplementedError
