"""`tagml serve` (the tag API under uvicorn) and `tagml api-key create|list|revoke`."""

from typing import Annotated

import typer

from tagml.cli.app import app
from tagml.cli.common import load_settings, print_json
from tagml.core.settings import HomeNotFoundError, Settings


def serving_settings() -> Settings:
    """Settings whose home must exist; unlike the training commands, serving needs no MLflow store (a serving host may have none)."""
    settings = load_settings()
    if not settings.home.is_dir():
        raise HomeNotFoundError(f"no tagml home at {settings.home}: set TAGML_HOME to an existing home (the one the nightly job scores into)")
    return settings


keys_app = typer.Typer(name="api-key", help="API keys of the tag API: created (shown once), listed, revoked.", no_args_is_help=True)
app.add_typer(keys_app, name="api-key")


@app.command("serve")
def serve_command(
    host: Annotated[str, typer.Option(help="address to bind (default loopback; 0.0.0.0 exposes it to the network)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port", min=1, max=65535)] = 8000,
) -> None:
    """Serve the tag API (OpenAPI at /docs). The access log is off: its paths hold customer ids."""
    import uvicorn

    from tagml.serving.api import create_app

    settings = serving_settings()
    api = create_app(settings)
    print(f"tag API on http://{host}:{port} (docs: http://{host}:{port}/docs); keys: {settings.api_keys_path}", flush=True)
    uvicorn.run(api, host=host, port=port, access_log=False, log_level="warning", server_header=False)


@keys_app.command("create")
def create_key_command(
    name: Annotated[str, typer.Option(help="who or what uses the key (e.g. crm-prod)")],
    scope: Annotated[list[str], typer.Option("--scope", help="a scope (repeatable): read:tags, read:confidential, read:audiences, export:audiences")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Create an API key; it is printed once and only its sha256 is stored."""
    from tagml.serving.auth import create_key

    settings = serving_settings()
    secret, record = create_key(settings.api_keys_path, name, scope)
    if as_json:
        print_json({**record.public(), "key": secret})
        return
    print(secret)
    typer.echo(f"tagml: key {record.name} ({', '.join(record.scopes)}) created; it is shown only now: store it in the caller's secret store", err=True)


@keys_app.command("list")
def list_keys_command(as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """The API keys: name, scopes, when created (never the keys)."""
    from tagml.serving.auth import list_keys

    settings = serving_settings()
    keys = [k.public() for k in list_keys(settings.api_keys_path)]
    if as_json:
        print_json(keys)
        return
    if not keys:
        print(f"no API keys in {settings.api_keys_path}: create one with `tagml api-key create --name N --scope read:tags`")
    for key in keys:
        print(f"{key['name']:<24} {key['created']}  {', '.join(key['scopes'])}")


@keys_app.command("revoke")
def revoke_key_command(name: Annotated[str, typer.Option(help="the key's name")]) -> None:
    """Revoke an API key: a running server refuses it from its next request."""
    from tagml.serving.auth import revoke_key

    settings = serving_settings()
    revoke_key(settings.api_keys_path, name)
    print(f"revoked API key {name}")
