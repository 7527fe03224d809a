"""The shipped demo with a bring-your-own tag added to the shipped catalog: the entry of docs/OWN_TABLE.md
(read from the page, so the walkthrough stays true) trains on the bank's own wide table that the demo
writes beside raw, passes the gate, is scored nightly next to the contract tags, monitored and looked up.
Before this, adding one such tag made the demo's nightly scoring fail for every tag."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tagml.core.settings import DEFAULT_CATALOG, Settings
from tests.conftest import publish_tags

ROOT = Path(__file__).resolve().parents[1]
PII_COLUMNS = ("CustomerName", "PhoneNumber", "EmailAddress", "客户名称", "身份证号", "手机号", "contact", "ref_no", "memo")

pytestmark = pytest.mark.slow


def documented_entry(home: Path) -> dict:
    """The credit_risk entry docs/OWN_TABLE.md tells a data scientist to append to the catalog."""
    page = (ROOT / "docs" / "OWN_TABLE.md").read_text()
    block = re.search(r"cat >> my_catalog.yaml <<EOF\n(.*?)\nEOF\n", page, re.DOTALL)
    assert block, "docs/OWN_TABLE.md no longer shows the catalog entry as a heredoc"
    entries = yaml.safe_load(block.group(1).replace("$TAGML_HOME", str(home)))
    assert [e["name"] for e in entries] == ["credit_risk"]
    return entries[0]


def run(home: Path, *args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    env = {**os.environ, "TAGML_HOME": str(home), "TAGML_CATALOG": str(home / "catalog.yaml")}
    return subprocess.run([sys.executable, "-m", "tagml.cli", *args], env=env, cwd=home.parent, capture_output=True, text=True, timeout=timeout, check=False)


def test_the_demo_passes_with_the_documented_own_table_tag_added_to_the_shipped_catalog(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    catalog = yaml.safe_load(DEFAULT_CATALOG.read_text())
    catalog["tags"].append(documented_entry(home))
    (home / "catalog.yaml").write_text(yaml.safe_dump(catalog, allow_unicode=True, sort_keys=False))

    demo = run(home, "demo", "--customers", "3000")
    assert demo.returncode == 0, demo.stdout[-4000:] + demo.stderr[-3000:]
    out = demo.stdout
    assert re.search(r"^  credit_risk\s+v1 ", out, re.MULTILINE), out[-4000:]  # trained in train_all_tags_job
    assert re.search(r"gate credit_risk\s+credit_risk v1 PROMOTED", out), out[-4000:]
    scored = re.findall(r"^  credit_risk\s+(?:good|bad) \d+\.\d%", out, re.MULTILINE)  # a distribution line, not the lookup's
    assert len(scored) == 2, out[-4000:]  # in both nightly partitions, next to the contract tags
    assert re.search(r"^  risk_appetite\s+C\d ", out, re.MULTILINE) and re.search(r"^  value_tier\s+", out, re.MULTILINE)

    tags_dir = home / "warehouse" / "customer_tags"
    partitions = sorted(tags_dir.glob("as_of=*/*.parquet"))
    assert len(partitions) == 2
    newest = pq.read_table(partitions[-1], columns=["customer_id", "tag", "value", "model_version", "source"]).to_pandas()
    credit = newest[newest["tag"] == "credit_risk"]
    wide_ids = set(pq.read_table(home / "own_tables" / "crm_wide.parquet", columns=["CustNo"]).column(0).to_pylist())
    # every customer of the bank's table but the one the demo erased last (its receipt holds no id)
    erased = {str(i) for i in wide_ids} - set(credit["customer_id"])
    assert set(credit["customer_id"]) <= {str(i) for i in wide_ids} and len(erased) == 1 and credit["model_version"].notna().all()
    assert not set(newest["customer_id"]) & erased
    assert set(credit["value"]) <= {"good", "bad"} and (credit["value"] == "bad").any()

    # PII never copied: the own snapshots hold only the champion's features
    for snapshot in (home / "warehouse" / "own_features" / "credit_risk").rglob("*.parquet"):
        assert not set(pq.read_schema(snapshot).names) & set(PII_COLUMNS), snapshot

    # monitored like the contract tags: a drift history row per nightly partition
    drift = run(home, "drift", "--json", timeout=600)
    assert drift.returncode == 0, drift.stderr
    assert "credit_risk" in drift.stdout

    customer = credit["customer_id"].iloc[0]
    publish_tags(Settings.from_env({"TAGML_HOME": str(home), "TAGML_CATALOG": str(home / "catalog.yaml")}))  # lookups show published tags only
    lookup = run(home, "tags", customer, "--json", timeout=600)
    assert lookup.returncode == 0, lookup.stderr
    shown = json.loads(lookup.stdout)
    names = {t["tag"] for t in shown["tags"]}
    assert {"credit_risk", "risk_appetite", "value_tier"} <= names, names
