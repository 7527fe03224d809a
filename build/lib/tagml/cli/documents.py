"""`tagml contract` and `tagml features`: the raw data contract and the feature dictionary as markdown."""

from pathlib import Path
from typing import Annotated

import typer

from tagml.cli.app import app


def _emit(text: str, out: Path | None) -> None:
    if out:
        out.write_text(text)
    else:
        print(text)


@app.command("contract")
def contract_command(out: Annotated[Path | None, typer.Option(help="write to this file instead of stdout")] = None) -> None:
    """Print the raw data contract as markdown."""
    from tagml.features.contract import contract_markdown

    _emit(contract_markdown(), out)


@app.command("features")
def features_command(out: Annotated[Path | None, typer.Option(help="write to this file instead of stdout")] = None) -> None:
    """Print the feature dictionary as markdown."""
    from tagml.features.dictionary import feature_dictionary_markdown

    _emit(feature_dictionary_markdown(), out)
