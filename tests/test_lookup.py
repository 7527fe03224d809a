"""One customer's tags as plain data (tagml.scoring.lookup), over a real tag partition in Parquet."""

import math
from datetime import date

import duckdb
import pytest

from tagml.core.storage import sql_literal
from tagml.scoring.lookup import customer_tags, is_present
from tagml.scoring.store import ParquetTagStore, TagStore, TagStoreError

AS_OF = date(2026, 9, 30)
BOTH = frozenset({"risk_appetite", "value_tier"})  # published (the lifecycle's own tests are in test_lifecycle/test_consent)


@pytest.fixture
def store(tmp_path) -> TagStore:
    store = ParquetTagStore(tmp_path / "customer_tags")
    path = store.partition_path(AS_OF)
    path.parent.mkdir(parents=True)
    with duckdb.connect() as con:
        con.execute(
            """COPY (
                SELECT * FROM (VALUES
                    ('C1', 'risk_appetite', 'balanced', 0.7::DOUBLE, MAP {'aggressive': 0.1::DOUBLE, 'balanced': 0.7::DOUBLE, 'conservative': 0.2::DOUBLE}, ['age 41'], 'model',
                     'tagml-risk_appetite/3', '3', 'conservative', 'balanced', true),
                    ('C1', 'value_tier', 'affluent', NULL, NULL, [], 'rule', 'rule value_tier@1', NULL, NULL, NULL, NULL),
                    ('C2', 'value_tier', 'mass', NULL, NULL, [], 'rule', 'rule value_tier@1', NULL, NULL, NULL, NULL)
                ) AS t(customer_id, tag, value, probability, probabilities, reasons, source, producer, model_version, observed_value, inferred_value, observed_mismatch)
                CROSS JOIN (SELECT DATE '2026-09-30' AS as_of, TIMESTAMP '2026-10-01 02:13:00' AS scored_at)
            ) TO """
            + sql_literal(str(path))
            + " (FORMAT parquet)"
        )
    return store


def test_a_customers_tags_are_plain_data_with_lineage_for_model_tags_only(store):
    asked: list[tuple[str, str]] = []

    def lineage(tag: str, version: str) -> dict:
        asked.append((tag, version))
        return {"model": f"tagml-{tag}/{version}"}

    with duckdb.connect() as con:
        result = customer_tags(con, store, "C1", None, lineage, published=BOTH)
    assert (result["customer_id"], result["as_of"], result["scored_at"]) == ("C1", "2026-09-30", "2026-10-01 02:13")
    model, rule = result["tags"]
    assert asked == [("risk_appetite", "3")]
    assert model["lineage"] == {"model": "tagml-risk_appetite/3"} and "lineage" not in rule
    assert model["probabilities"] == {"aggressive": 0.1, "balanced": 0.7, "conservative": 0.2} and model["reasons"] == ["age 41"]
    assert model["observed_mismatch"] is True and model["inferred_value"] == "balanced"
    assert rule["probability"] is None and rule["probabilities"] is None and rule["reasons"] == []  # NaN/NULL -> null, not NaN


def test_without_lineage_nothing_is_asked_and_a_missing_customer_is_named(store):
    with duckdb.connect() as con:
        result = customer_tags(con, store, "C1", published=BOTH)
        assert all("lineage" not in row for row in result["tags"]) and result["hidden"] == []
        with pytest.raises(TagStoreError, match="'C9' has no tags"):
            customer_tags(con, store, "C9", published=BOTH)


def test_unpublished_tags_are_named_not_shown(store):
    with duckdb.connect() as con:
        result = customer_tags(con, store, "C1", published={"value_tier"})
        assert [row["tag"] for row in result["tags"]] == ["value_tier"] and result["hidden"] == ["risk_appetite"]
        assert "balanced" not in str(result)  # the hidden tag's value is not in the answer
        nothing = customer_tags(con, store, "C2", published=())
        assert nothing["tags"] == [] and nothing["hidden"] == ["value_tier"]


def test_is_present():
    assert not any(is_present(v) for v in (None, math.nan, [], {}, ""))
    assert all(is_present(v) for v in (0, 0.0, "x", ["a"], {"a": 1}))
