"""`tagml generate`: a synthetic bank in the raw data contract, with a progress bar."""

import threading
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from tagml.cli.app import app
from tagml.cli.common import console, is_month, load_settings, print_json
from tagml.features.synthetic import DEFAULT_END_MONTH, DRIFT_SCENARIOS

DEMO_CUSTOMERS = 20_000


# the generator's scenarios are the one list of choices (imported here: Typer needs them to parse)
Scenario = Enum("Scenario", {name: name for name in sorted(DRIFT_SCENARIOS)}, type=str)  # type: ignore[misc]


GENERATED_TABLES = ("customers", "balances", "loans", "transactions", "digital_events", "tag_labels", "products", "holdings", "consents")


def _watch_generation(out: Path, stop: threading.Event, advance: Callable[[int], None]) -> None:
    """Follow the generator by the files it writes (one part per chunk and table)."""
    seen = 0
    while not stop.wait(0.2):
        done = sum(len(list((out / t).glob("part-*.parquet"))) for t in GENERATED_TABLES)
        if done > seen:
            advance(done - seen)
            seen = done


def generate_with_progress(config: Any, out: Path) -> dict:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from tagml.features.synthetic import CHUNK_SIZE, generate_bank

    parts = len(GENERATED_TABLES) * max(1, -(-config.customers // CHUNK_SIZE))
    with Progress(
        TextColumn("generating"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("table files"),
        TimeElapsedColumn(),
        console=console(stderr=True),
        transient=True,
    ) as progress:
        task = progress.add_task("generate", total=parts)
        stop = threading.Event()
        watcher = threading.Thread(target=_watch_generation, args=(out, stop, lambda n: progress.advance(task, n)), daemon=True)
        watcher.start()
        try:
            summary = generate_bank(config, out)
        finally:
            stop.set()
            watcher.join()
        progress.update(task, completed=parts)
    return summary


@app.command("generate")
def generate(
    customers: Annotated[int, typer.Option(min=1, help="number of customers")] = DEMO_CUSTOMERS,
    months: Annotated[int, typer.Option(min=1, help="months of history")] = 12,
    seed: Annotated[int, typer.Option(help="random seed (same seed, same bank)")] = 42,
    end_month: Annotated[str, typer.Option(help="last generated month, YYYY-MM")] = DEFAULT_END_MONTH,
    drift: Annotated[Scenario | None, typer.Option(help="a named drift scenario")] = None,
    drift_month: Annotated[str | None, typer.Option(help="YYYY-MM the scenario starts (default: 3 months before the end)")] = None,
    out: Annotated[Path | None, typer.Option(help="output directory (default: $TAGML_HOME/raw)")] = None,
    own_tables: Annotated[
        bool,
        typer.Option("--own-tables", help="also write the bank's own tables (a customer wide table, monthly snapshots, labels files) in own_tables/ beside it"),
    ] = False,
) -> None:
    """Write a synthetic bank in the raw data contract (and, with --own-tables, a bank's own customer tables from it)."""
    from tagml.features.synthetic import BankConfig

    for value, option in ((end_month, "--end-month"), (drift_month, "--drift-month")):
        if value is not None and not is_month(value):
            raise typer.BadParameter(f"{value!r} is not a month YYYY-MM", param_hint=option)
    settings = load_settings(create=out is None)
    config = BankConfig(customers=customers, months=months, seed=seed, end_month=end_month, drift=drift.value if drift else None, drift_month=drift_month)
    target = out if out is not None else settings.raw_dir
    started = time.perf_counter()
    summary = generate_with_progress(config, target)
    result = {"out": str(target), "seconds": round(time.perf_counter() - started, 1), **summary}
    if own_tables:
        from tagml.features.synthetic import generate_own_tables, own_tables_beside

        result["own_tables"] = generate_own_tables(target, own_tables_beside(target), seed=seed)
    print_json(result)
