"""The coverage check of a scored (not yet published) tag file, and the stability rule between partitions.

Each tag is checked against the customers of ITS feature snapshot: the contract's customer_features
for rule and contract model tags, its own snapshot for a tag scored from a bank's own table.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from tagml.training.catalog import UNKNOWN, Catalog, TagSpec


@dataclass(frozen=True)
class TagCoverage:
    """How one catalog tag covers its snapshot's customers in a scored file (counts only, no customer values)."""

    tag: str
    customers: int  # in the snapshot the tag was scored from
    rows: int
    customers_covered: int
    duplicate_rows: int
    rows_of_unknown_customers: int
    invalid_values: int
    invalid_examples: tuple[str, ...]

    @property
    def problems(self) -> list[str]:
        out = []
        if self.customers_covered < self.customers:
            out.append(f"{self.customers - self.customers_covered:,} of {self.customers:,} customers have no {self.tag!r} row")
        if self.duplicate_rows:
            out.append(f"{self.duplicate_rows:,} duplicate {self.tag!r} rows")
        if self.rows_of_unknown_customers:
            out.append(f"{self.rows_of_unknown_customers:,} {self.tag!r} rows of customers not in the snapshot")
        if self.invalid_values:
            out.append(f"{self.invalid_values:,} {self.tag!r} rows with a value outside its classes (e.g. {list(self.invalid_examples)})")
        return out


@dataclass(frozen=True)
class Coverage:
    """The coverage check of a scored file: every customer of a tag's snapshot has that tag exactly once,
    with a value among the tag's classes (or `unknown` where the tag has a min_confidence)."""

    customers: int  # distinct customers over every snapshot scored
    tags: tuple[TagCoverage, ...]
    rows: int
    rows_of_other_tags: int

    @property
    def expected_rows(self) -> int:
        return sum(t.customers for t in self.tags)

    @property
    def problems(self) -> list[str]:
        out = [p for t in self.tags for p in t.problems]
        if self.rows_of_other_tags:
            out.append(f"{self.rows_of_other_tags:,} rows of tags not in the catalog")
        return out

    @property
    def passed(self) -> bool:
        return not self.problems

    def metadata(self) -> dict[str, Any]:
        """Aggregates for the asset check (no customer-level values)."""
        return {
            "customers": self.customers,
            "rows": self.rows,
            "expected_rows": self.expected_rows,
            "tags": len(self.tags),
            "missing": sum(max(t.customers - t.customers_covered, 0) for t in self.tags),
            "duplicates": sum(t.duplicate_rows for t in self.tags),
            "invalid_values": sum(t.invalid_values for t in self.tags),
            "rows_of_other_tags": self.rows_of_other_tags,
        }


def allowed_values(tag: TagSpec) -> list[str]:
    """The values a tag's rows may hold: its classes, and `unknown` where low confidence is stored as such."""
    return [*tag.classes, *([UNKNOWN] if tag.kind == "model" and tag.min_confidence else [])]


def unstable_tags(changed_share: dict[str, float], catalog: Catalog) -> dict[str, float]:
    """Tags whose share of customers with a changed value since the previous partition exceeds the
    tag's `drift.max_changed_share`: a tag store that moved this much overnight usually means an input
    went wrong (a feature gone empty), not that the customers changed."""
    known = {t.name: t for t in catalog.tags}
    return {tag: share for tag, share in changed_share.items() if tag in known and share > known[tag].drift.max_changed_share}


def check_coverage(con: duckdb.DuckDBPyConnection, tags_path: Path, catalog: Catalog, sources: Mapping[str, Path]) -> Coverage:
    """Validate a scored tag file against the snapshot each catalog tag was scored from (`sources`: tag -> snapshot), set-based in DuckDB.

    Small aggregations instead of one join of every row: per tag the rows and distinct customers, per
    snapshot the rows of its tags' customers missing from it (an anti-join, empty when all is well), and
    per tag and value the counts (values are checked against the classes here).
    """
    tags = str(tags_path)
    counts = {
        t: (int(n), int(ids))
        for t, n, ids in con.execute("SELECT tag, count(*), count(DISTINCT customer_id) FROM read_parquet(?) GROUP BY tag", [tags]).fetchall()
    }
    by_snapshot: dict[str, list[str]] = {}
    for tag in catalog.tags:
        by_snapshot.setdefault(str(sources[tag.name]), []).append(tag.name)
    strangers: dict[str, tuple[int, int]] = {}
    customers: dict[str, int] = {}
    for snapshot, names in by_snapshot.items():
        for t, n, ids in con.execute(
            "SELECT t.tag, count(*), count(DISTINCT t.customer_id) FROM read_parquet(?) t "
            "ANTI JOIN read_parquet(?) f ON f.customer_id::VARCHAR = t.customer_id WHERE list_contains(?, t.tag) GROUP BY t.tag",
            [tags, snapshot, names],
        ).fetchall():
            strangers[t] = (int(n), int(ids))
        customers[snapshot] = int(con.execute("SELECT count(DISTINCT customer_id) FROM read_parquet(?)", [snapshot]).fetchall()[0][0])
    values: dict[str, dict[str | None, int]] = {}
    for tag, value, n in con.execute("SELECT tag, value, count(*) FROM read_parquet(?) GROUP BY ALL", [tags]).fetchall():
        values.setdefault(tag, {})[value] = int(n)
    per_tag = []
    for tag in catalog.tags:
        rows, ids = counts.get(tag.name, (0, 0))
        unknown_rows, unknown_ids = strangers.get(tag.name, (0, 0))
        allowed = set(allowed_values(tag))
        invalid = {v: n for v, n in values.get(tag.name, {}).items() if v not in allowed}
        examples = tuple(sorted("NULL" if v is None else v for v in invalid)[:5])
        per_tag.append(
            TagCoverage(tag.name, customers[str(sources[tag.name])], rows, ids - unknown_ids, rows - ids, unknown_rows, sum(invalid.values()), examples)
        )
    everyone = " UNION ".join("SELECT customer_id::VARCHAR FROM read_parquet(?)" for _ in by_snapshot)
    distinct = int(con.execute(f"SELECT count(*) FROM ({everyone})", list(by_snapshot)).fetchall()[0][0])
    known = {t.name for t in catalog.tags}
    total = sum(n for n, _ in counts.values())
    other = sum(n for t, (n, _) in counts.items() if t not in known)
    return Coverage(distinct, tuple(per_tag), total, other)
