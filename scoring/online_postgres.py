"""The online tag store on PostgreSQL (TAGML_ONLINE_STORE=postgresql://...): the same contract as the SQLite file,
loaded with COPY into a new table and swapped in one transaction."""

from typing import Any


class PostgresOnlineStore:
    def __init__(self, url: str):
        self.url = url

    def __getattr__(self, name: str) -> Any:
        raise NotImplementedError(f"PostgresOnlineStore.{name}")
