"""`tagml demo`: prints the walkthrough that tagml.orchestration.walkthrough runs (generate, ingest, train,
nightly scoring twice, drift, re-evaluation)."""

import time
from contextlib import closing
from datetime import date
from enum import Enum
from typing import Annotated, Any

import typer

from tagml.cli import common
from tagml.cli.app import app
from tagml.cli.common import console, load_settings
from tagml.cli.errors import CommandFailed, ExitCode
from tagml.cli.generate import DEMO_CUSTOMERS, generate_with_progress
from tagml.core.settings import Settings
from tagml.features.synthetic import DRIFT_SCENARIOS, generate_own_tables, own_tables_beside

# the generator's scenarios, or none (imported here: Typer needs them to parse)
DemoScenario = Enum("DemoScenario", {name: name for name in [*sorted(DRIFT_SCENARIOS), "none"]}, type=str)  # type: ignore[misc]

DEFAULT_DEMO_SCENARIO = DemoScenario("market_shock")


@app.command("demo")
def demo(
    customers: Annotated[int, typer.Option(min=100, help="customers in the demo bank")] = DEMO_CUSTOMERS,
    seed: Annotated[int, typer.Option(help="random seed")] = 42,
    drift: Annotated[DemoScenario, typer.Option(help="scenario starting in the last month")] = DEFAULT_DEMO_SCENARIO,
) -> None:
    """Generate the demo bank and run the pipeline end to end (ingest, train, score, drift, re-evaluate)."""
    settings = load_settings(create=True)
    ok = _demo(settings, customers, seed, None if drift.value == "none" else drift.value)
    if not ok:
        raise CommandFailed("a demo run failed; see the Dagster UI (tagml ui) for the step logs", ExitCode.FAILED_RUN)


def _demo(settings: Settings, customers: int, seed: int, drift: str | None) -> bool:
    from tagml.cli.erasure import print_receipt
    from tagml.orchestration.sensors import REEVALUATE_ON_DRIFT_SENSOR
    from tagml.orchestration.walkthrough import Walkthrough, erase_demo_customer, plan_demo, run_compliance_demo, run_serving_demo

    status = console(stderr=True)
    plan = plan_demo(customers, seed, drift)
    train_as_of, as_of = plan.train_as_of, plan.as_of
    scenario = f", {drift} from {as_of:%Y-%m}" if drift else ""
    print(f"[1/8] generating a synthetic bank: {plan.bank.customers:,} customers x {plan.bank.months} months{scenario} -> {settings.raw_dir}", flush=True)
    started = time.perf_counter()
    summary = generate_with_progress(plan.bank, settings.raw_dir)
    # and the bank's own tables (docs/OWN_TABLE.md): a catalog entry on them trains and scores in this demo too
    own = generate_own_tables(settings.raw_dir, own_tables_beside(settings.raw_dir), seed=seed)
    print(f"      {summary['rows']} in {time.perf_counter() - started:.1f}s; the bank's own tables (for bring-your-own tags) -> {own['out']}", flush=True)
    with Walkthrough.open(settings) as walk:
        print("[2/8] raw_ingest_job: validate the raw contract, drop PII, stage Parquet", flush=True)
        with status.status("raw_ingest_job running"):
            ingested = walk.ingest()
        print(f"      {ingested.seconds:.0f}s", flush=True)
        print(f"[3/8] train_all_tags_job on the labels known on {train_as_of}: training sets, Optuna + MLflow, registry, promotion gate", flush=True)
        names = ", ".join(walk.model_tags)
        with status.status(f"training {len(walk.model_tags)} model tags ({names}): Optuna trials logged to MLflow, then the gate"):
            trained = walk.train(train_as_of)
        print(f"      {trained.seconds:.0f}s", flush=True)
        nightly = {}
        for step, day in ((4, train_as_of), (5, as_of)):
            print(f"[{step}/8] nightly_scoring_job for as_of={day}: features, rule + model tags from the champions, tag_drift", flush=True)
            with status.status(f"nightly_scoring_job for {day} running"):
                nightly[day] = walk.score_nightly(day)
            outcome = ", ".join(f"{r.job} (run key {r.run_key})" for r in nightly[day].requests) or f"nothing ({nightly[day].skip_message})"
            print(f"      {nightly[day].seconds:.0f}s; then {REEVALUATE_ON_DRIFT_SENSOR} requests {outcome}", flush=True)
        print(f"      the sensor evaluated again on the same drift requests {walk.sensor_again()} runs", flush=True)
        print("[6/8] the re-evaluation the sensor requested: retrain -> gate -> re-score", flush=True)
        reevaluated = []
        for request in (r for day in (train_as_of, as_of) for r in nightly[day].requests):
            with status.status(f"{request.job} for {request.partition_key} running"):
                reevaluated.append(walk.reevaluate(request))
            print(f"      {reevaluated[-1].run.seconds:.0f}s", flush=True)
    print("[7/8] compliance: publish the tags (approved, then published by someone else), suitability, a marketing export with consent", flush=True)
    with status.status("compliance steps running"):
        compliance = run_compliance_demo(settings, as_of)
    print(f"      {compliance.seconds:.0f}s", flush=True)
    print("[8/8] serving: the online store the tag API reads (refreshed by every scoring run), an audience count", flush=True)
    example = compliance.mismatch["customer_id"] if compliance.mismatch else None
    serving = run_serving_demo(settings, example) if example else None
    if serving:
        print(f"      {serving.seconds:.0f}s", flush=True)
    shown = _print_demo_results(settings, plan, trained, {day: n.run for day, n in nightly.items()}, reevaluated)
    _print_compliance(compliance)
    if serving:
        _print_serving(settings, serving)
    # last: an erasure removes the customer's drift reports too, which the results above print from
    print("  $ tagml erase (one customer's erasure request, after the nightly run):")
    print_receipt(erase_demo_customer(settings, as_of, keep=shown | ({compliance.mismatch["customer_id"]} if compliance.mismatch else set())))
    return trained.success and all(n.run.success for n in nightly.values()) and all(r.run.success for r in reevaluated)


def _print_demo_results(settings: Settings, plan: Any, trained: Any, scored: dict[date, Any], reevaluated: list[Any]) -> set[str]:
    """Prints the results; returns the customers it showed."""
    # the printers of `tagml drift` and `tagml tags`, imported here so that `tagml --help` lists the commands in their order
    from tagml.cli.drift import print_drift
    from tagml.cli.lookup import customer_tags, print_tags
    from tagml.orchestration.sensors import REEVALUATE_ON_DRIFT_SENSOR
    from tagml.orchestration.walkthrough import example_model_customer, feature_snapshot_shape
    from tagml.scoring.store import ParquetTagStore

    train_as_of, as_of = plan.train_as_of, plan.as_of
    path, rows, columns = feature_snapshot_shape(settings, train_as_of)
    print()
    print(f"customer_features[{train_as_of}]: {rows:,} customers x {columns} features -> {path}")
    if scored[train_as_of].checks:
        print("checks: " + ", ".join(f"{name}={'ok' if passed else 'FAILED'}" for name, passed in scored[train_as_of].checks.items()))
    print(f"\nmodels ({trained.seconds:.0f}s):")
    _print_models(trained)
    if not trained.success:
        print("  training job FAILED; see the Dagster UI for the step logs")
    if scored[as_of].success:
        store = ParquetTagStore.in_warehouse(settings.warehouse_dir)
        with closing(common.connect(settings)) as con:
            for day in (train_as_of, as_of):
                print(f"\ncustomer_tags[{day}] -> {store.partition_path(day)}")
                for tag, tag_rows in store.distribution(con, day).groupby("tag", sort=False):
                    print(f"  {tag:<16} " + "  ".join(f"{r.value} {r.share:.1%}" for r in tag_rows.itertuples()))
            print(f"\n$ tagml drift --as-of {train_as_of}")
            print_drift(con, settings, train_as_of, None, details=False, compact=True)
            print(f"\n$ tagml drift --as-of {as_of}")
            print_drift(con, settings, as_of, None, details=False, compact=False)
            print(f"\nre-evaluation ({REEVALUATE_ON_DRIFT_SENSOR}):")
            if not reevaluated:
                print("  none requested")
            for done in reevaluated:
                request, run = done.request, done.run
                print(f"  {request.job} for {request.partition_key} (run key {request.run_key}, {run.seconds:.0f}s): {'ok' if run.success else 'FAILED'}")
                print(f"    because: {request.reasons}")
                _print_models(run, indent="    ")
                if run.producers is not None:
                    print(f"    re-scored customer_tags[{request.partition_key}]: {request.tag} now by {run.producers.get(request.tag)}")
            example = example_model_customer(con, store.partition_path(as_of))
        if example:
            print(f"\n$ tagml tags {example}")
            print_tags(customer_tags(settings, example, None, lineage=True))
    else:
        print("  scoring job FAILED; see the Dagster UI for the step logs")
    print(f"\nstaged raw tables:  {settings.warehouse_dir / 'raw'}")
    print(f"drift history:      {settings.drift_dir}   reports: {settings.reports_dir}")
    print(f"Dagster instance:   {settings.dagster_home}")
    print(f"MLflow:             {settings.mlflow_tracking_uri}")
    print("open the UIs with:  tagml ui (Dagster, http://127.0.0.1:3000)   tagml mlflow-ui (http://127.0.0.1:5000)")
    return {example} if scored[as_of].success and example else set()


def _print_serving(settings: Settings, done: Any) -> None:
    import json

    from tagml.orchestration.walkthrough import DEMO_AUDIENCE

    snap, counted = done.snapshot, done.audience
    print(f"\nserving ({done.seconds:.0f}s):")
    print(f"  online store: {snap['customers']:,} customers of {snap['as_of']} (loaded {snap['loaded_at']}) -> {settings.online_store}")
    print(f"    a lookup of {done.customer}: {done.lookup_ms:.2f} ms; quality (tagml online status):")
    for q in done.quality:
        changed = "n/a" if q["changed_share"] is None else f"{q['changed_share']:.1%}"
        print(f"    {q['tag']:<16} coverage {q['coverage']:.1%}  changed since {q['previous_as_of'] or '-'}: {changed}  fresh: {q['freshness_days']} days")
    left_out = ", ".join(f"{reason} {n:,}" for reason, n in counted["excluded"].items()) or "none"
    print(f"  $ tagml audience count --purpose marketing --query '{json.dumps(DEMO_AUDIENCE)}'")
    print(
        f"    matched {counted['matched']:,}, selected {counted['selected']:,} (left out: {left_out}) in {counted['seconds'] * 1000:.0f} ms (cold: the API keeps the table it builds cached)"
    )
    print("  the tag API (docs/API.md):")
    print("    tagml api-key create --name crm --scope read:tags --scope read:confidential --scope read:audiences  # prints it once")
    print("    tagml serve                                                                 # http://127.0.0.1:8000/docs")
    print(f'    curl -H "Authorization: Bearer $KEY" http://127.0.0.1:8000/customers/{done.customer}/tags')
    print(
        f'    curl -H "Authorization: Bearer $KEY" -H \'Content-Type: application/json\' -d \'{{"query": {json.dumps(DEMO_AUDIENCE)}, "purpose": "marketing"}}\' http://127.0.0.1:8000/audiences/count'
    )


def _print_compliance(done: Any) -> None:
    from tagml.orchestration.walkthrough import DEMO_APPROVER, DEMO_PUBLISHER

    print(f"\ncompliance ({done.seconds:.0f}s):")
    print(f"  lifecycle: {', '.join(done.published)} approved by {DEMO_APPROVER}, published by {DEMO_PUBLISHER} (tagml status; tagml catalog)")
    m = done.mismatch
    if m:
        print(f"  suitability: {m['customer_id']} above_appetite: {m['reasons'][0]} (assessed {m['assessed']}, the model infers {m['inferred']})")
    else:
        print("  suitability: no customer holds a product above their assessed risk level")
    e = done.export
    left_out = ", ".join(f"{reason} {count:,}" for reason, count in e["excluded"].items()) or "nobody"
    print(f"  $ tagml export --purpose marketing: {e['customers']:,} customers, {e['rows']:,} rows -> {e['out']}")
    print(f"    consent: left out {left_out}; tags left out: " + (", ".join(f"{t} ({why})" for t, why in e["left_out"].items()) or "none"))
    print(f"    recorded as export {e['export_id']} in the governance store and in {done.manifest}")


def _print_models(result: Any, indent: str = "  ") -> None:
    """One line per trained model and one per promotion-gate decision of a run."""
    for m in result.models:
        print(
            f"{indent}{m.tag:<14} v{m.version}  macro_f1={m.test_macro_f1:.3f}  accuracy={m.test_accuracy:.3f}"
            f"  calibration_error={m.test_calibration_error:.3f}  (baseline macro_f1={m.baseline_macro_f1:.3f})"
        )
    for gate in result.gates:
        print(f"{indent}gate {gate.tag:<14} {gate.description}")
