"""Reasons in words a relationship manager understands (PIPL Art. 24): reason codes such as `share_equity high`
turned into sentences from the feature dictionary.

The codes come from two places (scoring/reasons.py and scoring/suitability.py):
- a model tag's top contributions: `<feature> high` / `<feature> low` (above / at or below the population
  median at as_of) and `<feature>=<value>` for a categorical feature;
- a rule's own sentences (the suitability rule writes `holds P1 (R4) above the assessed C2 of 2026-01-31`),
  which are already words and are passed through.
A code naming no known feature is passed through as it is, marked `kind: "text"`, never dropped.
"""

import re
from functools import cache
from typing import Any

from tagml.features.dictionary import FEATURES, Feature

CODE = re.compile(r"^(?P<feature>[a-z][a-z0-9_]*) (?P<direction>high|low)$")
CATEGORY = re.compile(r"^(?P<feature>[a-z][a-z0-9_]*)=(?P<value>.*)$")
SOURCES = {
    "model": "inferred by the model {model}",
    "observed": "observed: recorded for this customer (a label from the bank's own records), not inferred",
    "rule": "set by the rule {producer} from the customer's data",
}


@cache
def _features() -> dict[str, Feature]:
    return {f.name: f for f in FEATURES}


def _meaning(feature: Feature) -> str:
    """The description as the subject of a sentence: 'Share of AUM in equity.' -> 'share of AUM in equity'."""
    text = feature.description.strip().rstrip(".")
    return text[:1].lower() + text[1:] if text[:2] != text[:2].upper() else text


def explain_reason(code: str) -> dict[str, Any]:
    """One reason code as {code, kind, feature?, sentence}: kind `feature` (a feature's level), `category` (its value) or `text`."""
    features = _features()
    if (m := CODE.match(code)) and m["feature"] in features:
        feature = features[m["feature"]]
        level = "above" if m["direction"] == "high" else "at or below"
        sentence = f"The customer's {_meaning(feature)} is {level} the typical customer's (the median of all customers at the tags' date)."
        return {"code": code, "kind": "feature", "feature": feature.name, "sentence": sentence}
    if (m := CATEGORY.match(code)) and m["feature"] in features:
        feature = features[m["feature"]]
        return {"code": code, "kind": "category", "feature": feature.name, "sentence": f"The customer's {_meaning(feature)} is {m['value']}."}
    sentence = code[:1].upper() + code[1:]
    return {"code": code, "kind": "text", "sentence": sentence if sentence.endswith(".") else sentence + "."}


def explain_source(entry: dict[str, Any]) -> str:
    """Where the value came from, in a sentence: the model version, the observed label, or the rule."""
    source = entry.get("source") or "model"
    model = f"{entry.get('tag')} version {entry.get('model_version')}" if entry.get("model_version") else str(entry.get("producer"))
    text = SOURCES.get(source, "produced by {producer}").format(model=model, producer=entry.get("producer"))
    if entry.get("assessment") == "expired":
        text += f"; the recorded assessment {entry.get('observed_value')} of {entry.get('assessed_on')} has expired, so the model's inference is shown"
    elif entry.get("observed_mismatch") is True:
        text += f"; the model would infer {entry.get('inferred_value')}, the record says {entry.get('observed_value')}"
    return text[:1].upper() + text[1:] + "."


def explain_tag(entry: dict[str, Any], spec: Any) -> dict[str, Any]:
    """A tag entry of the online store with its reasons in words, its source, and the catalog's intended use and limits."""
    reasons = [explain_reason(code) for code in entry.get("reasons") or []]
    summary = f"{spec.name} is {entry.get('value')}"
    if entry.get("probability") is not None:
        summary += f" (the model's confidence {float(entry['probability']):.0%})"
    if not reasons:
        summary += "; no reasons were recorded for this value"
    source: dict[str, Any] = {
        "kind": entry.get("source"),
        "sentence": explain_source(entry),
        "producer": entry.get("producer"),
        "model_version": entry.get("model_version"),
        "observed_value": entry.get("observed_value"),
        "assessment": entry.get("assessment"),
        "assessed_on": entry.get("assessed_on"),
    }
    if spec.kind == "rule" and spec.rule is not None:
        source["rule"] = {"version": spec.rule.version, "bands": [{"label": b.label, "when": b.when} for b in spec.rule.bands], "default": spec.rule.default}
    return {
        "tag": spec.name,
        "value": entry.get("value"),
        "summary": summary + ".",
        "reasons": reasons,
        "source": source,
        "description": spec.description,
        "intended_use": spec.intended_use,
        "limitations": spec.limitations,
    }
