"""Quality checks of a feature snapshot: a feature that went empty fails by name, features that
cannot exist yet in a bank's first months do not, unseen category values are counted, and a
corrupt partition is named with what rebuilds it."""

from datetime import date
from pathlib import Path

import pytest
from conftest import MID_MONTH_END, make_connection

from tagml.core.files import CorruptFileError
from tagml.core.storage import sql_literal
from tagml.features.delivery import stage_delivery
from tagml.features.quality import MAX_DATA_LAG_DAYS, check_feature_snapshot
from tagml.features.snapshot import (
    FeatureQualityError,
    build_feature_snapshot,
    open_feature_snapshot,
)
from tagml.features.synthetic import BankConfig, generate_bank

EARLY_AS_OF = date(2024, 2, 28)


@pytest.fixture(scope="module")
def early_bank(tmp_path_factory) -> Path:
    """A bank whose data starts in January 2024: at 2024-02-28 no customer has 3 months of history."""
    root = tmp_path_factory.mktemp("early_bank")
    generate_bank(BankConfig(customers=800, months=6, seed=11, end_month="2024-06"), root / "raw")
    con = make_connection(root)
    try:
        stage_delivery(con, root / "raw", root / "staged", date(2024, 7, 1))
    finally:
        con.close()
    return root / "staged"


def outcome(outcomes, name):
    return next(o for o in outcomes if o.name == name)


def rewrite(con, source: Path, target: Path, replace: str) -> Path:
    con.execute(f"COPY (SELECT * REPLACE ({replace}) FROM read_parquet({sql_literal(source)})) TO {sql_literal(target)} (FORMAT PARQUET)")
    return target


def test_early_as_of_passes_with_history_bound_features_not_yet_available(early_bank, con, tmp_path):
    """2024-02-28: the 3-month changes are null for everyone (no balance in 2023) -- legitimately.
    The null-rate check failed this partition before the dictionary said so."""
    snapshot = build_feature_snapshot(con, early_bank, EARLY_AS_OF, tmp_path / "f.parquet")
    nulls = outcome(snapshot.checks, "null_rates")
    assert nulls.passed
    assert nulls.metadata["not_yet_available"] == ["aum_growth_3m", "risky_share_change_3m"]
    assert nulls.metadata["highest_null_rates"]["aum_growth_3m"] == 1.0


@pytest.mark.parametrize("later", [date(2024, 4, 30), date(2024, 6, 30)], ids=["first_month_with_history", "later"])
def test_history_bound_feature_gone_empty_later_fails(later, early_bank, con, tmp_path):
    built = build_feature_snapshot(con, early_bank, later, tmp_path / "f.parquet")
    assert outcome(built.checks, "null_rates").metadata["not_yet_available"] == []
    broken = rewrite(con, built.path, tmp_path / "broken.parquet", "NULL::DOUBLE AS aum_growth_3m")
    nulls = outcome(check_feature_snapshot(con, broken, early_bank, later), "null_rates")
    assert not nulls.passed and nulls.blocking
    assert nulls.metadata["empty_features"] == ["aum_growth_3m"] and "aum_growth_3m" in nulls.description


@pytest.mark.parametrize(
    "replace, feature, kind",
    [
        ("NULL::DOUBLE AS aum_total", "aum_total", "never_null_features_with_nulls"),  # the case
        ("CASE WHEN hash(customer_id) % 10 = 0 THEN NULL ELSE age END AS age", "age", "never_null_features_with_nulls"),
        ("NULL::DOUBLE AS days_since_last_txn", "days_since_last_txn", "empty_features"),
    ],
    ids=["aum_total_all_null", "age_partly_null", "nullable_feature_all_null"],
)
def test_feature_gone_empty_fails_blocking_by_name(replace, feature, kind, bank, bank_features, con, tmp_path):
    broken = rewrite(con, bank_features[MID_MONTH_END], tmp_path / "broken.parquet", replace)
    outcomes = check_feature_snapshot(con, broken, bank["staged"], MID_MONTH_END)
    nulls = outcome(outcomes, "null_rates")
    assert not nulls.passed and nulls.blocking
    assert nulls.metadata[kind] == [feature] and feature in nulls.description
    # the untouched snapshot passes: the failure is the feature going empty
    assert outcome(check_feature_snapshot(con, bank_features[MID_MONTH_END], bank["staged"], MID_MONTH_END), "null_rates").passed


def test_gate_keeps_the_stored_partition_when_a_feature_goes_empty(bank, con, tmp_path):
    """The gate refuses a snapshot in which a never-null feature has nulls; the stored one stays."""
    target = tmp_path / "as_of" / "data.parquet"
    build_feature_snapshot(con, bank["staged"], MID_MONTH_END, target)
    before = target.read_bytes()
    staged = tmp_path / "staged"
    staged.mkdir()
    for p in Path(bank["staged"]).iterdir():
        (staged / p.name).write_bytes(p.read_bytes())
    # customers whose birth date vanished (a broken upstream extract): age cannot be computed
    rewrite(con, Path(bank["staged"]) / "customers.parquet", staged / "customers.parquet", "NULL::DATE AS birth_date")
    with pytest.raises(FeatureQualityError, match="age"):
        build_feature_snapshot(con, staged, MID_MONTH_END, target)
    assert target.read_bytes() == before


def test_unseen_category_values_are_counted_and_flagged(bank, bank_features, con, tmp_path):
    broken = rewrite(
        con,
        bank_features[MID_MONTH_END],
        tmp_path / "broken.parquet",
        "CASE WHEN hash(customer_id) % 50 = 0 THEN 'atlantis' ELSE region END AS region",
    )
    expected = con.execute(f"SELECT count(*) FROM read_parquet({sql_literal(broken)}) WHERE region = 'atlantis'").fetchone()[0]
    unseen = outcome(check_feature_snapshot(con, broken, bank["staged"], MID_MONTH_END), "unseen_categories")
    assert expected > 0
    assert not unseen.passed and not unseen.blocking
    assert unseen.metadata["unseen_rows"] == {"region": expected}
    assert unseen.metadata["unseen_values"] == {"region": ["atlantis"]}
    clean = outcome(check_feature_snapshot(con, bank_features[MID_MONTH_END], bank["staged"], MID_MONTH_END), "unseen_categories")
    assert clean.passed and clean.metadata["unseen_rows"] == {}


def test_truncated_partition_is_named_with_the_partition_to_rebuild(bank, bank_features, con, tmp_path):
    data = bank_features[MID_MONTH_END].read_bytes()
    broken = tmp_path / "data.parquet"
    broken.write_bytes(data[: len(data) // 3])
    for call in (
        lambda: check_feature_snapshot(con, broken, bank["staged"], MID_MONTH_END),
        lambda: open_feature_snapshot(broken, MID_MONTH_END),
    ):
        with pytest.raises(CorruptFileError) as info:
            call()
        assert info.value.path == broken
        assert f"re-materialize the customer_features partition {MID_MONTH_END.isoformat()}" in str(info.value)
    assert open_feature_snapshot(bank_features[MID_MONTH_END], MID_MONTH_END) == bank_features[MID_MONTH_END]


def test_a_feature_filled_with_zero_for_everyone_is_flagged(bank, bank_features, con, tmp_path):
    """AUM 0 for every customer (balances that stopped arriving) is never null -- the fill value --
    so the null check cannot see it; the constant-feature check names it."""
    broken = rewrite(con, bank_features[MID_MONTH_END], tmp_path / "broken.parquet", "0.0::DOUBLE AS aum_total")
    constant = outcome(check_feature_snapshot(con, broken, bank["staged"], MID_MONTH_END), "constant_features")
    assert not constant.passed and not constant.blocking
    assert constant.metadata["constant_features"] == {"aum_total": "0.0"}
    clean = outcome(check_feature_snapshot(con, bank_features[MID_MONTH_END], bank["staged"], MID_MONTH_END), "constant_features")
    assert clean.passed, clean.metadata


def test_every_check_the_domain_runs_has_an_asset_check_spec_and_vice_versa(bank, bank_features, con):
    """The asset's check specs are built from the domain's declarations: the same names, blocking
    flags and descriptions as the outcomes `check_feature_snapshot` produces. They were once written
    out twice and had drifted apart (the freshness spec hard-coded the 3-day lag)."""
    import dagster as dg

    from tagml.features.quality import FEATURE_CHECKS
    from tagml.orchestration.feature_assets import build_customer_features_asset

    asset = build_customer_features_asset(dg.DailyPartitionsDefinition(start_date="2026-01-01"))
    specs = {spec.name: spec for spec in asset.check_specs}
    outcomes = check_feature_snapshot(con, bank_features[MID_MONTH_END], bank["staged"], MID_MONTH_END)
    assert [o.name for o in outcomes] == [c.name for c in FEATURE_CHECKS]
    assert set(specs) == {o.name for o in outcomes}
    for o in outcomes:
        assert specs[o.name].blocking == o.blocking, o.name
        assert o.description.startswith(specs[o.name].description), o.name
    assert str(MAX_DATA_LAG_DAYS) in specs["freshness"].description


def test_history_check_reads_balances_at_the_same_month_end_as_the_features(early_bank, con, tmp_path):
    """2024-04-29 reads the balances of 2024-03-31 (the latest month end before it), so the 3-month
    change needs 2023-12-31, which the bank does not have; the day after reads 2024-04-30 and has
    its history. The quality check and the features must pick the same month end (one rule,
    `balance_month_end_sql`), or the check blocks a sound partition or excuses an empty feature."""
    for day, available in ((date(2024, 4, 29), False), (date(2024, 4, 30), True)):
        snapshot = build_feature_snapshot(con, early_bank, day, tmp_path / f"{day}.parquet")
        nulls = outcome(snapshot.checks, "null_rates")
        all_null = nulls.metadata["highest_null_rates"].get("aum_growth_3m") == 1.0
        assert nulls.passed, nulls.description
        assert all_null is not available and ("aum_growth_3m" in nulls.metadata["not_yet_available"]) is not available, day
