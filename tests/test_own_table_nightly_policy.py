"""The partition policy of customer_tags, without a registry: every tag is checked before anything is
written and one error names each failing tag; `skip` publishes the others, and coverage expects them only."""

from datetime import date

import pandas as pd
import pytest
import yaml

from tagml.scoring.score import ScoringError, UnscorableTagsError, score_partition
from tagml.training.catalog import load_catalog
from tagml.training.tracking import connect_tracking
from tests.conftest import MID_MONTH_END, make_connection, write_test_catalog


@pytest.fixture
def client(tmp_path):
    """A real, empty SQLite registry: the BYO tag has no champion (its snapshot is checked first)."""
    return connect_tracking(f"sqlite:///{tmp_path / 'mlflow.db'}")


def _catalog(tmp_path, byo_table=None):
    path = write_test_catalog(tmp_path / "catalog.yaml", ("value_tier", "lifecycle_stage"))
    if byo_table is not None:
        entries = yaml.safe_load(path.read_text())
        entries["tags"].append(
            {
                "name": "own_tag",
                "description": "d",
                "kind": "model",
                "classes": ["a", "b"],
                "owner": "o",
                "label": {"feature_source": {"path": str(byo_table), "labels_path": str(byo_table)}},
                "model": {"trials": 1},
            }
        )
        path.write_text(yaml.safe_dump(entries))
    return load_catalog(path)


def test_one_error_names_every_failing_tag_and_writes_nothing(tmp_path, client):
    catalog = _catalog(tmp_path, byo_table=tmp_path / "crm.parquet")
    target = tmp_path / "data.parquet"
    target.write_bytes(b"previous partition")
    own = {"own_tag": tmp_path / "own" / "data.parquet"}
    with pytest.raises(UnscorableTagsError) as err:
        score_partition(make_connection(tmp_path), client, catalog, tmp_path / "missing.parquet", None, MID_MONTH_END, target, own_features=own, skip={})
    assert set(err.value.problems) == {"value_tier", "lifecycle_stage", "own_tag"}
    assert "3 tag(s) cannot be scored" in str(err.value) and "materialize own_tag/own_features first" in str(err.value)
    assert "tag 'value_tier': no feature snapshot for as_of 2026-06-30" in str(err.value)
    assert target.read_bytes() == b"previous partition"


def test_skip_publishes_the_other_tags_and_coverage_expects_them_only(bank_features, tmp_path, client):
    catalog = _catalog(tmp_path, byo_table=tmp_path / "late.parquet")
    target = tmp_path / "data.parquet"
    features = bank_features[MID_MONTH_END]
    summary = score_partition(make_connection(tmp_path), None, catalog, features, None, MID_MONTH_END, target, skip={"own_tag": "table late"})
    assert summary.skipped == {"own_tag": "table late"} and summary.coverage.passed and len(summary.coverage.tags) == 2
    assert set(pd.read_parquet(target)["tag"]) == {"value_tier", "lifecycle_stage"}
    with pytest.raises(ScoringError, match=r"skip_tags names \['nope'\], not tags of the catalog"):
        score_partition(make_connection(tmp_path), None, catalog, features, None, date(2026, 6, 30), target, skip={"nope": "x"})
