"""The audience query language: parsed and validated by hand against the catalog, then compiled to DuckDB SQL.

Hand validation rather than pydantic models: every error must name its place in the query as a JSON
path (`query.all[2].in[0]: 'C9' is not a class of risk_appetite (C1..C5)`), a node is told apart by
which keys it has (a boolean, a tag condition, a consent), and the checks that matter are against the
catalog (classes, visibility), not types; a discriminated union in pydantic would report its own loc
tuples and messages that we would then have to rewrite anyway. The parser is the only thing that
sees the caller's JSON; the compiler sees only validated nodes, and every value reaches DuckDB as
a bound parameter (tag names, validated by the catalog, become column names through `quote`).
"""

import hashlib
import json
import math
from collections.abc import Collection
from dataclasses import dataclass
from datetime import date
from typing import Any

from tagml.compliance.consent import CONSENT_PURPOSES
from tagml.core.storage import quote

MAX_DEPTH = 8  # nesting of all/any/not
MAX_NODES = 200  # conditions and booleans in one query
MAX_LIST = 100  # entries of one list (all/any items, classes)
COMPARISONS = {"gte": ">=", "gt": ">", "lte": "<=", "lt": "<"}


@dataclass(frozen=True)
class Boolean:
    op: str  # all | any | not
    items: tuple["Node", ...]


@dataclass(frozen=True)
class InClasses:
    tag: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class Probability:
    tag: str
    bounds: tuple[tuple[str, float], ...]  # (gte|gt|lte|lt, x), sorted
    of_class: str | None  # None: the probability of the tag's assigned value


@dataclass(frozen=True)
class Changed:
    tag: str
    since: date
    from_values: tuple[str, ...]  # empty: any value before
    to_values: tuple[str, ...]  # empty: any value now


@dataclass(frozen=True)
class Consent:
    purpose: str


Node = Boolean | InClasses | Probability | Changed | Consent


@dataclass(frozen=True)
class Query:
    """A validated query: the caller's JSON as given, its tree, and its normalised form (sorted, deduplicated)."""

    given: Any
    root: Node

    @property
    def normalised(self) -> dict[str, Any]:
        return _normalise(self.root)

    @property
    def sha256(self) -> str:
        """The hash of the normalised query (canonical JSON): equal for queries that select the same way."""
        return hashlib.sha256(json.dumps(self.normalised, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def tags(self) -> list[str]:
        """The tags the query uses, sorted."""
        return sorted({n.tag for n in _walk(self.root) if not isinstance(n, Boolean | Consent)})

    def changed_conditions(self) -> list[Changed]:
        return [n for n in _walk(self.root) if isinstance(n, Changed)]

    def since_dates(self) -> list[date]:
        return sorted({n.since for n in _walk(self.root) if isinstance(n, Changed)})

    def consent_purposes(self) -> list[str]:
        return sorted({n.purpose for n in _walk(self.root) if isinstance(n, Consent)})


def _walk(node: Node):
    yield node
    if isinstance(node, Boolean):
        for item in node.items:
            yield from _walk(item)


def _normalise(node: Node) -> dict[str, Any]:
    if isinstance(node, Boolean):
        if node.op == "not":
            return {"not": _normalise(node.items[0])}
        return {node.op: [_normalise(i) for i in node.items]}
    if isinstance(node, InClasses):
        return {"tag": node.tag, "in": list(node.values)}
    if isinstance(node, Probability):
        out: dict[str, Any] = dict(node.bounds)
        if node.of_class is not None:
            out["class"] = node.of_class
        return {"tag": node.tag, "probability": out}
    if isinstance(node, Changed):
        return {"tag": node.tag, "changed": {"from": list(node.from_values), "to": list(node.to_values), "since": node.since.isoformat()}}
    return {"consent": node.purpose}


def _show(value: Any) -> str:
    """A caller's value in a message, shortened (it is their own request echoed back)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Parser:
    def __init__(self, catalog: Any, visible_tags: Collection[str] | None):
        self.specs = {t.name: t for t in catalog.tags}
        self.visible = None if visible_tags is None else frozenset(visible_tags)
        self.nodes = 0

    def fail(self, path: str, message: str) -> Exception:
        # the error class lives in tagml.serving.audiences (the CLI maps it by that name); imported here, not at the top, to avoid a cycle
        from tagml.serving.audiences import AudienceQueryError

        return AudienceQueryError(f"{path}: {message}")

    def node(self, raw: Any, path: str, depth: int) -> Node:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise self.fail(path, f"the query has more than {MAX_NODES} conditions; split it")
        if depth > MAX_DEPTH:
            raise self.fail(path, f"nested deeper than {MAX_DEPTH} levels of all/any/not")
        if not isinstance(raw, dict):
            raise self.fail(path, f"expected an object (a condition or all/any/not), got {type(raw).__name__} {_show(raw)}")
        booleans = [k for k in ("all", "any", "not") if k in raw]
        if booleans:
            if len(raw) != 1:
                raise self.fail(path, f"{booleans[0]!r} must be the only key of its object; found {sorted(map(str, raw))}")
            op = booleans[0]
            if op == "not":
                return Boolean("not", (self.node(raw["not"], f"{path}.not", depth + 1),))
            items = raw[op]
            if not isinstance(items, list) or not items:
                raise self.fail(f"{path}.{op}", f"expected a non-empty list of conditions, got {_show(items)}")
            if len(items) > MAX_LIST:
                raise self.fail(f"{path}.{op}", f"more than {MAX_LIST} conditions in one list")
            return Boolean(op, tuple(self.node(item, f"{path}.{op}[{i}]", depth + 1) for i, item in enumerate(items)))
        if "consent" in raw:
            self.keys(raw, {"consent"}, path)
            purpose = raw["consent"]
            if not isinstance(purpose, str) or purpose not in CONSENT_PURPOSES:
                raise self.fail(f"{path}.consent", f"{_show(purpose)} is not a consent purpose (use one of {', '.join(CONSENT_PURPOSES)})")
            return Consent(purpose)
        if "tag" in raw:
            return self.condition(raw, path)
        raise self.fail(path, f"expected one of all, any, not, tag or consent; found keys {sorted(map(str, raw))}")

    def keys(self, raw: dict, allowed: set[str], path: str) -> None:
        extra = sorted(map(str, set(raw) - allowed))
        if extra:
            raise self.fail(path, f"unknown keys {extra} (allowed here: {', '.join(sorted(allowed))})")

    def tag(self, raw: Any, path: str) -> Any:
        if not isinstance(raw, str):
            raise self.fail(path, f"a tag name is text, got {_show(raw)}")
        spec = self.specs.get(raw)
        if spec is None:
            raise self.fail(path, f"unknown tag {_show(raw)}; the catalog has {', '.join(self.specs)}")
        if self.visible is not None and raw not in self.visible:
            raise self.fail(path, f"tag {raw!r} is not available to this caller (not published, or confidential without the scope)")
        return spec

    def classes(self, raw: Any, spec: Any, path: str, allow_empty: bool = False) -> tuple[str, ...]:
        if not isinstance(raw, list) or (not raw and not allow_empty):
            raise self.fail(path, f"expected a non-empty list of classes of {spec.name}, got {_show(raw)}")
        if len(raw) > MAX_LIST:
            raise self.fail(path, f"more than {MAX_LIST} classes")
        for i, value in enumerate(raw):
            if not isinstance(value, str) or value not in spec.classes:
                raise self.fail(f"{path}[{i}]", f"{_show(value)} is not a class of {spec.name} ({', '.join(spec.classes)})")
        return tuple(sorted(set(raw), key=spec.classes.index))

    def condition(self, raw: dict, path: str) -> Node:
        operators = [k for k in ("in", "probability", "changed") if k in raw]
        if len(operators) != 1:
            raise self.fail(path, f"a tag condition needs exactly one of in, probability, changed; found {operators or 'none'}")
        op = operators[0]
        self.keys(raw, {"tag", op}, path)
        spec = self.tag(raw["tag"], f"{path}.tag")
        body, where = raw[op], f"{path}.{op}"
        if op == "in":
            return InClasses(spec.name, self.classes(body, spec, where))
        if op == "probability":
            if not isinstance(body, dict) or not body:
                raise self.fail(where, f"expected an object like {{'gte': 0.7}}, got {_show(body)}")
            self.keys(body, {*COMPARISONS, "class"}, where)
            bounds = []
            for key in sorted(k for k in body if k in COMPARISONS):
                value = body[key]
                if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not 0 <= value <= 1:
                    raise self.fail(f"{where}.{key}", f"a probability is a number from 0 to 1, got {_show(value)}")
                bounds.append((key, float(value)))
            if not bounds:
                raise self.fail(where, f"give at least one bound of {', '.join(COMPARISONS)}")
            of_class = body.get("class")
            if of_class is not None and (not isinstance(of_class, str) or of_class not in spec.classes):
                raise self.fail(f"{where}.class", f"{_show(of_class)} is not a class of {spec.name} ({', '.join(spec.classes)})")
            if spec.kind != "model":
                raise self.fail(f"{path}.tag", f"{spec.name} is a rule tag: it has no probabilities (use 'in')")
            return Probability(spec.name, tuple(bounds), of_class)
        if not isinstance(body, dict):
            raise self.fail(where, f"expected an object like {{'from': [...], 'to': [...], 'since': 'YYYY-MM-DD'}}, got {_show(body)}")
        self.keys(body, {"from", "to", "since"}, where)
        since = body.get("since")
        try:
            day = date.fromisoformat(since) if isinstance(since, str) and len(since) == 10 else None
        except ValueError:
            day = None
        if day is None:
            raise self.fail(f"{where}.since", f"expected a date YYYY-MM-DD, got {_show(since)}")
        before = self.classes(body["from"], spec, f"{where}.from") if "from" in body else ()
        after = self.classes(body["to"], spec, f"{where}.to") if "to" in body else ()
        return Changed(spec.name, day, before, after)


def parse_query(payload: Any, catalog: Any, visible_tags: Collection[str] | None = None) -> Query:
    """The validated query (raises tagml.serving.audiences.AudienceQueryError naming the path); `visible_tags`: the tags the caller may use (None: any catalog tag)."""
    if isinstance(payload, Query):
        payload = payload.given
    root = _Parser(catalog, visible_tags).node(payload, "query", 0)
    return Query(payload, root)


@dataclass
class Compiled:
    """A WHERE predicate over the current wide table `w` and the aliases it joins, with its parameters in order."""

    predicate: str
    params: list[Any]


def compile_predicate(root: Node, since_alias: dict[date, str], consent_alias: dict[str, str]) -> Compiled:
    """The predicate of the validated tree; every leaf is two-valued (coalesce to false) so that NOT of a missing value is true."""
    params: list[Any] = []

    def leaf(sql: str) -> str:
        return f"coalesce({sql}, false)"

    def go(node: Node) -> str:
        if isinstance(node, Boolean):
            if node.op == "not":
                return f"(NOT {go(node.items[0])})"
            joiner = " AND " if node.op == "all" else " OR "
            return "(" + joiner.join(go(i) for i in node.items) + ")"
        if isinstance(node, InClasses):
            params.append(list(node.values))
            return leaf(f"list_contains(?, w.{quote('v:' + node.tag)})")
        if isinstance(node, Probability):
            if node.of_class is None:
                value = f"w.{quote('p:' + node.tag)}"
            else:
                params.append(node.of_class)
                value = f"map_extract_value(w.{quote('m:' + node.tag)}, ?)"
            checks = []
            for key, bound in node.bounds:
                params.append(bound)
                checks.append(f"{value} {COMPARISONS[key]} ?")
            return leaf("(" + " AND ".join(checks) + ")")
        if isinstance(node, Changed):
            before, after = f"{since_alias[node.since]}.{quote('v:' + node.tag)}", f"w.{quote('v:' + node.tag)}"
            checks = [f"{before} <> {after}"]
            for values, column in ((node.from_values, before), (node.to_values, after)):
                if values:
                    params.append(list(values))
                    checks.append(f"list_contains(?, {column})")
            return leaf("(" + " AND ".join(checks) + ")")
        return leaf(f"{consent_alias[node.purpose]}.state = 'granted'")

    return Compiled(go(root), params)
