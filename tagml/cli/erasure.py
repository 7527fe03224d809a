"""`tagml erase`: remove customers from every store of the home, keep them out of later deliveries, print the receipt."""

from pathlib import Path
from typing import Annotated, Any

import typer

from tagml.cli.app import app
from tagml.cli.common import current_user, load_settings, print_json


def print_receipt(receipt: dict[str, Any]) -> None:
    """The receipt in counts: stores, rows, snapshots, model versions, what the bank must do, and the verification."""
    print(f"erasure {receipt['erasure_id']} at {receipt['erased_at']} by {receipt['requested_by']}: {receipt['reason']}")
    print(f"  customers: {receipt['customers']} requested, {receipt['customers_found']} found in tagml's stores; {receipt['rows_removed']} rows removed")
    if receipt["customers_found"] < receipt["customers"]:
        print(f"  {receipt['customers'] - receipt['customers_found']} of the ids had no row in any store (nothing to remove; they are suppressed all the same)")
    for store, done in receipt["stores"].items():
        if done["files_rewritten"] or done["files_removed"]:
            print(f"  {store:<24} {done['files_rewritten']} files rewritten, {done['rows_removed']} rows removed, {done['files_removed']} files removed")
    for snapshot in receipt["snapshots"]:
        print(f"  training snapshot {snapshot['path']}: sha256 {snapshot['sha256_before'][:12]} -> {snapshot['sha256_after'][:12]}")
    if receipt["model_versions"]:
        print(f"  trained on these customers (retrain to forget them): {', '.join(receipt['model_versions'])}")
    for action in receipt["bank_actions"]:
        print(f"  for the bank: {action}")
    check = receipt["verification"]
    if check["verified"]:
        print(f"  verified: 0 hits in {check['stores_scanned']} stores ({check['files_scanned']} files)")
    else:
        print(f"  NOT verified: the customers still appear in {', '.join(check['stores_with_hits'])}")
    print(f"  receipt: {receipt['receipt_path']} ({receipt['seconds']} s)")


@app.command("erase")
def erase_command(
    customer_ids: Annotated[list[str] | None, typer.Argument(help="the customer ids to erase")] = None,
    from_file: Annotated[Path | None, typer.Option("--from-file", help="a file of customer ids, one a line")] = None,
    reason: Annotated[str, typer.Option(help="why (recorded in the receipt), e.g. a request reference")] = "",
    by: Annotated[str, typer.Option(help="who asked (recorded); default: the current user")] = current_user(),
    as_json: Annotated[bool, typer.Option("--json", help="print the receipt as JSON")] = False,
) -> None:
    """Erase customers from every store tagml writes (PIPL Art. 47, GDPR Art. 17); later deliveries are filtered; prints the receipt."""
    from tagml.compliance.erasure import erase, read_id_file

    ids = list(customer_ids or []) + (read_id_file(from_file) if from_file is not None else [])
    if not ids:
        raise typer.BadParameter("give at least one customer id (or --from-file)", param_hint="CUSTOMER_IDS")
    if not reason.strip():
        raise typer.BadParameter("say why (a request reference): it is part of the receipt", param_hint="--reason")
    settings = load_settings(writes=True)
    if not settings.home.is_dir():
        settings.require_home()  # never start an empty home: names TAGML_HOME
    receipt = erase(settings, ids, by, reason).to_dict()
    if as_json:
        print_json(receipt)
    else:
        print_receipt(receipt)
    if not receipt["verification"]["verified"]:
        from tagml.cli.errors import CommandFailed, ExitCode

        raise CommandFailed(
            "the erasure could not be verified: the customers still appear in " + ", ".join(receipt["verification"]["stores_with_hits"]), ExitCode.UNEXPECTED
        )
