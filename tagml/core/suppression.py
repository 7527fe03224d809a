"""The suppression list: erased customers, kept as salted SHA-256 hashes so that no later delivery brings them back.

The list lives in the governance store and never holds an id: only `sha256(salt || customer_id)` (hex),
the salt being a random secret of this home (`erasure.salt` beside the governance file, mode 0600,
created by the first erasure). Staging (DuckDB and Spark) computes the same hash in SQL and drops the
rows that match, so the bank's raw directory may keep the customer without the warehouse seeing them.
Imports only the governance store: the feature layer reads it at staging.
"""

import hashlib
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tagml.core.governance import GovernanceStore, GovernanceUnavailableError, Table

SALT_FILE = "erasure.salt"
SALT = re.compile(r"^[0-9a-f]{64}$")
SUPPRESSED = Table(
    "suppressed_customers",
    ("CREATE TABLE IF NOT EXISTS suppressed_customers (customer_hash TEXT PRIMARY KEY, erasure_id TEXT NOT NULL, suppressed_at TEXT NOT NULL)",),
)


@dataclass(frozen=True)
class Suppression:
    """The home's salt and the hashes of every erased customer."""

    salt: str
    hashes: frozenset[str]


def salt_path(governance_db: Path) -> Path:
    return Path(governance_db).parent / SALT_FILE


def _read_salt(path: Path) -> str:
    salt = path.read_text().strip()
    if not SALT.match(salt):
        raise GovernanceUnavailableError(
            f"the erasure salt {path} is not 64 hex characters: restore it from the home's backup (erased customers are hashed with it)"
        )
    return salt


def home_salt(governance_db: Path) -> str:
    """The home's erasure salt, created (mode 0600, exclusive create: two first erasures agree) when missing."""
    path = salt_path(governance_db)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_salt(path)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32) + "\n")
    return _read_salt(path)


def customer_hash(salt: str, customer_id: str) -> str:
    """What staging computes in SQL: DuckDB `sha256(salt || id)`, Spark `sha2(salt || id, 256)` (UTF-8, hex)."""
    return hashlib.sha256((salt + customer_id).encode("utf-8")).hexdigest()


def load_suppression(governance_db: Path) -> Suppression | None:
    """The suppression list, or None while nobody was erased in this home (no governance file is created by reading).

    Hashes without their salt cannot be matched: that is an error, never a silent "nobody is suppressed".
    """
    if not Path(governance_db).exists():
        return None
    with GovernanceStore(governance_db).read(SUPPRESSED) as con:
        hashes = frozenset(row[0] for row in con.execute("SELECT customer_hash FROM suppressed_customers"))
    if not hashes:
        return None
    path = salt_path(governance_db)
    if not path.exists():
        raise GovernanceUnavailableError(
            f"the governance store lists {len(hashes)} erased customers but the erasure salt {path} is missing: restore it from the home's backup"
        )
    return Suppression(_read_salt(path), hashes)


def suppress(con, salt: str, customer_ids: Iterable[str], erasure_id: str, when: str) -> int:
    """Add the customers' hashes inside the caller's governance transaction; returns how many were new."""
    before = con.total_changes
    con.executemany(
        "INSERT OR IGNORE INTO suppressed_customers (customer_hash, erasure_id, suppressed_at) VALUES (?, ?, ?)",
        [(customer_hash(salt, c), erasure_id, when) for c in customer_ids],
    )
    return con.total_changes - before
