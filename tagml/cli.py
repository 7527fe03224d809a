"""`tagml` command line: generate a synthetic bank, run the demo, open the UI, print the contract."""

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path

from tagml.settings import Settings

DEMO_CUSTOMERS = 20_000


def _generate(args: argparse.Namespace, settings: Settings) -> int:
    from features.synthetic import BankConfig, generate_bank

    config = BankConfig(
        customers=args.customers, months=args.months, seed=args.seed, end_month=args.end_month,
        drift=args.drift, drift_month=args.drift_month,
    )
    out = Path(args.out) if args.out else settings.raw_dir
    started = time.perf_counter()
    summary = generate_bank(config, out)
    print(json.dumps({"out": str(out), "seconds": round(time.perf_counter() - started, 1), **summary}, indent=2, default=str))
    return 0


def _dagster_instance(settings: Settings):
    import dagster as dg

    settings.ensure_dirs()
    return dg.DagsterInstance.from_config(str(settings.dagster_home))


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from features.synthetic import BankConfig, generate_bank, month_ends
    from orchestration.definitions import build_definitions
    from orchestration.jobs import CUSTOMER_FEATURES_JOB, RAW_INGEST_JOB

    settings.ensure_dirs()
    config = BankConfig(customers=args.customers, months=12, seed=args.seed)
    as_of: date = month_ends(config.end_month, config.months)[-1].item()
    print(f"[1/3] generating a synthetic bank: {config.customers:,} customers x {config.months} months -> {settings.raw_dir}")
    started = time.perf_counter()
    summary = generate_bank(config, settings.raw_dir)
    print(f"      {summary['rows']} in {time.perf_counter() - started:.1f}s")

    defs = build_definitions(settings)
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    with _dagster_instance(settings) as instance:
        print("[2/3] raw_ingest_job: validate the raw contract, drop PII, stage Parquet")
        defs.resolve_job_def(RAW_INGEST_JOB).execute_in_process(instance=instance, run_config=quiet)
        print(f"[3/3] customer_features_job for as_of={as_of}")
        result = defs.resolve_job_def(CUSTOMER_FEATURES_JOB).execute_in_process(
            instance=instance, partition_key=as_of.isoformat(), run_config=quiet
        )
        checks = [f"{e.check_name}={'ok' if e.passed else 'FAILED'}" for e in result.get_asset_check_evaluations()]

    from features.warehouse import features_path

    path = features_path(settings.warehouse_dir, as_of)
    import pyarrow.parquet as pq

    meta = pq.read_metadata(path)
    print()
    print(f"customer_features[{as_of}]: {meta.num_rows:,} customers x {meta.num_columns - 2} features -> {path}")
    if checks:
        print("checks: " + ", ".join(checks))
    print(f"staged raw tables:  {settings.warehouse_dir / 'raw'}")
    print(f"Dagster instance:   {settings.dagster_home}")
    print("open the UI with:   make ui   (then http://127.0.0.1:3000)")
    return 0


def _ui(args: argparse.Namespace, settings: Settings) -> int:
    settings.ensure_dirs()
    env = {**os.environ, "DAGSTER_HOME": str(settings.dagster_home), "TAGML_HOME": str(settings.home)}
    workspace = Path(__file__).resolve().parent.parent / "workspace.yaml"
    command = [sys.executable, "-m", "dagster", "dev", "-w", str(workspace), "-h", args.host, "-p", str(args.port)]
    os.execvpe(command[0], command, env)
    return 0  # unreachable


def _contract(args: argparse.Namespace, settings: Settings) -> int:
    from features.contract import contract_markdown

    _emit(contract_markdown(), args.out)
    return 0


def _features(args: argparse.Namespace, settings: Settings) -> int:
    from features.customer_features import feature_dictionary_markdown

    _emit(feature_dictionary_markdown(), args.out)
    return 0


def _emit(text: str, out: str | None) -> None:
    if out:
        Path(out).write_text(text)
    else:
        print(text)


def build_parser() -> argparse.ArgumentParser:
    from features.synthetic import DEFAULT_END_MONTH, DRIFT_SCENARIOS

    parser = argparse.ArgumentParser(prog="tagml", description="Customer tag models: features, training, scoring, monitoring.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="write a synthetic bank in the raw data contract")
    gen.add_argument("--customers", type=int, default=DEMO_CUSTOMERS)
    gen.add_argument("--months", type=int, default=12)
    gen.add_argument("--seed", type=int, default=42)
    gen.add_argument("--end-month", default=DEFAULT_END_MONTH, help="last generated month, YYYY-MM")
    gen.add_argument("--drift", choices=sorted(DRIFT_SCENARIOS), help="a named drift scenario")
    gen.add_argument("--drift-month", help="YYYY-MM the scenario starts (default: 3 months before the end)")
    gen.add_argument("--out", help="output directory (default: $TAGML_HOME/raw)")
    gen.set_defaults(run=_generate)

    demo = sub.add_parser("demo", help="generate the demo bank and run the pipeline end to end")
    demo.add_argument("--customers", type=int, default=DEMO_CUSTOMERS)
    demo.add_argument("--seed", type=int, default=42)
    demo.set_defaults(run=_demo)

    ui = sub.add_parser("ui", help="start the Dagster UI (dagster dev) on this TAGML_HOME")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=3000)
    ui.set_defaults(run=_ui)

    for name, func, what in (("contract", _contract, "the raw data contract"), ("features", _features, "the feature dictionary")):
        p = sub.add_parser(name, help=f"print {what} as markdown")
        p.add_argument("--out", help="write to this file instead of stdout")
        p.set_defaults(run=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args, Settings.from_env())


if __name__ == "__main__":
    raise SystemExit(main())
