"""The online tag store: `tagml online refresh` (load a tag partition into it) and `tagml online status` (what it holds, tag quality)."""

from contextlib import closing
from typing import Annotated

import typer

from tagml.cli import common
from tagml.cli.app import app
from tagml.cli.common import load_settings, parse_date, print_json

online_app = typer.Typer(help="The online tag store the API reads: refresh it from a tag partition, show what it holds.", no_args_is_help=True)
app.add_typer(online_app, name="online")


@online_app.command("refresh")
def refresh_command(
    as_of: Annotated[str | None, typer.Option(help="load the partition on or before YYYY-MM-DD (default: the newest)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the snapshot as JSON")] = False,
) -> None:
    """Load a tag partition into the online store and swap it in (readers see the old store or the new one)."""
    from tagml.scoring.online import open_online_store
    from tagml.scoring.store import ParquetTagStore

    settings = load_settings(require_home=True, writes=True)
    day = parse_date(as_of)
    online = open_online_store(settings.online_store)
    try:
        with closing(common.connect(settings)) as con:
            snapshot = online.refresh(con, ParquetTagStore.in_warehouse(settings.warehouse_dir), day)
        if as_json:
            print_json(snapshot.as_dict())
        else:
            print(f"{online.describe()}: {snapshot.customers:,} customers ({snapshot.rows:,} tag rows) as of {snapshot.as_of}, scored {snapshot.scored_at}")
    finally:
        online.close()


@online_app.command("status")
def status_command(as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """What the online store holds (partition, customers, when loaded) and each tag's coverage, stability and freshness."""
    from tagml.scoring.online import OnlineStoreError, open_online_store, quality_markdown, quality_report
    from tagml.training.catalog import load_catalog

    settings = load_settings(require_home=True)
    online = open_online_store(settings.online_store)
    try:
        snapshot = online.snapshot()
        if snapshot is None:
            raise OnlineStoreError(
                f"{online.describe()} has not been loaded yet: run the nightly scoring job (it refreshes the store) or `tagml online refresh`"
            )
        report = quality_report(online.quality(), load_catalog(settings.catalog_path))
        if as_json:
            print_json({"store": online.describe(), "snapshot": snapshot.as_dict(), "quality": report})
            return
        print(f"{online.describe()}: {snapshot.customers:,} customers ({snapshot.rows:,} tag rows) as of {snapshot.as_of}")
        print(f"  scored {snapshot.scored_at}, loaded {snapshot.loaded_at}, from {snapshot.source}")
        print(quality_markdown(report))
    finally:
        online.close()
