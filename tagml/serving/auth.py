"""API keys and scopes: keys are random tokens shown once; the keys file stores only their sha256, a name and scopes.

The keys file (settings.api_keys_path, mode 0600) is rewritten whole and swapped atomically on every
change, under an exclusive lock so that two `tagml api-key create` at once both land. The server
(`KeyRing`) re-reads it when the file changes, so a key created or revoked takes effect without a restart.
"""

import fcntl
import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tagml.core.storage import atomic_replace

READ_TAGS = "read:tags"  # a customer's published, non-confidential tags, explanations, the tag dictionary
READ_CONFIDENTIAL = "read:confidential"  # also confidential and restricted tags (risk appetite, suitability)
READ_AUDIENCES = "read:audiences"  # audience counts, and the records of exported audiences
EXPORT_AUDIENCES = "export:audiences"  # write an audience file and download it (personal data leaves tagml)
SCOPES: dict[str, str] = {
    READ_TAGS: "a customer's published tags (not confidential or restricted ones), their explanations, the tag dictionary",
    READ_CONFIDENTIAL: "also the confidential and restricted tags' values (with read:tags)",
    READ_AUDIENCES: "audience counts and the records of exported audiences",
    EXPORT_AUDIENCES: "export an audience (its customers) and download the file",
}
KEY_PREFIX = "tgk_"  # recognisable in a leaked-secret scan
KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
FILE_VERSION = 1


class ApiKeyError(ValueError):
    """A key that cannot be created or revoked as asked (an unknown scope or name, a name already taken)."""


@dataclass(frozen=True)
class ApiKey:
    """What the keys file holds about one key: never the key itself."""

    name: str
    scopes: tuple[str, ...]
    created: str
    sha256: str

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "scopes": list(self.scopes)}

    def public(self) -> dict[str, Any]:
        """What `tagml api-key list` shows (no hash: it is not secret, but nobody needs it)."""
        return {"name": self.name, "scopes": list(self.scopes), "created": self.created}


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def check_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    """The scopes, validated and de-duplicated in the order given (raises ApiKeyError naming an unknown one)."""
    chosen = tuple(dict.fromkeys(scopes))
    if not chosen:
        raise ApiKeyError(f"a key needs at least one scope; known: {', '.join(SCOPES)}")
    unknown = [s for s in chosen if s not in SCOPES]
    if unknown:
        raise ApiKeyError(f"unknown scope {unknown[0]!r}; known: {', '.join(SCOPES)}")
    return chosen


def read_keys(path: Path) -> list[ApiKey]:
    """The keys in the file (none when it does not exist yet); a damaged file is an error naming it, never an empty key set."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    try:
        payload = json.loads(text)
        return [ApiKey(k["name"], tuple(k["scopes"]), k["created"], k["sha256"]) for k in payload["keys"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ApiKeyError(f"the API keys file {path} is damaged ({type(exc).__name__}); restore it from a backup or recreate the keys") from None


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_keys(path: Path, keys: list[ApiKey]) -> None:
    payload = {"version": FILE_VERSION, "keys": [k.as_dict() for k in keys]}
    with atomic_replace(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)  # the temporary may have existed with the umask's mode


def create_key(path: Path, name: str, scopes: Iterable[str], now: datetime | None = None) -> tuple[str, ApiKey]:
    """A new random key (returned once, never stored) and its record; raises ApiKeyError for a bad or taken name or scope."""
    if not KEY_NAME.match(name or ""):
        raise ApiKeyError("a key name is 1-64 letters, digits, '_', '.', '@' or '-', starting with a letter or digit")
    chosen = check_scopes(scopes)
    path = Path(path)
    with _locked(path):
        keys = read_keys(path)
        if any(k.name == name for k in keys):
            raise ApiKeyError(f"a key named {name!r} exists already: revoke it first or choose another name")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        record = ApiKey(name, chosen, (now or datetime.now(UTC)).isoformat(timespec="seconds"), key_digest(secret))
        _write_keys(path, [*keys, record])
    return secret, record


def revoke_key(path: Path, name: str) -> ApiKey:
    """Remove the key named `name` (raises ApiKeyError if there is none)."""
    path = Path(path)
    with _locked(path):
        keys = read_keys(path)
        gone = [k for k in keys if k.name == name]
        if not gone:
            raise ApiKeyError(f"no API key named {name!r}; known: {[k.name for k in keys]}")
        _write_keys(path, [k for k in keys if k.name != name])
    return gone[0]


def list_keys(path: Path) -> list[ApiKey]:
    return read_keys(Path(path))


class KeyRing:
    """The keys the server accepts, by sha256; re-read when the file changes (inode, size, mtime)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self._by_digest: dict[str, ApiKey] = {}

    def _current(self) -> dict[str, ApiKey]:
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            # a damaged file raises (the request fails as an internal error) rather than silently accepting nobody or anybody
            self._by_digest = {k.sha256: k for k in read_keys(self.path)} if stamp is not None else {}
            self._stamp = stamp
        return self._by_digest

    def authenticate(self, key: str) -> ApiKey | None:
        """The key's record, or None for a key that is not (or no longer) in the file."""
        if not key:
            return None
        return self._current().get(key_digest(key))
