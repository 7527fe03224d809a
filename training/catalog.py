"""The tag catalog: one declarative entry per tag, validated on load.

Assets, checks and jobs are generated from the catalog, so adding a tag means adding an entry to
`tags/catalog.yaml`. Errors name the entry and the field: `tag 'risk_appetite': model.trials: ...`.
"""

import difflib
import hashlib
import json
import re
import threading
from collections.abc import Collection
from pathlib import Path
from typing import Annotated, Literal

import duckdb
import sqlglot
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from sqlglot import exp

from tagml.core.settings import DEFAULT_CATALOG
from tagml.features.contract import LABEL_SOURCES
from tagml.features.dictionary import FEATURE_NAMES, FEATURES

FEATURE_GROUPS = tuple(sorted({f.group for f in FEATURES}))
# Class names become MLflow metric names, file names and tag-store values: a safe, portable alphabet.
CLASS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
UNKNOWN = "unknown"  # what scoring stores below a tag's min_confidence: no tag may use it as a class


class CatalogError(ValueError):
    """The catalog file is invalid; the message names the entry and the field."""


class RuleSyntaxError(ValueError):
    """A rule band is not an allowed predicate over the feature columns; the message names the construct."""


# ---- rule predicates -----------------------------------------------------------------------------
# A band's `when:` is SQL written by a catalog author and run over every customer. It is parsed and
# checked against an allow-list here, once at catalog load, and the SQL that runs is generated from
# the parsed tree (never the raw text): column references, literals, comparisons, arithmetic,
# boolean logic, IN (literal list), BETWEEN, IS NULL, CASE, casts to numbers or text and a few scalar
# functions. No subqueries, table functions, file access, parameters or unknown functions.
_RULE_NODES: tuple[type[exp.Expression], ...] = (
    exp.Column,
    exp.Identifier,
    exp.Literal,
    exp.Boolean,
    exp.Null,
    exp.Paren,
    exp.And,
    exp.Or,
    exp.Not,
    exp.EQ,
    exp.NEQ,
    exp.GT,
    exp.GTE,
    exp.LT,
    exp.LTE,
    exp.Is,
    exp.In,
    exp.Between,
    exp.Add,
    exp.Sub,
    exp.Mul,
    exp.Div,
    exp.Mod,
    exp.Neg,
    exp.Cast,
    exp.TryCast,
    exp.DataType,
    exp.DataTypeParam,
    exp.Case,
    exp.If,
)
RULE_FUNCTIONS: dict[type[exp.Expression], str] = {
    exp.Abs: "abs",
    exp.Coalesce: "coalesce",
    exp.Nullif: "nullif",
    exp.Least: "least",
    exp.Greatest: "greatest",
    exp.Round: "round",
    exp.Floor: "floor",
    exp.Ceil: "ceil",
    exp.Ln: "ln",
    exp.Sqrt: "sqrt",
    exp.Length: "length",
    exp.Lower: "lower",
    exp.Upper: "upper",
}
_CAST_TYPES = exp.DataType.NUMERIC_TYPES | exp.DataType.TEXT_TYPES | {exp.DataType.Type.BOOLEAN}
# the column types the binder check gives each feature (the snapshot stores numbers as DOUBLE or BIGINT)
_FEATURE_TYPES = {f.name: "VARCHAR" if f.kind == "categorical" else "DOUBLE" for f in FEATURES}


def _construct(node: exp.Expression) -> str:
    """A short, readable name for a rejected piece of a predicate."""
    if isinstance(node, (exp.Subquery, exp.Select, exp.Query)):
        return "a subquery"
    if isinstance(node, exp.Table):
        return f"a table reference ({node.sql(dialect='duckdb')[:60]})"
    if isinstance(node, exp.Placeholder):
        return "a parameter placeholder"
    if isinstance(node, exp.Anonymous):
        return f"the function {node.name.lower()}()"
    if isinstance(node, exp.Func):
        return f"the function {node.sql_name().lower()}()"
    return f"{type(node).__name__} ({node.sql(dialect='duckdb')[:60]})"


def parse_rule_predicate(text: str, columns: Collection[str] = FEATURE_NAMES) -> exp.Expression:
    """Parse one band's predicate and check it against the allow-list and the known `columns`.

    Raises RuleSyntaxError naming the offending construct or column.
    """
    if not text or not text.strip():
        raise RuleSyntaxError("the predicate is empty")
    try:
        statements = [s for s in sqlglot.parse(text, read="duckdb") if s is not None]
    except sqlglot.errors.SqlglotError as exc:
        raise RuleSyntaxError(f"not a valid SQL expression: {str(exc).splitlines()[0][:200]}") from exc
    if len(statements) != 1:
        raise RuleSyntaxError(f"expected one predicate, found {len(statements)} statements")
    tree = statements[0]
    known = set(columns)
    for node in tree.walk():
        if isinstance(node, exp.Column):
            if node.table or node.args.get("db") or node.args.get("catalog"):
                raise RuleSyntaxError(f"qualified column {node.sql(dialect='duckdb')}: refer to a feature by its name alone")
            if not isinstance(node.this, exp.Identifier):
                raise RuleSyntaxError(f"{_construct(node.this)} is not allowed")
            if node.name not in known:
                close = difflib.get_close_matches(node.name, sorted(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise RuleSyntaxError(f"unknown column {node.name!r}{hint}; a rule sees the customer_features columns")
        elif isinstance(node, exp.In):
            if any(node.args.get(k) for k in ("query", "unnest", "field")):
                raise RuleSyntaxError("IN takes a list of literal values only (no subquery)")
            for item in node.expressions:
                value = item.this if isinstance(item, exp.Neg) else item
                if not isinstance(value, (exp.Literal, exp.Boolean, exp.Null)):
                    raise RuleSyntaxError(f"IN takes a list of literal values only, not {item.sql(dialect='duckdb')[:60]}")
        elif isinstance(node, exp.DataType):
            if node.this not in _CAST_TYPES:
                raise RuleSyntaxError(f"a cast to {node.sql(dialect='duckdb')} is not allowed (numbers, text or boolean only)")
        elif type(node) not in RULE_FUNCTIONS and type(node) not in _RULE_NODES:
            allowed = ", ".join(sorted(RULE_FUNCTIONS.values()))
            raise RuleSyntaxError(
                f"{_construct(node)} is not allowed; a band may use feature columns, literals, "
                f"comparisons, arithmetic, AND/OR/NOT, IN, BETWEEN, IS NULL, CASE and {allowed}"
            )
    return tree


def rule_predicate_sql(text: str, columns: Collection[str] = FEATURE_NAMES) -> str:
    """The SQL that runs for a band: generated from the checked parse tree, every identifier quoted."""
    # comments are dropped: nothing of the text but its checked tree reaches DuckDB
    return "(" + parse_rule_predicate(text, columns).sql(dialect="duckdb", identify=True, comments=False) + ")"


_binder: duckdb.DuckDBPyConnection | None = None
_binder_lock = threading.Lock()


def _bind_check(predicate_sql: str) -> None:
    """Bind the predicate over an empty table of the feature columns: type errors show at load, not at scoring.

    One in-memory database per process (opening one costs ~50 ms), external access off; each check
    runs on its own cursor, so catalogs load safely from several threads.
    """
    global _binder
    with _binder_lock:
        if _binder is None:
            con = duckdb.connect(":memory:")
            con.execute("CREATE TABLE features (" + ", ".join(f'"{n}" {t}' for n, t in _FEATURE_TYPES.items()) + ")")
            con.execute("SET enable_external_access = false")
            _binder = con
        cursor = _binder.cursor()
    try:
        cursor.execute(f"SELECT CASE WHEN {predicate_sql} THEN 1 END FROM features").fetchall()
    except duckdb.Error as exc:
        raise RuleSyntaxError(f"does not evaluate over the feature columns: {str(exc).splitlines()[0][:200]}") from exc
    finally:
        cursor.close()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeatureSelection(_Strict):
    include_groups: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def resolve(self, available: tuple[str, ...] = FEATURE_NAMES) -> tuple[str, ...]:
        """The selected feature names, in dictionary order. No selection means every feature."""
        by_group = {f.name: f.group for f in FEATURES}
        chosen = set(self.include) | {n for n in available if by_group.get(n) in self.include_groups}
        if not self.include and not self.include_groups:
            chosen = set(available)
        return tuple(n for n in available if n in chosen and n not in self.exclude)


class WideTableSource(_Strict):
    """A customer-level table the bank already has, instead of the computed customer_features."""

    path: str
    id_column: str = "customer_id"
    labels_path: str | None = None  # default: the staged tag_labels table


class LabelSpec(_Strict):
    tag: str | None = None  # name in tag_labels; defaults to the entry's name
    sources: tuple[str, ...] = ()  # restrict to these label sources; empty = all
    horizon_days: int = Field(0, ge=0, description="outcome labels: features are taken this many days before label_date")
    max_age_days: int | None = Field(None, ge=1, description="labels older than this (at training time) are ignored")
    observed_wins: bool = True  # at scoring: an observed label overrides the model's inference
    feature_source: Literal["customer_features"] | WideTableSource = "customer_features"

    @field_validator("sources")
    @classmethod
    def _known_sources(cls, sources: tuple[str, ...]) -> tuple[str, ...]:
        # the contract allows only these in tag_labels.source: any other name would silently match nothing
        unknown = [s for s in sources if s not in LABEL_SOURCES]
        if unknown:
            raise ValueError(f"unknown label sources {unknown}; tag_labels.source is one of {list(LABEL_SOURCES)}")
        return sources


class SearchDimension(_Strict):
    low: float
    high: float
    log: bool = False
    integer: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> "SearchDimension":
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) is below low ({self.low})")
        if self.log and self.low <= 0:
            raise ValueError("a log-scaled range needs low > 0")
        return self


class ModelSpec(_Strict):
    family: Literal["xgboost", "logistic_regression"] = "xgboost"
    search_space: dict[str, SearchDimension] = Field(default_factory=dict)
    params: dict[str, float | int | str] = Field(default_factory=dict)  # fixed parameters
    trials: int = Field(20, ge=1, le=1000)
    timeout_seconds: int = Field(600, ge=10)
    baseline: Literal["logistic_regression"] | None = "logistic_regression"
    calibration: Literal["temperature", "sigmoid", "isotonic", "none"] = Field(
        "temperature", description="how validation data recalibrates the probabilities (temperature keeps the ranking)"
    )
    class_weight: Literal["balanced", "none"] = Field("none", description="'balanced' trades calibration for minority-class recall")


class SplitSpec(_Strict):
    method: Literal["out_of_time", "stratified"] = "out_of_time"
    valid_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.15, gt=0, lt=0.5)


class PromotionSpec(_Strict):
    metric: Literal["macro_f1", "accuracy", "log_loss", "roc_auc_ovr", "balanced_accuracy"] = "macro_f1"
    margin: float = Field(0.0, ge=0, description="a challenger must beat the champion by at least this much")
    max_calibration_error: float = Field(0.05, gt=0, le=1)
    slice_floor: float = Field(0.0, ge=0, le=1, description="no slice's metric may fall below this")
    require_all_classes_predicted: bool = True


class DriftSpec(_Strict):
    """When a tag counts as drifted (monitoring/drift.py); any one of the three re-evaluates it."""

    drifted_feature_share: float = Field(0.3, gt=0, le=1, description="share of the tag's features whose PSI exceeds feature_psi")
    prediction_psi: float = Field(0.2, gt=0, description="PSI of the inferred class distribution against the reference")
    performance_drop: float = Field(0.05, ge=0, description="realised promotion metric below the version's test metric by more than this")
    feature_psi: float = Field(0.2, gt=0, description="a feature whose PSI exceeds this counts as drifted (0.1-0.25 is the conventional 'moderate' band)")
    label_delay_days: int = Field(
        0,
        ge=0,
        description="labels that arrive this many days after the observation date: realised performance is measured on the partition this far back (0 = not monitored)",
    )
    critical_features: tuple[str, ...] = Field((), description="features whose drift alone (PSI > feature_psi) re-evaluates the tag, whatever the share")
    max_changed_share: float = Field(
        0.25,
        gt=0,
        le=1,
        description="customer_tags' stability check warns when more than this share of customers changed value since the previous "
        "partition (rule tags too: a feature gone empty moved 42% of value_tier while every other check passed)",
    )


class RuleBand(_Strict):
    label: str
    when: str  # a DuckDB SQL predicate over feature columns, evaluated in order; first match wins

    @field_validator("when")
    @classmethod
    def _allowed_predicate(cls, when: str) -> str:
        _bind_check(rule_predicate_sql(when))
        return when  # kept as written: the entry's content hash (the rule version) does not change

    @property
    def sql(self) -> str:
        """The predicate as it runs: re-generated from the checked parse tree."""
        return rule_predicate_sql(self.when)


class RuleSpec(_Strict):
    version: str = "1"
    bands: tuple[RuleBand, ...]
    default: str


class TagSpec(_Strict):
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]
    description: str
    kind: Literal["rule", "model"]
    classes: tuple[str, ...] = Field(min_length=2)
    ordinal: bool = False
    owner: str
    sensitivity: Literal["public", "internal", "confidential", "restricted"] = "internal"
    refresh: Literal["daily", "weekly", "monthly", "quarterly"] = "monthly"
    label: LabelSpec | None = None
    features: FeatureSelection = FeatureSelection()
    model: ModelSpec | None = None
    split: SplitSpec = SplitSpec()
    promotion: PromotionSpec = PromotionSpec()
    drift: DriftSpec = DriftSpec()
    min_confidence: float = Field(0.0, ge=0, lt=1, description="below this top probability the tag is stored as 'unknown'")
    rule: RuleSpec | None = None

    @field_validator("classes")
    @classmethod
    def _safe_class_names(cls, classes: tuple[str, ...]) -> tuple[str, ...]:
        for name in classes:
            if name == UNKNOWN:
                raise ValueError(f"class {name!r} is reserved: scoring stores it for a prediction below min_confidence")
            if not CLASS_NAME.match(name):
                raise ValueError(
                    f"class {name!r} is not a safe name: use letters, digits, '_', '.' or '-', starting with a letter or digit"
                    " (class names become metric names and stored values)"
                )
        return classes

    @model_validator(mode="after")
    def _consistent(self) -> "TagSpec":
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("classes must be unique")
        if self.kind == "model":
            if self.model is None or self.label is None:
                raise ValueError("a model tag needs 'model' and 'label' sections")
            unknown = set(self.features.include) | set(self.features.exclude)
            unknown -= set(FEATURE_NAMES)
            if unknown and self.label.feature_source == "customer_features":
                raise ValueError(f"features: unknown feature names {sorted(unknown)}")
            bad_groups = set(self.features.include_groups) - set(FEATURE_GROUPS)
            if bad_groups:
                raise ValueError(f"features.include_groups: unknown groups {sorted(bad_groups)}; known: {list(FEATURE_GROUPS)}")
            if self.label.feature_source == "customer_features" and not self.features.resolve():
                raise ValueError("features: the selection is empty")
            # a critical feature the model does not use is simply not monitored; an unknown name is a typo
            critical = set(self.drift.critical_features) - set(FEATURE_NAMES)
            if critical and self.label.feature_source == "customer_features":
                raise ValueError(f"drift.critical_features: unknown feature names {sorted(critical)}")
        else:
            if self.rule is None:
                raise ValueError("a rule tag needs a 'rule' section")
            labels = {b.label for b in self.rule.bands} | {self.rule.default}
            if not labels <= set(self.classes):
                raise ValueError(f"rule: labels {sorted(labels - set(self.classes))} are not in classes")
        return self

    @property
    def label_tag(self) -> str:
        return (self.label.tag if self.label and self.label.tag else None) or self.name

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.features.resolve()

    def content_hash(self) -> str:
        """Hash of the entry's content: recorded on every model version trained from it."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


class Catalog(_Strict):
    version: int = 1
    tags: tuple[TagSpec, ...]

    @field_validator("tags")
    @classmethod
    def _not_empty(cls, tags: tuple[TagSpec, ...]) -> tuple[TagSpec, ...]:
        if not tags:
            raise ValueError("the catalog defines no tags (tags: []); add at least one entry")
        return tags

    @model_validator(mode="after")
    def _unique(self) -> "Catalog":
        names = [t.name for t in self.tags]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"tag names must be unique; repeated: {dupes}")
        return self

    def get(self, name: str) -> TagSpec:
        for tag in self.tags:
            if tag.name == name:
                return tag
        raise KeyError(f"no tag {name!r} in the catalog; known: {[t.name for t in self.tags]}")

    @property
    def model_tags(self) -> tuple[TagSpec, ...]:
        return tuple(t for t in self.tags if t.kind == "model")

    @property
    def rule_tags(self) -> tuple[TagSpec, ...]:
        return tuple(t for t in self.tags if t.kind == "rule")


def _describe(err: ValidationError, raw: dict) -> str:
    lines = []
    for e in err.errors():
        loc = list(e["loc"])
        where = "catalog"
        if len(loc) >= 2 and loc[0] == "tags" and isinstance(loc[1], int):
            entries = raw.get("tags") or []
            name = entries[loc[1]].get("name") if loc[1] < len(entries) and isinstance(entries[loc[1]], dict) else None
            where = f"tag {name!r}" if name else f"tag #{loc[1] + 1}"
            loc = loc[2:]
        field = ""
        for part in loc:
            if str(part).startswith("function-after"):
                continue
            field += f"[{part}]" if isinstance(part, int) else (f".{part}" if field else str(part))
        field = field or "(entry)"
        lines.append(f"{where}: {field}: {e['msg']}")
    return "\n".join(lines)


def load_catalog(path: Path | str = DEFAULT_CATALOG) -> Catalog:
    """Read and validate a catalog YAML file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise CatalogError(f"catalog file not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise CatalogError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise CatalogError(f"{path}: expected a mapping with a 'tags' list")
    try:
        return Catalog.model_validate(raw)
    except ValidationError as exc:
        raise CatalogError(f"{path}: invalid tag catalog:\n" + _describe(exc, raw)) from exc
