"""The model card's sections, from its record (tagml.training.model_card.card_record): what a model validator reads,
in the order of the issue's evidence pack. Pure: no MLflow, no data."""

from collections.abc import Mapping
from typing import Any

from tagml.training.evaluate import INTERVAL_METRICS
from tagml.training.model_card_template import Section, Table

NOT_RECORDED = "not recorded for this version"


def card_sections(r: Mapping[str, Any]) -> list[Section]:
    return [
        Section(
            "Version",
            (
                ("model", f"{r['model']} v{r['version']}"),
                ("MLflow run", r["run_id"]),
                ("card revision", f"{r['revision']} (generated {r['generated_at']})"),
                ("gate", r["gate"]["decision"]),
                ("code version", r["code_version"]),
                ("catalog entry hash", r["catalog_hash"]),
            ),
        ),
        _use(r["use"]),
        _data(r["data"]),
        _features(r["features"]),
        _method(r["method"], r["tuning"]),
        _metrics(r["metrics"]),
        _calibration(r["calibration"]),
        _comparison(r["comparison"], r["metrics"]),
        _fairness(r["fairness"]),
        _stability(r["stability"]),
        Section(
            "Gate decision",
            (("decision", r["gate"]["decision"]), ("at", r["gate"]["at"])),
            notes=tuple(r["gate"]["reasons"]) or ("the gate has not decided yet",),
        ),
        _overrides(r["overrides"], r["version"]),
        _monitoring(r["monitoring"]),
        _reproduction(r),
    ]


def _use(use: Mapping[str, Any]) -> Section:
    return Section(
        "Intended use and limits",
        (
            ("meaning", use.get("description")),
            ("intended use", use.get("intended_use") or "not stated in the catalog (intended_use)"),
            ("limitations", use.get("limitations") or "not stated in the catalog (limitations)"),
            ("owner", use.get("owner")),
            ("sensitivity", use.get("sensitivity")),
            ("refresh", use.get("refresh")),
            ("classes", ", ".join(use.get("classes") or [])),
        ),
    )


def _data(data: Mapping[str, Any]) -> Section:
    labels = data.get("labels") or {}
    by_split = labels.get("by_split", {})
    classes = sorted({c for counts in by_split.values() for c in counts})
    table = Table(
        ("split", "rows", *classes), tuple((s, data["rows"].get(s), *(by_split.get(s, {}).get(c, 0) for c in classes)) for s in ("train", "valid", "test"))
    )
    return Section(
        "Training data",
        (
            ("snapshot", data.get("snapshot")),
            ("snapshot id", data.get("snapshot_id")),
            ("sha256", data.get("sha256") or NOT_RECORDED),
            ("label sources", ", ".join(labels.get("sources", [])) or "any"),
            ("label feature dates (as_of)", " to ".join(labels.get("as_of_range", [])) or NOT_RECORDED),
            ("labels left out", labels.get("dropped") or "none"),
        ),
        (table,),
    )


def _features(features: Mapping[str, Any]) -> Section:
    used = ", ".join(f"{f['name']} ({f['kind']})" for f in features["used"])
    excluded = Table(("excluded column", "reason"), tuple((e["column"], e["reason"]) for e in features["excluded"]))
    pii = "; ".join(f"{n} column(s) of {t}" for t, n in features["pii_dropped_at_staging"].items()) + " (named in the data contract, docs/DATA_CONTRACT.md)"
    leakage = features["leakage"]
    highest = ", ".join(f"{c} {auc:.3f}" for c, auc in leakage["highest"]) or NOT_RECORDED
    return Section(
        "Features used and excluded",
        (
            (f"used ({len(features['used'])})", used),
            ("PII (dropped at staging, never features)", pii),
            ("leakage guard", f"a feature whose single-feature ROC AUC reaches {leakage['max_single_feature_auc']} fails training; highest: {highest}"),
        ),
        (excluded,) if features["excluded"] else (),
    )


def _method(method: Mapping[str, Any], tuning: Mapping[str, Any]) -> Section:
    space = method.get("search_space") or {}
    dims = Table(
        ("parameter", "low", "high", "scale"),
        tuple((k, d["low"], d["high"], "log" if d.get("log") else ("integer" if d.get("integer") else "linear")) for k, d in space.items()),
    )
    best = Table(("best parameter", "value"), tuple(sorted(tuning["best_params"].items())))
    selection = method.get("selection") or {}
    return Section(
        "Method and tuning",
        (
            ("registered family", f"{method['family']} ({method['candidate']} candidate)"),
            ("candidate selection", f"validation {selection.get('metric')}: {selection.get('valid')}"),
            ("calibration", method.get("calibration")),
            ("class weight", method.get("class_weight")),
            (
                "decision",
                f"{method.get('decision_policy')}" + (f" at {method['decision_threshold']:.4f}" if method.get("decision_threshold") is not None else ""),
            ),
            ("fixed parameters", method.get("params") or "none"),
            ("tuning", f"Optuna TPE on validation {tuning['objective']}: {tuning['trials_completed']} trials completed, {tuning['trials_pruned']} pruned"),
            ("best validation value", tuning.get("best_valid")),
        ),
        (dims, best),
    )


def _metrics(metrics: Mapping[str, Any]) -> Section:
    test, intervals = metrics["test"], metrics["intervals"]
    overall = Table(
        ("metric", "test value", "interval low", "interval high"),
        tuple((m, test.get(m), intervals.get(m, {}).get("low"), intervals.get(m, {}).get("high")) for m in INTERVAL_METRICS if m in test),
    )
    classes = sorted({k.split("_", 1)[1] for k in test if k.startswith("support_")})
    per_class = Table(
        ("class", "precision", "recall", "support"), tuple((c, test.get(f"precision_{c}"), test.get(f"recall_{c}"), test.get(f"support_{c}")) for c in classes)
    )
    slices = Table(
        ("slice", "rows", metrics["promotion_metric"], "interval low", "interval high"),
        tuple((k, s["rows"], s["value"], s["low"], s["high"]) for k, s in metrics["slices"].items()),
    )
    level = next(iter(intervals.values()), {}).get("level")
    note = f"Intervals: {level:.0%} percentile bootstrap of the test rows." if level else "Intervals: not recorded for this version."
    return Section("Test metrics", (("promotion metric", metrics["promotion_metric"]),), (overall, per_class, slices), notes=(note,))


def _calibration(calibration: Mapping[str, Any]) -> Section:
    bins = Table(
        ("confidence bin", "rows", "mean confidence", "observed accuracy"),
        tuple((f"{b['low']:.1f}-{b['high']:.1f}", b["rows"], b["confidence"], b["accuracy"]) for b in calibration["bins"]),
    )
    return Section(
        "Calibration",
        (
            ("expected calibration error (top label)", calibration["ece"]),
            ("debiased (what the gate reads)", calibration["ece_debiased"]),
            ("gate maximum", calibration["max_allowed"]),
        ),
        (bins,),
    )


def _comparison(comparison: Mapping[str, Any], metrics: Mapping[str, Any]) -> Section:
    metric = metrics["promotion_metric"]
    baseline = comparison["baseline"]
    interval = comparison.get("baseline_interval")
    champion = comparison.get("champion") or {}
    facts = [
        (f"logistic baseline, test {metric}", baseline.get(metric) if baseline else "no baseline trained"),
        ("baseline, test accuracy", baseline.get("accuracy") if baseline else None),
    ]
    if interval:
        facts.append(
            (
                "improvement over the baseline",
                f"{interval['improvement']:+.4f} ({interval['level']:.0%} paired bootstrap {interval['low']:+.4f} to {interval['high']:+.4f})",
            )
        )
    if champion.get("version"):
        facts.append((f"previous champion v{champion['version']}, {metric} on this test set", champion.get(metric)))
    else:
        facts.append(("previous champion", "none when the gate decided" if comparison.get("champion") else "the gate has not decided yet"))
    return Section("Comparison with the baseline and the previous champion", tuple(facts))


def _fairness(fairness: Mapping[str, Any] | None) -> Section:
    if not fairness:
        return Section("Fairness slices", notes=(NOT_RECORDED,))
    if not fairness["available"]:
        return Section("Fairness slices", notes=(fairness["note"],))
    metric, classes = fairness["metric"], fairness["classes"]
    rows = tuple(
        (
            f["attribute"],
            f["group"],
            f["rows"],
            *((f[metric], f["accuracy"], *(f[f"share_{c}"] for c in classes)) if f["status"] == "measured" else ("too few", None, *(None for _ in classes))),
        )
        for f in fairness["rows"]
    )
    table = Table(("attribute", "group", "rows", metric, "accuracy", *(f"share {c}" for c in classes)), rows)
    note = "The promotion gate does not block on these: what difference between groups is acceptable is the bank's to set. Groups under 30 rows: too few."
    return Section("Fairness slices", tables=(table,), notes=(fairness["note"], note))


def _stability(stability: Mapping[str, Any] | None) -> Section:
    if not stability:
        return Section("Stability", notes=("not measured yet: measured after the gate, against the newest customer_features partition",))
    if stability.get("status") != "measured":
        return Section("Stability", notes=(stability.get("note", "not measured"),))
    per_class = Table(("class", "probability PSI"), tuple(stability["probability_psi"].items()))
    facts = (
        ("reference", stability["reference"]),
        ("current", stability["current"]),
        ("PSI of the predicted classes", stability["prediction_psi"]),
        ("drift threshold (drift.prediction_psi)", stability.get("threshold")),
    )
    return Section("Stability", facts, (per_class,))


def _overrides(history: list[Mapping[str, Any]], version: str) -> Section:
    rows = tuple((h.get("at"), h.get("version"), h.get("action", "promote"), h.get("by"), h.get("reason")) for h in history)
    manual = [h for h in history if h.get("version") == version and h.get("by") != "gate"]
    note = f"{len(manual)} manual promotion(s) or rollback(s) to this version." if history else "No champion changes recorded for this tag yet."
    return Section("Overrides and champion history", tables=(Table(("at", "version", "action", "by", "reason"), rows),) if rows else (), notes=(note,))


def _monitoring(drift: Mapping[str, Any] | None) -> Section:
    if not drift:
        return Section("Monitoring thresholds", notes=(NOT_RECORDED,))
    return Section("Monitoring thresholds", tuple((k, ", ".join(v) if isinstance(v, list) else v) for k, v in drift.items()))


def _reproduction(r: Mapping[str, Any]) -> Section:
    rep = r["reproduction"]
    facts = (
        ("seed", rep.get("seed")),
        ("threads", rep.get("threads")),
        ("Optuna trials", rep.get("trials")),
        ("slices", ", ".join(rep.get("slices") or {}) or "none"),
        ("snapshot and sha256", f"{r['data']['snapshot']} {r['data']['sha256']}"),
    )
    note = "tagml.training.reproduce.reproduce_from_card retrains from these inputs (the catalog entry is recorded in model_card.json) and compares the test metrics."
    return Section("Reproduction", facts, notes=(note,))
