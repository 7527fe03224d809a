"""The tag catalog: one declarative entry per tag, validated on load.

Assets, checks and jobs are generated from the catalog, so adding a tag means adding an entry to
`tags/catalog.yaml`. Errors name the entry and the field: `tag 'risk_appetite': model.trials: ...`.
"""

import hashlib
import json
import re
from datetime import date, timedelta
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tagml.core.settings import DEFAULT_CATALOG
from tagml.features.contract import LABEL_SOURCES, PRODUCT_RISK_LEVELS
from tagml.features.dictionary import FEATURE_NAMES, FEATURES
from tagml.training.rule_predicates import bind_check, rule_predicate_sql

FEATURE_GROUPS = tuple(sorted({f.group for f in FEATURES}))
# Class names become MLflow metric names, file names and tag-store values: a safe, portable alphabet.
CLASS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
UNKNOWN = "unknown"  # what scoring stores below a tag's min_confidence: no tag may use it as a class
# the slices of a tag on the contract's customer_features unless it declares its own: the value_tier rule's bands and region
CONTRACT_SLICES = ("value_tier", "region")
# a suitability tag's values, in the order they are decided (scoring/suitability.py)
SUITABILITY_CLASSES = ("no_rated_holdings", "no_valid_assessment", "above_appetite", "within")


class CatalogError(ValueError):
    """The catalog file is invalid; the message names the entry and the field."""


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


CATALOG_FOLDER = "catalog_folder"  # validation context: the folder relative paths in the catalog are read from


class WideTableSource(_Strict):
    """A customer-level table the bank already has, instead of the computed customer_features."""

    path: str = Field(
        description="the bank's own table: a CSV file, a Parquet file or a folder of Parquet files; a relative path is read from the catalog file's folder"
    )
    id_column: str = Field("customer_id", description="the table's customer id column (never a feature)")
    labels_path: str | None = Field(
        None,
        description="""the tag's labels file (CSV or Parquet); default: the staged tag_labels table. Columns, by name:
        required: the id column (`id_column`, or `customer_id`), `label` (the observed class) and `label_date` (a date:
        the date the label describes); optional: `known_date` (a date: when the label became known, default label_date;
        labels known after the training date are not used), `tag` (when present only rows of this entry's label tag are
        used), `source` (needed when `label.sources` is set: only those sources are used). Other columns are ignored.""",
    )
    categorical: tuple[str, ...] = Field((), description="columns used as categories whatever their type (numeric codes such as branch_code)")
    numeric: tuple[str, ...] = Field((), description="columns used as numbers whatever their type (text holding numbers)")

    @field_validator("path", "labels_path")
    @classmethod
    def _from_the_catalog_folder(cls, value: str | None, info: ValidationInfo) -> str | None:
        # relative to the catalog file, not to whichever directory the webserver, daemon or a CLI call started in
        folder = (info.context or {}).get(CATALOG_FOLDER)
        if value is None or folder is None or Path(value).is_absolute():
            return value
        return str(Path(folder) / value)

    @model_validator(mode="after")
    def _one_kind_each(self) -> "WideTableSource":
        both = sorted(set(self.categorical) & set(self.numeric))
        if both:
            raise ValueError(f"columns {both} are declared both categorical and numeric")
        if self.id_column in set(self.categorical) | set(self.numeric):
            raise ValueError(f"the id column {self.id_column!r} cannot be declared a feature")
        return self


class LabelSpec(_Strict):
    # first: which labels `sources` may name depends on it
    feature_source: Literal["customer_features"] | WideTableSource = "customer_features"
    tag: str | None = None  # name in tag_labels; defaults to the entry's name
    sources: tuple[str, ...] = ()  # restrict to these label sources; empty = all
    horizon_days: int = Field(0, ge=0, description="outcome labels: features are taken this many days before label_date")
    max_age_days: int | None = Field(None, ge=1, description="labels older than this (at training time) are ignored")
    observed_wins: bool = True  # at scoring: an observed label overrides the model's inference
    valid_days: int | None = Field(
        None,
        ge=1,
        description="an observed label (an assessment such as a risk questionnaire) older than this at scoring has expired: it is kept "
        "visible (observed_value, assessed_on, assessment 'expired') but no longer counts as observed; training still reads max_age_days",
    )

    def valid_from(self, as_of: date) -> date | None:
        """The oldest label_date that is still a valid assessment on `as_of` (None: labels never expire)."""
        return None if self.valid_days is None else as_of - timedelta(days=self.valid_days)

    @field_validator("sources")
    @classmethod
    def _known_sources(cls, sources: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        # the contract allows only these in tag_labels.source: any other name would silently match nothing
        # (a bank's own labels file has its own source names)
        source = info.data.get("feature_source")
        if isinstance(source, WideTableSource) and source.labels_path is not None:
            return sources
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


PromotionMetric = Literal["macro_f1", "accuracy", "log_loss", "roc_auc_ovr", "balanced_accuracy"]
LOWER_IS_BETTER = frozenset({"log_loss"})
# test metrics this good mean leakage far more often than a tag that easy: ROC AUC 1.0 on a leaky table was promoted
IMPLAUSIBLE_DEFAULT = {"higher": 0.99, "log_loss": 0.01}


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
    objective: PromotionMetric | None = Field(
        None,
        description="what the Optuna study optimises on the validation part (maximised; log_loss minimised); default: promotion.metric. "
        "xgboost trials report it every 10 boosting rounds, and a median pruner stops the trials that fall behind",
    )


class SplitSpec(_Strict):
    method: Literal["out_of_time", "stratified"] = "out_of_time"
    valid_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.15, gt=0, lt=0.5)


class PromotionSpec(_Strict):
    metric: PromotionMetric = "macro_f1"
    margin: float = Field(0.0, ge=0, description="a challenger must beat the champion by at least this much")
    baseline_margin: float = Field(
        0.0,
        ge=0,
        description="the registered model must beat the logistic baseline on the test part by at least this much (not applied when "
        "the baseline itself was registered, because it scored better on validation)",
    )
    max_calibration_error: float = Field(0.05, gt=0, le=1)
    slice_floor: float = Field(0.0, ge=0, le=1, description="no slice's metric may fall below this")
    require_all_classes_predicted: bool = True
    implausible_above: float | None = Field(
        None,
        ge=0,
        description="a test promotion metric this good is refused as implausible (a feature leaking the label?): at or above it for "
        f"the metrics where higher is better (default {IMPLAUSIBLE_DEFAULT['higher']}); for log_loss a floor, at or below it (default {IMPLAUSIBLE_DEFAULT['log_loss']})",
    )
    allow_implausible: bool = Field(False, description="promote a model whose test metric is implausibly good anyway (recorded in the gate's reasons)")

    @property
    def implausible_bound(self) -> float:
        """Where the promotion metric becomes implausible: `implausible_above`, or the default for the metric."""
        if self.implausible_above is not None:
            return self.implausible_above
        return IMPLAUSIBLE_DEFAULT["log_loss" if self.metric in LOWER_IS_BETTER else "higher"]

    def is_implausible(self, value: float) -> bool:
        bound = self.implausible_bound
        return value <= bound if self.metric in LOWER_IS_BETTER else value >= bound


class DecisionSpec(_Strict):
    """How a binary tag's value follows from the probability of its positive class (the second of `classes`)."""

    policy: Literal["argmax", "threshold", "top_share"] = Field(
        "argmax",
        description="argmax: the more probable class; threshold: positive at or above a probability (fixed, or chosen on the validation "
        "part for target_precision / target_recall); top_share: the top_share of customers by probability (threshold fixed at training "
        "from the validation distribution). The threshold is recorded on the model version and applied by scoring, drift and the gate",
    )
    threshold: float | None = Field(None, gt=0, lt=1, description="policy threshold: a fixed probability of the positive class")
    target_precision: float | None = Field(None, gt=0, le=1, description="policy threshold: the lowest threshold whose validation precision reaches this")
    target_recall: float | None = Field(None, gt=0, le=1, description="policy threshold: the highest threshold whose validation recall reaches this")
    top_share: float | None = Field(None, gt=0, lt=1, description="policy top_share: the share of validation customers above the threshold")

    @model_validator(mode="after")
    def _one_rule(self) -> "DecisionSpec":
        given = [k for k in ("threshold", "target_precision", "target_recall", "top_share") if getattr(self, k) is not None]
        allowed = {"argmax": [], "threshold": ["threshold", "target_precision", "target_recall"], "top_share": ["top_share"]}[self.policy]
        if (allowed and len(given) != 1) or not set(given) <= set(allowed):
            needs = f"exactly one of {allowed}" if allowed else "none of threshold, target_precision, target_recall, top_share"
            raise ValueError(f"policy {self.policy!r} takes {needs}; got {given or 'none'}")
        return self


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


class LeakageSpec(_Strict):
    """The leakage guard (training/leakage.py): features that give the label away fail training by name."""

    max_single_feature_auc: float = Field(
        0.98,
        gt=0.5,
        le=1,
        description="a feature whose ROC AUC as the only predictor of the label (one-vs-rest) reaches this fails training",
    )
    allow: tuple[str, ...] = Field(
        (),
        description="features acknowledged as genuinely this predictive: neither excluded for their name nor failing the AUC check",
    )


class RuleBand(_Strict):
    label: str
    when: str  # a DuckDB SQL predicate over feature columns, evaluated in order; first match wins

    @field_validator("when")
    @classmethod
    def _allowed_predicate(cls, when: str) -> str:
        bind_check(rule_predicate_sql(when))
        return when  # kept as written: the entry's content hash (the rule version) does not change

    @property
    def sql(self) -> str:
        """The predicate as it runs: re-generated from the checked parse tree."""
        return rule_predicate_sql(self.when)


class RuleSpec(_Strict):
    version: str = "1"
    bands: tuple[RuleBand, ...]
    default: str


class SuitabilitySpec(_Strict):
    """A rule tag comparing the risk of each customer's held products (R1-R5) with their valid assessed level (C1-C5)."""

    version: str = "1"
    assessment_tag: str = Field(
        description="the model tag whose observed labels are the assessments (its classes, lowest to highest, match R1-R5); "
        "only a valid observed label counts, never the model's inference"
    )


class TagSpec(_Strict):
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]
    description: str
    intended_use: str | None = Field(None, description="what the tag may be used for (the model card's intended use)")
    limitations: str | None = Field(None, description="what it must not be used for, and known weaknesses (the model card's limits)")
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
    leakage: LeakageSpec = LeakageSpec()
    min_confidence: float = Field(0.0, ge=0, lt=1, description="below this top probability the tag is stored as 'unknown'")
    rule: RuleSpec | None = None
    suitability: SuitabilitySpec | None = None
    decision: DecisionSpec = Field(
        DecisionSpec(), description="a binary tag's decision policy (its positive class is the second of `classes`); default: argmax"
    )
    slices: tuple[str, ...] | None = Field(
        None,
        description="segments the gate holds to promotion.slice_floor (and drift reports): rule tags of the catalog or feature columns. "
        f"Default: {list(CONTRACT_SLICES)} on the contract's features; on a bring-your-own table, up to 3 of its categorical features "
        "with 2-20 levels in the training set (fewest levels first). [] checks none",
    )

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
        if self.decision.policy != "argmax" and (self.kind != "model" or len(self.classes) != 2 or self.min_confidence):
            raise ValueError(f"decision.policy {self.decision.policy!r} is for binary model tags (2 classes, the second positive) without min_confidence")
        if self.kind == "model":
            if self.model is None or self.label is None:
                raise ValueError("a model tag needs 'model' and 'label' sections")
            if self.rule is not None or self.suitability is not None:
                raise ValueError("a model tag takes no 'rule' or 'suitability' section")
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
            allowed = set(self.leakage.allow) - set(FEATURE_NAMES)
            if allowed and self.label.feature_source == "customer_features":
                raise ValueError(f"leakage.allow: unknown feature names {sorted(allowed)}")
        else:
            self._consistent_rule()
        if self.label is not None and self.label.valid_days is not None and not self.label.observed_wins:
            raise ValueError("label.valid_days: an assessment expires only where an observed label wins (observed_wins: true)")
        return self

    def _consistent_rule(self) -> None:
        if self.slices is not None:
            raise ValueError("slices: only a model tag is sliced (its gate and drift); remove it from the rule tag")
        if (self.rule is None) == (self.suitability is None):
            raise ValueError("a rule tag needs exactly one of a 'rule' section (bands) and a 'suitability' section")
        if self.suitability is not None:
            if set(self.classes) != set(SUITABILITY_CLASSES):
                raise ValueError(f"suitability: classes must be {list(SUITABILITY_CLASSES)}")
            return
        labels = {b.label for b in self.rule.bands} | {self.rule.default}
        if not labels <= set(self.classes):
            raise ValueError(f"rule: labels {sorted(labels - set(self.classes))} are not in classes")

    @property
    def label_tag(self) -> str:
        return (self.label.tag if self.label and self.label.tag else None) or self.name

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.features.resolve()

    @property
    def tuning_objective(self) -> str:
        """The validation metric the Optuna study optimises: model.objective, else the promotion metric."""
        return (self.model.objective if self.model else None) or self.promotion.metric

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

    @model_validator(mode="after")
    def _known_slices(self) -> "Catalog":
        # a bring-your-own table's columns are known only when it is read: its slices are checked at training
        rules = {t.name for t in self.rule_tags if t.rule is not None}
        for tag in self.model_tags:
            if tag.slices is not None and tag.label is not None and tag.label.feature_source == "customer_features":
                unknown = [s for s in tag.slices if s not in rules and s not in FEATURE_NAMES]
                if unknown:
                    raise ValueError(f"tag {tag.name!r}: slices: {unknown} are neither rule tags of the catalog nor features")
        return self

    @model_validator(mode="after")
    def _known_assessments(self) -> "Catalog":
        for tag in self.rule_tags:
            if tag.suitability is None:
                continue
            name = tag.suitability.assessment_tag
            assessed = next((t for t in self.model_tags if t.name == name), None)
            if assessed is None or assessed.label is None:
                raise ValueError(f"tag {tag.name!r}: suitability.assessment_tag {name!r} is not a model tag of the catalog")
            if assessed.label.valid_days is None:
                raise ValueError(f"tag {tag.name!r}: suitability.assessment_tag {name!r} sets no label.valid_days (how long an assessment is valid)")
            if not assessed.ordinal or len(assessed.classes) != len(PRODUCT_RISK_LEVELS):
                raise ValueError(
                    f"tag {tag.name!r}: suitability.assessment_tag {name!r} must be ordinal with {len(PRODUCT_RISK_LEVELS)} classes, "
                    f"one per product risk level {list(PRODUCT_RISK_LEVELS)}"
                )
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
        return Catalog.model_validate(raw, context={CATALOG_FOLDER: str(path.resolve().parent)})
    except ValidationError as exc:
        raise CatalogError(f"{path}: invalid tag catalog:\n" + _describe(exc, raw)) from exc
