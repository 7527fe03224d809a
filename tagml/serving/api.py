"""The tag API (FastAPI): a customer's tags, explanations, the tag dictionary with quality, audience counts and exports.

`create_app(settings)` builds the app; `tagml serve` runs it under uvicorn. Endpoints and scopes: docs/API.md.

The per-request path of `GET /customers/{id}/tags` is kept lean: one primary-key read of the online
store (its JSON passed through, not validated into models), the published tags from a cache that is
re-read only when the governance database changes (checked at most once a second), the catalog loaded
once at start, and the response serialised once with `json.dumps`. Customer ids are in every such
path, so the server never logs paths: uvicorn's access log is off (`serve`), and an internal error
is logged by request id and exception type only.
"""

import json
import logging
import os
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tagml import __version__
from tagml.compliance.exports import CONFIDENTIAL
from tagml.core.settings import Settings
from tagml.scoring.online import (
    OnlineStoreError,
    OnlineStoreUnavailableError,
    OnlineStoreUnreadableError,
    OnlineTagStore,
    SQLiteOnlineStore,
    freshness_days,
    open_online_store,
)
from tagml.serving.auth import EXPORT_AUDIENCES, READ_AUDIENCES, READ_CONFIDENTIAL, READ_TAGS, SCOPES, ApiKey, KeyRing
from tagml.serving.explain import explain_tag

log = logging.getLogger("tagml.serving.api")
PUBLISHED_CHECK_SECONDS = 1.0  # how often the governance database's file is looked at for a change of the tag lifecycle
MAX_CUSTOMER_ID = 128


class ApiError(Exception):
    """An error the caller gets as `{"error": {"code": ..., "message": ...}}` with this status."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any) -> Response:
    body = {"error": {"code": code, "message": message, **extra}}
    return Response(json.dumps(body, ensure_ascii=False).encode(), status_code=status, media_type="application/json", headers=headers)


def json_response(payload: Any) -> Response:
    return Response(json.dumps(payload, ensure_ascii=False, default=str).encode(), media_type="application/json")


class InternalErrors:
    """ASGI middleware: an exception no handler took becomes a 500 with a request id and no stack trace; the log gets the
    request id, the exception's type and the frames (never its message or the path: both may hold a customer id)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            request_id = uuid.uuid4().hex[:16]
            frames = "".join(traceback.format_tb(exc.__traceback__))
            log.error("internal error %s: %s (%s %s)\n%s", request_id, type(exc).__name__, scope.get("method"), scope.get("route_name", "-"), frames)
            if started:
                raise
            response = error_response(500, "internal_error", f"internal error; quote request id {request_id} to the operator", request_id=request_id)
            await response(scope, receive, send)


class PublishedTags:
    """The tag lifecycle's published tags (and every tag's status), re-read when the governance database changes."""

    def __init__(self, settings: Settings, catalog: Any):
        from tagml.core.governance import GovernanceStore

        self.governance = GovernanceStore(settings.governance_db)
        self.catalog = catalog
        self._lock = threading.Lock()
        self._checked = -1.0
        self._stamp: tuple | None = None
        self._published: frozenset[str] = frozenset()
        self._statuses: dict[str, str] = {}
        self.reads = 0

    def _file_stamp(self) -> tuple:
        stamp = []
        for path in (self.governance.path, Path(f"{self.governance.path}-wal")):
            try:
                st = os.stat(path)
                stamp.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except FileNotFoundError:
                stamp.append(None)
        return tuple(stamp)

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < PUBLISHED_CHECK_SECONDS:
            return
        with self._lock:
            if now - self._checked < PUBLISHED_CHECK_SECONDS:
                return
            stamp = self._file_stamp()
            if stamp != self._stamp:
                from tagml.compliance.lifecycle import PUBLISHED, statuses

                status = statuses(self.governance, self.catalog)
                self._statuses = {name: s.status for name, s in status.items()}
                self._published = frozenset(name for name, s in self._statuses.items() if s == PUBLISHED)
                self._stamp = stamp
                self.reads += 1
            self._checked = time.monotonic()

    def published(self) -> frozenset[str]:
        self._refresh()
        return self._published

    def statuses(self) -> dict[str, str]:
        self._refresh()
        return self._statuses


class AudienceRequest(BaseModel):
    """An audience count or export: the query (docs/AUDIENCES.md), the purpose its consent is checked for, the partition."""

    model_config = ConfigDict(extra="forbid")
    query: dict[str, Any] = Field(description="the audience query (JSON), docs/AUDIENCES.md")
    purpose: str | None = Field(None, description="what the audience is for: customers without that consent are excluded")
    as_of: date | None = Field(None, description="the tag partition (default: the newest)")


class AudienceExportRequest(AudienceRequest):
    name: str = Field(min_length=1, max_length=100, description="the audience's name (recorded)")
    format: str = Field("parquet", pattern="^(parquet|csv)$", description="parquet or csv")


_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the API key")


def create_app(settings: Settings, *, store: OnlineTagStore | None = None, catalog: Any = None) -> FastAPI:
    """The tag API over `settings`' online store, catalog, tag lifecycle and API keys (`store`/`catalog`: already opened ones)."""
    from tagml.training.catalog import load_catalog

    catalog = catalog if catalog is not None else load_catalog(settings.catalog_path)
    store = store if store is not None else open_online_store(settings.online_store)
    specs = {spec.name: spec for spec in catalog.tags}
    confidential = frozenset(name for name, spec in specs.items() if spec.sensitivity in CONFIDENTIAL)
    lifecycle = PublishedTags(settings, catalog)
    keys = KeyRing(settings.api_keys_path)

    app = FastAPI(
        title="tagml tag API",
        version=__version__,
        description="A bank's customer tags for the systems that use them (CRM, relationship managers, campaigns). Guide: docs/API.md.",
        # FastAPI's native OpenTelemetry spans carry the request path, i.e. a customer id, to whatever exporter a host configures
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    app.state.store, app.state.catalog, app.state.lifecycle, app.state.keys = store, catalog, lifecycle, keys
    app.add_middleware(InternalErrors)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc.status, exc.code, exc.message, headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = "no such endpoint (see /docs)" if exc.status_code == 404 else str(exc.detail)
        return error_response(exc.status_code, code, message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        # pydantic's own words, by place; never the input (it may be a customer id or a whole body)
        problems = [{"place": ".".join(str(p) for p in e.get("loc", ())), "message": e.get("msg", "invalid")} for e in exc.errors()]
        message = "; ".join(f"{p['place']}: {p['message']}" for p in problems) or "invalid request"
        return error_response(422, "invalid_request", message, problems=problems)

    @app.exception_handler(OnlineStoreError)
    async def _not_loaded(request: Request, exc: OnlineStoreError) -> Response:
        if isinstance(exc, OnlineStoreUnreadableError):  # the operator's log names the file; the caller learns only that it must wait
            log.error("the online tag store cannot be read (%s): rebuild it with `tagml online refresh`", type(exc).__name__)
            return error_response(503, "store_unreadable", "the online tag store cannot be read; the operator must rebuild it (`tagml online refresh`)")
        return error_response(503, "store_not_loaded", "the online tag store has not been loaded yet: run the nightly scoring job or `tagml online refresh`")

    @app.exception_handler(OnlineStoreUnavailableError)
    async def _unavailable(request: Request, exc: OnlineStoreUnavailableError) -> Response:
        return error_response(503, "store_unavailable", "the online tag store cannot be reached; try again later")

    def require(scope: str) -> Callable[..., ApiKey]:
        async def caller(  # async: a key check takes microseconds, a worker thread hop costs more
            bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)], header_key: Annotated[str | None, Security(_api_key_header)]
        ) -> ApiKey:
            key = header_key or (bearer.credentials if bearer is not None else None)
            if not key:
                raise ApiError(401, "unauthenticated", "an API key is needed: send `Authorization: Bearer <key>` or `X-API-Key: <key>`")
            principal = keys.authenticate(key)
            if principal is None:
                raise ApiError(401, "unauthenticated", "unknown or revoked API key")
            if scope not in principal.scopes:
                raise ApiError(403, "forbidden", f"this key lacks the scope {scope!r} ({SCOPES[scope]})")
            return principal

        return caller

    Reader = Annotated[ApiKey, Security(require(READ_TAGS), scopes=[READ_TAGS])]

    def record_of(customer_id: str) -> dict[str, Any]:
        if len(customer_id) > MAX_CUSTOMER_ID:
            raise ApiError(422, "invalid_request", f"a customer id has at most {MAX_CUSTOMER_ID} characters")
        record = store.customer(customer_id)
        if record is None:
            raise ApiError(404, "unknown_customer", "no customer with this id in the online tag store")
        return record

    def known_tag(name: str) -> Any:
        spec = specs.get(name)
        if spec is None:
            raise ApiError(404, "unknown_tag", f"no tag {name!r} in the catalog; known: {', '.join(specs)}")
        return spec

    # --- customers -------------------------------------------------------------------------------

    def tags_of(caller: ApiKey, customer_id: str, tag: list[str] | None) -> Response:
        wanted = None
        if tag:
            wanted = set(tag)
            for name in wanted:
                known_tag(name)
        record = record_of(customer_id)
        published = lifecycle.published()
        may_see_confidential = READ_CONFIDENTIAL in caller.scopes
        shown, hidden = [], []
        for entry in record["tags"]:
            name = entry["tag"]
            if wanted is not None and name not in wanted:
                continue
            if name not in published:
                hidden.append({"tag": name, "why": "not published"})
            elif name in confidential and not may_see_confidential:
                hidden.append({"tag": name, "why": f"{specs[name].sensitivity}: needs the scope {READ_CONFIDENTIAL}"})
            else:
                shown.append(entry)
        return json_response({"customer_id": customer_id, "as_of": record["as_of"], "scored_at": record["scored_at"], "tags": shown, "hidden": hidden})

    summary = "A customer's published tags"
    doc = """Published tags with value, probabilities, reasons, source, observed vs inferred, producer and model version.
        Unpublished tags, and confidential/restricted ones without `read:confidential`, are named under `hidden` with why."""
    if isinstance(store, SQLiteOnlineStore):
        # a primary-key read of a local file takes tens of microseconds: on the event loop, not a worker thread
        @app.get("/customers/{customer_id}/tags", tags=["customers"], summary=summary, description=doc)
        async def customer_tags(
            customer_id: str, caller: Reader, tag: Annotated[list[str] | None, Query(description="only these tags (repeatable)")] = None
        ) -> Response:
            return tags_of(caller, customer_id, tag)
    else:
        # a database over the network: a worker thread, so that a slow answer does not stall every other request

        @app.get("/customers/{customer_id}/tags", tags=["customers"], summary=summary, description=doc)
        def customer_tags(
            customer_id: str, caller: Reader, tag: Annotated[list[str] | None, Query(description="only these tags (repeatable)")] = None
        ) -> Response:
            return tags_of(caller, customer_id, tag)

    @app.get("/customers/{customer_id}/tags/{tag}/explanation", tags=["customers"], summary="Why a customer has a tag, in words")
    def explanation(customer_id: str, tag: str, caller: Reader) -> Response:
        """The tag's reasons as sentences a relationship manager can say to the customer (PIPL Art. 24), its source, and the
        catalog's intended use and limitations."""
        spec = known_tag(tag)
        if tag not in lifecycle.published():
            raise ApiError(404, "tag_not_published", f"tag {tag!r} is not published (status {lifecycle.statuses().get(tag)})")
        if tag in confidential and READ_CONFIDENTIAL not in caller.scopes:
            raise ApiError(403, "forbidden", f"tag {tag!r} is {spec.sensitivity}: this key lacks the scope {READ_CONFIDENTIAL!r}")
        record = record_of(customer_id)
        entry = next((e for e in record["tags"] if e["tag"] == tag), None)
        if entry is None:
            raise ApiError(404, "tag_not_scored", f"tag {tag!r} has no value for this customer as of {record['as_of']}")
        return json_response({"customer_id": customer_id, "as_of": record["as_of"], "scored_at": record["scored_at"], **explain_tag(entry, spec)})

    # --- the tag dictionary ----------------------------------------------------------------------

    def quality_by_tag() -> dict[str, dict[str, Any]]:
        try:
            return {q.tag: q.as_dict() for q in store.quality()}
        except OnlineStoreError:
            return {}

    def describe(spec: Any, status: str | None, quality: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "name": spec.name,
            "description": spec.description,
            "kind": spec.kind,
            "classes": list(spec.classes),
            "ordinal": spec.ordinal,
            "owner": spec.owner,
            "sensitivity": spec.sensitivity,
            "refresh": spec.refresh,
            "status": status,
            "intended_use": spec.intended_use,
            "limitations": spec.limitations,
            "quality": quality,
        }

    @app.get("/tags", tags=["tags"], summary="The tag dictionary, with quality")
    def tag_dictionary(caller: Reader) -> Response:
        """Every catalog tag with its lifecycle status and, per tag, coverage, changed share and freshness of the loaded partition."""
        status, quality = lifecycle.statuses(), quality_by_tag()
        return json_response({"tags": [describe(spec, status.get(name), quality.get(name)) for name, spec in specs.items()]})

    @app.get("/tags/{tag}", tags=["tags"], summary="One tag of the dictionary")
    def tag_entry(tag: str, caller: Reader) -> Response:
        spec = known_tag(tag)
        return json_response(describe(spec, lifecycle.statuses().get(tag), quality_by_tag().get(tag)))

    # --- health ----------------------------------------------------------------------------------

    @app.get("/health", tags=["health"], summary="Is the online store loaded (no key needed)")
    def health() -> Response:
        try:
            snapshot = store.snapshot()
        except OnlineStoreUnavailableError:
            return error_response(503, "store_unavailable", "the online tag store cannot be reached")
        if snapshot is None:
            return error_response(503, "store_not_loaded", "the online tag store has not been loaded yet")
        return json_response(
            {
                "status": "ok",
                "as_of": snapshot.as_of,
                "scored_at": snapshot.scored_at,
                "loaded_at": snapshot.loaded_at,
                "customers": snapshot.customers,
                "freshness_days": freshness_days(snapshot.as_of),
                "version": __version__,
            }
        )

    _audience_endpoints(app, settings, catalog, lifecycle, confidential, require)
    return app


def _audience_endpoints(app: FastAPI, settings: Settings, catalog: Any, lifecycle: PublishedTags, confidential: frozenset[str], require: Callable) -> None:
    """POST /audiences/count, POST /audiences, GET /audiences/{id}, GET /audiences/{id}/file: thin calls into tagml.serving.audiences.

    One DuckDB connection for the app, used by one request at a time: audiences cache the partition's wide table in it
    (a count after the first is set-based SQL over a table in memory), and a DuckDB connection is not for concurrent use."""
    from tagml.core.storage import connect
    from tagml.serving import audiences

    sources = audiences.AudienceSources.from_settings(settings)
    con = connect(settings.threads, settings.duckdb_memory_limit)
    con_lock = threading.Lock()
    Counter = Annotated[ApiKey, Security(require(READ_AUDIENCES), scopes=[READ_AUDIENCES])]
    Exporter = Annotated[ApiKey, Security(require(EXPORT_AUDIENCES), scopes=[EXPORT_AUDIENCES])]

    def visible(caller: ApiKey) -> frozenset[str]:
        published = lifecycle.published()
        return published if READ_CONFIDENTIAL in caller.scopes else published - confidential

    def run(work: Callable[[Any], Any]) -> Any:
        try:
            with con_lock:
                return work(con)
        except audiences.AudienceQueryError as exc:
            raise ApiError(422, "invalid_query", str(exc)) from None
        except audiences.AudienceError as exc:
            raise ApiError(404, "audience_not_possible", str(exc)) from None

    @app.post("/audiences/count", tags=["audiences"], summary="How many customers a query selects")
    def count(body: AudienceRequest, caller: Counter) -> Response:
        """Matched, excluded (no consent, withdrawn, contact cap) and selected customers of the query on the partition."""
        tags = visible(caller)
        cap = audiences.ContactCap.from_settings(settings)
        result = run(lambda db: audiences.count_audience(db, sources, body.query, purpose=body.purpose, as_of=body.as_of, cap=cap, visible_tags=tags))
        return json_response(result.as_dict())

    @app.post("/audiences", tags=["audiences"], summary="Export an audience (written under the home)", status_code=201)
    def export(body: AudienceExportRequest, caller: Exporter) -> Response:
        """Select the audience and write its file under the home's audiences/ (never a path from the request), with its
        manifest, contact history and a counts-only record; download it from /audiences/{id}/file."""
        tags = visible(caller)
        cap = audiences.ContactCap.from_settings(settings)
        if body.purpose is None:
            raise ApiError(422, "invalid_request", "body.purpose: an export needs a purpose")
        record = run(
            lambda db: audiences.export_audience(
                db,
                sources,
                body.query,
                name=body.name,
                purpose=body.purpose,
                by=f"api-key:{caller.name}",
                fmt=body.format,
                as_of=body.as_of,
                cap=cap,
                visible_tags=tags,
            )
        )
        response = json_response(public_record(record.as_dict()))
        response.status_code = 201
        return response

    def public_record(record: dict[str, Any]) -> dict[str, Any]:
        """The record without the server's file paths (the file is downloaded through the API)."""
        return {k: v for k, v in record.items() if k not in ("out", "contact_history")} | {"file": f"/audiences/{record['audience_id']}/file"}

    def audience_record(audience_id: str) -> dict[str, Any]:
        if not audience_id.isalnum() or len(audience_id) > 64:
            raise ApiError(404, "unknown_audience", "no audience with this id")
        found = audiences.recorded_audiences(sources.governance, limit=1, audience_id=audience_id)
        if not found:
            raise ApiError(404, "unknown_audience", "no audience with this id")
        return found[0]

    @app.get("/audiences/{audience_id}", tags=["audiences"], summary="An exported audience's record")
    def audience(audience_id: str, caller: Counter) -> Response:
        return json_response(public_record(audience_record(audience_id)))

    @app.get("/audiences/{audience_id}/file", tags=["audiences"], summary="Download an exported audience's file")
    def audience_file(audience_id: str, caller: Exporter) -> Response:
        record = audience_record(audience_id)
        path = Path(record["out"])
        if not path.resolve().is_relative_to(Path(sources.audiences_dir).resolve()):
            raise ApiError(404, "audience_file_elsewhere", "this audience was written outside the home's audiences directory (by the CLI); fetch it there")
        if not path.is_file():
            raise ApiError(404, "audience_file_missing", "the audience's file is no longer there (erased or removed)")
        return FileResponse(path, filename=path.name, media_type="application/octet-stream")
