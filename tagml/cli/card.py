"""`tagml card TAG [--version N] [--out FILE] [--html]`: a model version's card, as its records stand now."""

from pathlib import Path
from typing import Annotated

import typer

from tagml.cli.app import app
from tagml.cli.common import load_settings, note, tag_spec, tracking_client


@app.command("card")
def card_command(
    tag: Annotated[str, typer.Argument(help="a model tag of the catalog")],
    version: Annotated[str | None, typer.Option("--version", help="the model version (default: the champion, else the newest)")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="write the card to this file instead of printing it")] = None,
    html: Annotated[bool, typer.Option("--html", help="HTML instead of markdown")] = False,
) -> None:
    """The model card of a version: intended use, data, features, method, metrics with intervals, calibration,
    comparisons, fairness slices, stability, gate decision, overrides, monitoring thresholds, reproduction inputs."""
    settings = load_settings(require_home=True)
    spec = tag_spec(settings, tag, kind="model")
    from tagml.core.storage import atomic_replace
    from tagml.training.model_card import build_model_card, card_version

    client = tracking_client(settings)
    card = build_model_card(client, spec.name, card_version(client, spec.name, version))
    text = card.html if html else card.markdown
    if out is None:
        print(text, end="")
        return
    with atomic_replace(out) as tmp:
        tmp.write_text(text)
    note(f"model card of {card.record['model']} v{card.version} ({'HTML' if html else 'markdown'}) written to {out}")
