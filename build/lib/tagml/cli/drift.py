"""`tagml drift`: the drift summary of a partition per model tag, and one tag in detail."""

import math
from contextlib import closing
from datetime import date
from typing import Annotated, Any

import typer

from tagml.cli import common
from tagml.cli.app import app
from tagml.cli.common import fmt, load_settings, parse_date, print_json, records, tag_spec
from tagml.cli.errors import CommandFailed, ExitCode
from tagml.core.settings import Settings


def print_drift(con: Any, settings: Settings, as_of: date | None, tag: str | None, details: bool, compact: bool) -> list[str]:
    """Print the drift summary of one partition (default: the newest) per model tag; returns the drifted tags."""
    from tagml.monitoring.history import DriftHistory

    history = DriftHistory(settings.drift_dir)
    as_of = as_of or history.latest()
    frame = history.summary(con, as_of, tag)
    print(f"drift of {as_of} (computed {frame['computed_at'].max():%Y-%m-%d %H:%M} UTC) -> {history.path('drift_summary', as_of)}")
    for row in frame.itertuples():
        verdict = "DRIFTED" if row.drifted else "ok"
        if compact:
            print(
                f"  {row.tag:<15} {verdict:<8} {len(row.drifted_features)}/{row.n_features} features drifted, class PSI {row.prediction_psi:.4f}, "
                f"performance {row.performance_status}; report {row.report_path if isinstance(row.report_path, str) else 'not written'}"
            )
            continue
        print(
            f"  {row.tag:<15} {verdict:<8} {row.producer} against the population of {row.reference_as_of:%Y-%m-%d} ({row.reference_rows:,} -> {row.current_rows:,} customers)"
        )
        top = history.features(con, as_of, row.tag).head(3)
        tops = ", ".join(f"{r.feature} {r.psi:.2f}" for r in top.itertuples())
        print(
            f"      features:    {len(row.drifted_features)}/{row.n_features} ({row.drifted_feature_share:.1%}) with PSI > {row.feature_psi_threshold} "
            f"(threshold {row.drifted_feature_share_threshold:.0%}); highest: {tops}"
            + (f"; critical: {', '.join(row.critical_features_drifted)}" if len(row.critical_features_drifted) else "")
        )
        print(
            f"      predictions: class PSI {row.prediction_psi:.4f} (threshold {row.prediction_psi_threshold}); probability PSI {fmt(row.probability_psi)}"
            + (f"; worst slice {row.max_slice} {fmt(row.max_slice_prediction_psi)}" if isinstance(row.max_slice, str) else "")
        )
        if row.realised_metric is not None and not math.isnan(row.realised_metric):
            print(
                f"      performance: realised {row.performance_metric} {row.realised_metric:.4f} on {row.performance_partition:%Y-%m-%d} "
                f"({row.performance_labels:,} matured labels) vs test {fmt(row.expected_metric)} (drop threshold {row.performance_drop_threshold})"
                + (f"; {row.performance_note}" if row.performance_note else "")
            )
        else:
            print(f"      performance: {row.performance_status}" + (f" ({row.performance_note})" if row.performance_note else ""))
        for reason in row.reasons:
            print(f"      reason:      {reason}")
        if isinstance(row.report_path, str):
            print(
                f"      report:      {row.report_path} (Evidently on {row.report_sample_rows:,} rows per side: {row.evidently_drifted_share:.0%} of columns drifted)"
            )
        if details:
            _print_drift_details(con, history, as_of, row.tag)
    return [row.tag for row in frame.itertuples() if row.drifted]


def _print_drift_details(con: Any, history: Any, as_of: date, tag: str) -> None:
    from tagml.monitoring.decision import MIN_SLICE_ROWS

    predictions = history.predictions(con, as_of, tag)
    overall = predictions[predictions["slice_column"] == "(all)"]
    print("      classes:     " + ", ".join(f"{r['class']} {r.reference_share:.1%} -> {r.current_share:.1%}" for _, r in overall.iterrows()))
    slices = (
        predictions[predictions["slice_column"] != "(all)"]
        .groupby(["slice_column", "slice"], sort=False)
        .agg(psi=("slice_psi", "first"), reference=("reference_count", "sum"), current=("current_count", "sum"))
        .reset_index()
    )
    for column, rows in slices.groupby("slice_column", sort=False):
        print(
            f"      class PSI by {column}: "
            + ", ".join(
                f"{r.slice} {r.psi:.4f}"
                + (f" (n={int(min(r.reference, r.current))}, too small to flag)" if min(r.reference, r.current) < MIN_SLICE_ROWS else "")
                for r in rows.itertuples()
            )
        )
    features = history.features(con, as_of, tag).head(10)
    print("      top features (PSI, Evidently on the sample):")
    for r in features.itertuples():
        evidently = f"{r.evidently_method} {r.evidently_value:.3f}" if isinstance(r.evidently_method, str) else ""
        print(f"        {r.feature:<28} {r.psi:8.3f} {'drifted' if r.drifted else '':<8} {evidently}")


def _drift_json(con: Any, settings: Settings, as_of: date | None, tag: str | None) -> dict[str, Any]:
    from tagml.monitoring.history import DriftHistory

    history = DriftHistory(settings.drift_dir)
    as_of = as_of or history.latest()
    summary = history.summary(con, as_of, tag)
    payload: dict[str, Any] = {"as_of": as_of.isoformat(), "path": str(history.path("drift_summary", as_of)), "tags": records(summary)}
    if tag:
        payload["features"] = records(history.features(con, as_of, tag))
        payload["predictions"] = records(history.predictions(con, as_of, tag))
    return payload


@app.command("drift")
def drift_command(
    as_of: Annotated[str | None, typer.Option(help="YYYY-MM-DD (default: the newest drift partition)")] = None,
    tag: Annotated[str | None, typer.Option(help="one model tag, with its classes, slices and most drifted features")] = None,
    fail_on_drift: Annotated[bool, typer.Option("--fail-on-drift", help="exit with 6 when a tag drifted")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Drift summary of a partition per model tag, with the Evidently report's path."""
    day = parse_date(as_of)
    settings = load_settings(require_home=True)
    if tag is not None:
        tag_spec(settings, tag, kind="model")
    with closing(common.connect(settings)) as con:
        if as_json:
            payload = _drift_json(con, settings, day, tag)
            drifted = [t["tag"] for t in payload["tags"] if t.get("drifted")]
            print_json(payload)
        else:
            drifted = print_drift(con, settings, day, tag, details=tag is not None, compact=False)
    if drifted and fail_on_drift:
        raise CommandFailed(f"drift found in {', '.join(drifted)}", ExitCode.DRIFT)
