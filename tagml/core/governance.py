"""The governance store: one SQLite file (TAGML_GOVERNANCE_DB) holding the tag lifecycle, export and
audience decisions, and erasure receipts.

Each concern declares its own tables (`Table`) and opens them with `GovernanceStore.transaction`,
which creates what is missing. Every statement takes its values as parameters; table and column names
come only from the declarations in this package, never from user or data text.

It is kept apart from the catalog YAML on purpose: who approved or published a tag, and what an export
excluded, must not depend on a file anyone with commit rights can rewrite.
"""

import sqlite3
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path


class GovernanceUnavailableError(RuntimeError):
    """The governance store cannot be opened or written (its path, permissions, a corrupt file)."""


@dataclass(frozen=True)
class Table:
    """A governance table: its name and its CREATE TABLE IF NOT EXISTS statement (and any indexes)."""

    name: str
    ddl: tuple[str, ...]


def utc_now() -> str:
    """The store's timestamp format: ISO 8601 in UTC, to the second."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


class GovernanceStore:
    """The SQLite governance file. Writers take an immediate (exclusive write) transaction, so two
    approvals or two exports never interleave, and a failed block leaves nothing behind."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @contextmanager
    def transaction(self, *tables: Table) -> Iterator[sqlite3.Connection]:
        """A connection inside one transaction, with `tables` created if missing; committed when the block succeeds."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise GovernanceUnavailableError(f"the governance store {self.path} cannot be opened (TAGML_GOVERNANCE_DB): {exc}") from exc
        try:
            con.execute("PRAGMA foreign_keys = ON")
            con.execute("BEGIN IMMEDIATE")
            for table in tables:
                for statement in table.ddl:
                    con.execute(statement)
            yield con
            con.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise GovernanceUnavailableError(f"the governance store {self.path} failed (TAGML_GOVERNANCE_DB): {exc}") from exc
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        finally:
            con.close()

    def read(self, *tables: Table) -> AbstractContextManager[sqlite3.Connection]:
        """The same as `transaction` (SQLite readers are cheap); named for call sites that only read."""
        return self.transaction(*tables)
