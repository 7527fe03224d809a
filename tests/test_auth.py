"""API keys: created through the CLI (shown once, only the sha256 stored, file mode 0600, written atomically),
listed, revoked; concurrent creations both land; a damaged keys file is a named error, never an open door."""

import json
import os
import stat
import threading

import pytest

from tagml.cli import main
from tagml.cli.errors import ExitCode
from tagml.core.settings import Settings
from tagml.serving.auth import ApiKeyError, KeyRing, create_key, key_digest, list_keys, revoke_key


@pytest.fixture
def home(tmp_path, monkeypatch) -> Settings:
    for name in list(os.environ):
        if name.startswith("TAGML_") or name in ("MLFLOW_TRACKING_URI", "DAGSTER_HOME"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TAGML_HOME", str(tmp_path / "home"))
    settings = Settings.from_env()
    settings.home.mkdir()
    return settings


def test_cli_create_list_revoke(home, capsys):
    assert main(["api-key", "create", "--name", "crm-prod", "--scope", "read:tags", "--scope", "read:confidential"]) == 0
    secret = capsys.readouterr().out.strip()
    assert secret.startswith("tgk_") and len(secret) > 40
    text = home.api_keys_path.read_text()
    assert secret not in text and key_digest(secret) in text
    assert stat.S_IMODE(home.api_keys_path.stat().st_mode) == 0o600
    assert [k.public() | {"created": None} for k in list_keys(home.api_keys_path)] == [
        {"name": "crm-prod", "scopes": ["read:tags", "read:confidential"], "created": None}
    ]
    assert main(["api-key", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [k["name"] for k in listed] == ["crm-prod"] and secret not in json.dumps(listed) and "sha256" not in listed[0]
    assert KeyRing(home.api_keys_path).authenticate(secret).scopes == ("read:tags", "read:confidential")
    assert main(["api-key", "revoke", "--name", "crm-prod"]) == 0
    assert list_keys(home.api_keys_path) == [] and KeyRing(home.api_keys_path).authenticate(secret) is None


def test_bad_requests_are_named_and_change_nothing(home, capsys):
    create_key(home.api_keys_path, "crm", ["read:tags"])
    before = home.api_keys_path.read_bytes()
    assert main(["api-key", "create", "--name", "other", "--scope", "write:everything"]) == ExitCode.USAGE
    assert "unknown scope 'write:everything'" in capsys.readouterr().err
    assert main(["api-key", "create", "--name", "crm", "--scope", "read:tags"]) == ExitCode.USAGE
    assert "exists already" in capsys.readouterr().err
    assert main(["api-key", "create", "--name", "../../etc", "--scope", "read:tags"]) == ExitCode.USAGE
    assert main(["api-key", "revoke", "--name", "nobody"]) == ExitCode.USAGE
    assert "no API key named 'nobody'" in capsys.readouterr().err
    assert home.api_keys_path.read_bytes() == before


def test_damaged_file_is_an_error_not_an_empty_key_set(home, capsys):
    secret, _ = create_key(home.api_keys_path, "crm", ["read:tags"])
    ring = KeyRing(home.api_keys_path)
    assert ring.authenticate(secret) is not None
    home.api_keys_path.write_text('{"keys": [{"name": "x"')
    with pytest.raises(ApiKeyError, match="damaged"):
        ring.authenticate(secret)
    with pytest.raises(ApiKeyError, match="damaged"):
        create_key(home.api_keys_path, "other", ["read:tags"])
    assert main(["api-key", "list"]) == ExitCode.USAGE and "damaged" in capsys.readouterr().err


def test_concurrent_creations_all_land_and_the_ring_reloads(home):
    ring = KeyRing(home.api_keys_path)
    assert ring.authenticate("tgk_anything") is None  # no file yet: nobody
    secrets: dict[str, str] = {}

    def make(i: int) -> None:
        secrets[f"k{i}"] = create_key(home.api_keys_path, f"k{i}", ["read:tags"])[0]

    threads = [threading.Thread(target=make, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(k.name for k in list_keys(home.api_keys_path)) == sorted(secrets)
    assert all(ring.authenticate(s).name == name for name, s in secrets.items())
    revoke_key(home.api_keys_path, "k3")
    assert ring.authenticate(secrets["k3"]) is None and ring.authenticate(secrets["k4"]) is not None
    assert not [p.name for p in home.api_keys_path.parent.iterdir() if p.name.endswith(".tmp")]
