"""Consent per purpose (PIPL Art. 13/24, PBOC: a customer may refuse personalised marketing), from the staged `consents` table.

For a purpose and a day, the newest event recorded on or before the end of that day decides; a
customer with no event has not consented (opt-in). Raw timestamps are the bank's wall-clock time
(TAGML_TIMEZONE, like every timestamp of the contract), so the end of the day is the next midnight.
On the same instant a withdrawal outweighs a grant.

`service` is the purpose of an export that needs no consent (servicing an existing relationship,
PIPL Art. 13(2)): it filters no customer, and the export's record says so.
"""

from datetime import date, timedelta
from pathlib import Path

from tagml.core.storage import sql_literal, staged_path
from tagml.features.contract import CONSENT_PURPOSES

SERVICE = "service"
EXPORT_PURPOSES = (*CONSENT_PURPOSES, SERVICE)
# why a customer is left out of a purpose-marked export (counted per reason in the export's record)
NO_CONSENT, WITHDRAWN = "no_consent", "withdrawn"


class ConsentUnavailableError(RuntimeError):
    """A purpose needs consent and no consents table was delivered: nothing may be exported for it."""


class UnknownPurposeError(ValueError):
    """An export names a purpose that is neither a consent purpose nor `service`."""


def check_purpose(purpose: str) -> str:
    if purpose not in EXPORT_PURPOSES:
        raise UnknownPurposeError(f"unknown export purpose {purpose!r}; use one of {', '.join(EXPORT_PURPOSES)}")
    return purpose


def needs_consent(purpose: str) -> bool:
    return check_purpose(purpose) != SERVICE


def consent_states_sql(staged_dir: Path, purpose: str, as_of: date) -> str:
    """A relation (customer_id, state): each customer's deciding event for `purpose` at the end of `as_of`, granted or withdrawn."""
    if purpose not in CONSENT_PURPOSES:
        raise UnknownPurposeError(f"{purpose!r} is not a consent purpose; consent purposes: {', '.join(CONSENT_PURPOSES)}")
    path = staged_path(Path(staged_dir), "consents")
    if not path.exists():
        raise ConsentUnavailableError(
            f"no consents table was delivered (the staged table {path} does not exist): a {purpose} export cannot tell who consented, "
            f"so nothing was exported; deliver the consents table, or export with purpose {SERVICE!r} if no consent is needed"
        )
    end_of_day = (as_of + timedelta(days=1)).isoformat()
    return (
        f"SELECT customer_id, status AS state FROM read_parquet({sql_literal(path)}) "
        f"WHERE purpose = {sql_literal(purpose)} AND recorded_at < CAST({sql_literal(end_of_day)} AS TIMESTAMP) "
        "QUALIFY row_number() OVER (PARTITION BY customer_id ORDER BY recorded_at DESC, status = 'withdrawn' DESC) = 1"
    )


def exclusions_sql(customers_sql: str, staged_dir: Path, purpose: str, as_of: date) -> str:
    """A relation (customer_id, excluded_because) over `customers_sql`'s customers: NULL when they consented,
    else `withdrawn` or `no_consent`. `customers_sql` is a relation with a customer_id column built from validated names."""
    states = consent_states_sql(staged_dir, purpose, as_of)
    return (
        "SELECT c.customer_id, CASE WHEN s.state = 'granted' THEN NULL WHEN s.state = 'withdrawn' THEN "
        f"{sql_literal(WITHDRAWN)} ELSE {sql_literal(NO_CONSENT)} END AS excluded_because "
        f"FROM (SELECT DISTINCT customer_id FROM ({customers_sql})) c LEFT JOIN ({states}) s USING (customer_id)"
    )
