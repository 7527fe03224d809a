"""Labels outside a tag's classes are counted per value and reported; beyond a small share they fail
training by name; a corrupt staged or training snapshot file is named with what rebuilds it."""

import shutil
from pathlib import Path

import pytest
import yaml
from conftest import WINDOW_END

from tagml.core.files import CorruptFileError
from tagml.core.storage import sql_literal
from tagml.training.catalog import load_catalog
from tagml.training.dataset import (
    MAX_UNKNOWN_LABEL_SHARE,
    TrainingDataError,
    build_training_set,
    load_training_set,
)

SHIPPED = load_catalog()


def risk_tag(tmp: Path, classes: list[str] | None = None):
    data = SHIPPED.get("risk_appetite").model_dump(mode="json")
    if classes:
        data["classes"] = classes
    path = tmp / "catalog.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "tags": [data]}))
    return load_catalog(path).tags[0]


def relabel(con, staged: Path, sql_case: str) -> None:
    """Rewrite the staged tag_labels with `label` replaced by `sql_case`."""
    path = staged / "tag_labels.parquet"
    tmp = staged / "tag_labels.new.parquet"
    con.execute(f"COPY (SELECT * REPLACE ({sql_case} AS label) FROM read_parquet({sql_literal(path)})) TO {sql_literal(tmp)} (FORMAT PARQUET)")
    tmp.replace(path)


def risk_label_counts(con, staged: Path) -> dict[str, int]:
    rows = con.execute(
        f"SELECT label, count(*) FROM read_parquet({sql_literal(staged / 'tag_labels.parquet')}) WHERE tag = 'risk_appetite' "
        f"AND known_date <= DATE {sql_literal(WINDOW_END)} GROUP BY 1"
    ).fetchall()
    return dict(rows)


def test_a_class_missing_from_the_catalog_fails_by_name(con, bank, tmp_path):
    """A catalog declaring C1-C4 while the questionnaire yields C5 too: far more than 5% would be
    silently dropped (and the model would never predict C5)."""
    counts = risk_label_counts(con, bank["staged"])
    share = counts["C5"] / sum(counts.values())
    assert share > MAX_UNKNOWN_LABEL_SHARE  # the session bank's C5 share, the precondition of this case
    with pytest.raises(TrainingDataError) as info:
        build_training_set(con, bank["staged"], risk_tag(tmp_path, ["C1", "C2", "C3", "C4"]), WINDOW_END, tmp_path / "sets")
    message = str(info.value)
    assert "'risk_appetite'" in message and "'C5'" in message and f"{counts['C5']} of {sum(counts.values())}" in message


def test_a_few_unknown_labels_are_counted_per_value(con, bank, staged_copy, tmp_path):
    """Under the threshold the labels are left out and counted per value (what training_set's
    Dagster metadata shows); the training set holds only the declared classes."""
    # about 2% of risk labels recoded to two values the catalog does not know
    relabel(
        con,
        staged_copy,
        "CASE WHEN tag = 'risk_appetite' AND hash(customer_id) % 100 = 0 THEN 'C9' "
        "WHEN tag = 'risk_appetite' AND hash(customer_id) % 100 = 1 THEN 'unknown' ELSE label END",
    )
    counts = risk_label_counts(con, staged_copy)
    data = build_training_set(con, staged_copy, risk_tag(tmp_path), WINDOW_END, tmp_path / "sets")
    assert data.unknown_labels == {k: counts[k] for k in ("C9", "unknown")}
    assert data.dropped_labels["unknown_class"] == counts["C9"] + counts["unknown"] > 0
    assert set(data.frame["label"]) <= {"C1", "C2", "C3", "C4", "C5"}


def test_corrupt_staged_table_is_named_with_the_repair(con, bank, staged_copy, tmp_path):
    path = staged_copy / "transactions.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptFileError) as info:
        build_training_set(con, staged_copy, risk_tag(tmp_path), WINDOW_END, tmp_path / "sets")
    assert info.value.path == path
    assert "transactions.parquet" in str(info.value) and "raw_ingest_job" in str(info.value)


def test_corrupt_training_snapshot_is_named_with_the_repair(con, bank, tmp_path):
    tag = risk_tag(tmp_path)
    data = build_training_set(con, bank["staged"], tag, WINDOW_END, tmp_path / "sets")
    broken = tmp_path / "broken.parquet"
    shutil.copy(data.snapshot_path, broken)
    broken.write_bytes(broken.read_bytes()[:-100])
    assert load_training_set(data.snapshot_path, tag).frame.shape == data.frame.shape
    with pytest.raises(CorruptFileError, match="re-materialize the risk_appetite/training_set"):
        load_training_set(broken, tag)
