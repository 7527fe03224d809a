"""The synthetic bank: deterministic, exactly the contract, plausible, causally structured, and its
drift scenarios move the data the way they claim to.

Tolerances are deliberately loose where the quantity is random (3,000 customers) and tight only
where the generator promises an identity (known_date = label_date + 90 days, probabilities sum to 1).
"""

import hashlib
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import BANK, WINDOW_END, WINDOW_START, raw_glob, stage_all

import tagml.features.synthetic.generate as generate_module
from tagml.core.storage import sql_literal
from tagml.features.contract import RAW_TABLES
from tagml.features.synthetic import (
    CHURN_CLASSES,
    LIFE_STAGES,
    RISK_CLASSES,
    BankConfig,
    generate_bank,
)

TABLES = [spec.name for spec in RAW_TABLES]
CLASSES = {"risk_appetite": RISK_CLASSES, "life_stage": LIFE_STAGES, "churn_90d": CHURN_CLASSES}
DRIFT_MONTH = "2026-08"  # the default drift month for 12 months ending 2026-10 (three before the end)


def read_all(out: Path) -> dict[str, "pa.Table"]:
    tables = {name: pq.read_table(out / name) for name in TABLES}
    tables.update({f"_truth/{p.stem}": pq.read_table(p) for p in sorted((out / "_truth").glob("*.parquet"))})
    return tables


def src(raw: Path, table: str) -> str:
    return f"read_parquet({sql_literal(raw_glob(raw, table))})"


def one(con, sql: str):
    return con.execute(sql).fetchone()


# ---- determinism ----------------------------------------------------------------------------


def test_same_seed_same_bank_different_seed_different_bank(tmp_path):
    config = BankConfig(customers=400, months=12, seed=11)
    first = generate_bank(config, tmp_path / "a")
    second = generate_bank(config, tmp_path / "b")
    other = generate_bank(BankConfig(customers=400, months=12, seed=12), tmp_path / "c")
    a, b, c = read_all(tmp_path / "a"), read_all(tmp_path / "b"), read_all(tmp_path / "c")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].equals(b[name]), f"{name} differs between two generations with the same seed"
    assert first == second
    assert first["rows"] != other["rows"] or not a["transactions"].equals(c["transactions"])
    assert not a["customers"].equals(c["customers"])
    assert not a["balances"].equals(c["balances"])


# Digests of every generated table (Arrow IPC bytes) for two small multi-chunk banks, recorded from
# the generator before it was split into a package (the shelf and consents later): a refactor must leave every draw where it was.
TRUTH_DECIMALS = 9  # the hidden truth tables' floats, digested rounded (see table_digest)
KNOWN_BANKS = {
    "market_shock": (
        BankConfig(customers=400, months=8, seed=21, drift="market_shock"),
        {
            "_truth/churn_90d": "22f0783fae60083b",
            "_truth/life_stage": "6c5535f4ce33ee20",
            "_truth/risk_appetite": "56833f260daae757",
            "balances": "d7e57ce7b31dddd6",
            "customers": "54f37226b5b82e06",
            "digital_events": "e4ef8283e96e0b6f",
            "loans": "ea43d4a2b8bc3ada",
            "tag_labels": "53031a75be0b51bc",
            "transactions": "f12fd90d06a4e6c9",
            # added with the product shelf and consents, from generators of their own
            "consents": "12b6325fa640b99b",
            "holdings": "b0767c70c3050db5",
            "products": "b1ae56ced85d5aee",
        },
    ),
    "youth_campaign": (
        BankConfig(customers=300, months=8, seed=22, drift="youth_campaign"),
        {
            "_truth/churn_90d": "0961abf1699a3bd9",
            "_truth/life_stage": "87d200f82e701f9e",
            "_truth/risk_appetite": "0095fe27dbe538a9",
            "balances": "041cd584f85c5e0f",
            "customers": "368da3bb6645d2fb",
            "digital_events": "3a2e4afacdc3d549",
            "loans": "ce6c93449db35f95",
            "tag_labels": "2a35fcb568568e72",
            "transactions": "3128de9a93b34a9c",
            "consents": "e62ff8674c149768",
            "holdings": "6a67024e4091a804",
            "products": "b1ae56ced85d5aee",
        },
    ),
}


def table_digest(table: pa.Table, decimals: int | None = None) -> str:
    if decimals is not None:
        # latent probabilities go through np.exp & co., whose last bit depends on the CPU's vector unit:
        # rounded, the digest holds the generator to every draw without holding it to one machine's libm
        for i, field in enumerate(table.schema):
            if pa.types.is_floating(field.type):
                table = table.set_column(i, field, pc.round(table.column(i), decimals))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:16]


@pytest.mark.parametrize("scenario", list(KNOWN_BANKS))
def test_a_seed_still_generates_the_known_bank(scenario, tmp_path, monkeypatch):
    monkeypatch.setattr(generate_module, "CHUNK_SIZE", 150)  # several chunks, each seeded on its own
    config, expected = KNOWN_BANKS[scenario]
    generate_bank(config, tmp_path)
    assert len(list((tmp_path / "customers").glob("*.parquet"))) == -(-config.customers // 150)
    got = {name: table_digest(table, TRUTH_DECIMALS if name.startswith("_truth/") else None) for name, table in read_all(tmp_path).items()}
    assert got == expected


def test_regenerating_into_the_same_directory_leaves_no_stale_parts(tmp_path):
    out = tmp_path / "bank"
    generate_bank(BankConfig(customers=300, months=6, seed=3), out)
    summary = generate_bank(BankConfig(customers=200, months=6, seed=4), out)
    for name in TABLES:
        assert pq.read_table(out / name).num_rows == summary["rows"][name]


# ---- exactly the contract ---------------------------------------------------------------------


@pytest.mark.parametrize("spec", RAW_TABLES, ids=TABLES)
def test_writes_exactly_the_contract(spec, bank):
    schema = pq.read_schema(next((bank["raw"] / spec.name).glob("*.parquet")))
    assert schema.names == [c.name for c in spec.columns]
    staged = bank["staged_tables"][spec.name]  # every table passed validate_and_stage in the fixture
    assert staged.rows == bank["summary"]["rows"][spec.name] > 0
    assert staged.ignored_columns == ()


def test_summary_matches_the_files(bank, con):
    summary = bank["summary"]
    assert summary["rows"]["customers"] == BANK.customers
    for name in TABLES:
        assert one(con, f"SELECT count(*) FROM {src(bank['raw'], name)}")[0] == summary["rows"][name]
    for tag, n in summary["label_counts"].items():
        assert one(con, f"SELECT count(*) FROM {src(bank['raw'], 'tag_labels')} WHERE tag = {sql_literal(tag)}")[0] == n
        assert 0 < summary["bayes_accuracy"][tag] <= 1


def test_restaging_the_generated_bank_is_idempotent(bank, con, tmp_path):
    """Staging the same raw bank twice gives identical staged tables."""
    again = stage_all(con, bank["raw"], tmp_path / "staged")
    for name, result in again.items():
        first = con.execute(f"SELECT * FROM read_parquet({sql_literal(bank['staged_tables'][name].path)}) ORDER BY ALL").fetchall()
        assert con.execute(f"SELECT * FROM read_parquet({sql_literal(result.path)}) ORDER BY ALL").fetchall() == first


# ---- plausible marginals --------------------------------------------------------------------


def test_customer_ages_are_plausible(bank, con):
    lo, med, hi = one(
        con,
        f"SELECT min(a), median(a), max(a) FROM (SELECT date_diff('day', birth_date, DATE {sql_literal(WINDOW_END)}) / 365.25 AS a "
        f"FROM {src(bank['raw'], 'customers')})",
    )
    assert lo >= 18 and hi < 91  # ages 18-90 at the end of the window (birthdays spread over a year)
    assert 35 <= med <= 50
    n_bad = one(con, f"SELECT count(*) FROM {src(bank['raw'], 'customers')} WHERE onboarding_date > DATE {sql_literal(WINDOW_END)}")[0]
    assert n_bad == 0


def test_label_shares(bank, con):
    n = BANK.customers
    labelled = dict(con.execute(f"SELECT tag, count(DISTINCT customer_id) FROM {src(bank['raw'], 'tag_labels')} GROUP BY tag").fetchall())
    assert 0.15 <= labelled["risk_appetite"] / n <= 0.35
    assert 0.02 <= labelled["life_stage"] / n < labelled["risk_appetite"] / n
    churned = one(con, f"SELECT avg((label = 'churned')::INT) FROM {src(bank['raw'], 'tag_labels')} WHERE tag = 'churn_90d'")[0]
    assert 0.01 <= churned <= 0.15


@pytest.mark.parametrize("tag", list(CLASSES))
def test_every_class_present_and_none_dominates(tag, bank, con):
    shares = dict(
        con.execute(
            f"SELECT label, count(*) / sum(count(*)) OVER () FROM {src(bank['raw'], 'tag_labels')} WHERE tag = {sql_literal(tag)} GROUP BY label"
        ).fetchall()
    )
    assert set(shares) == set(CLASSES[tag])
    if tag != "churn_90d":  # churn is rare by nature; its share is checked in test_label_shares
        assert max(shares.values()) <= 0.6, shares


def test_labels_are_dated_inside_the_window_and_after_onboarding(bank, con):
    labels, customers = src(bank["raw"], "tag_labels"), src(bank["raw"], "customers")
    lo, hi, klo, khi = one(con, f"SELECT min(label_date), max(label_date), min(known_date), max(known_date) FROM {labels}")
    assert WINDOW_START <= lo and hi <= WINDOW_END
    assert WINDOW_START <= klo and khi <= WINDOW_END
    before_onboarding = one(con, f"SELECT count(*) FROM {labels} l JOIN {customers} c USING (customer_id) WHERE l.label_date < c.onboarding_date")[0]
    assert before_onboarding == 0
    # questionnaires and KYC are known when recorded; churn outcomes 90 days after the observation date
    assert one(con, f"SELECT count(*) FROM {labels} WHERE tag <> 'churn_90d' AND known_date <> label_date")[0] == 0
    assert one(con, f"SELECT count(*) FROM {labels} WHERE tag = 'churn_90d' AND known_date <> label_date + INTERVAL 90 DAY")[0] == 0
    assert one(con, f"SELECT count(*) FROM {labels} WHERE tag = 'churn_90d' AND label_date <> last_day(label_date)")[0] == 0


@pytest.mark.parametrize("tag", list(CLASSES))
def test_truth_probabilities(tag, bank, con):
    truth_path = bank["raw"] / "_truth" / f"{tag}.parquet"
    truth = pq.read_table(truth_path)
    p_cols = [f"p_{c}" for c in CLASSES[tag]]
    assert truth.column_names == ["customer_id", "label_date", *p_cols]
    probs = np.stack([truth.column(c).to_numpy() for c in p_cols], axis=1)
    assert np.all(probs >= 0) and np.all(probs <= 1)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    # one truth row per label, on the same (customer, label date)
    labels = src(bank["raw"], "tag_labels")
    t = f"read_parquet({sql_literal(truth_path)})"
    n_labels = one(con, f"SELECT count(*) FROM {labels} WHERE tag = {sql_literal(tag)}")[0]
    assert truth.num_rows == n_labels
    assert one(con, f"SELECT count(*) FROM (SELECT DISTINCT customer_id, label_date FROM {t})")[0] == n_labels
    joined = one(con, f"SELECT count(*) FROM {labels} l JOIN {t} USING (customer_id, label_date) WHERE l.tag = {sql_literal(tag)}")[0]
    assert joined == n_labels
    # the manifest's Bayes accuracy is E[max_k p_k]
    assert bank["summary"]["bayes_accuracy"][tag] == pytest.approx(probs.max(axis=1).mean())


def test_labels_agree_with_their_truth(bank, con):
    """Drawn labels follow the written probabilities: the labelled class is the most likely one far
    more often than chance, and for churn the churned have a higher mean p_churned."""
    labels = src(bank["raw"], "tag_labels")
    truth = f"read_parquet({sql_literal(bank['raw'] / '_truth' / 'risk_appetite.parquet')})"
    cols = ", ".join(f"p_{c}" for c in RISK_CLASSES)
    hit = one(
        con,
        f"SELECT avg((l.label = 'C' || (list_position([{cols}], greatest({cols})))::VARCHAR)::INT) "
        f"FROM {labels} l JOIN {truth} USING (customer_id, label_date) WHERE l.tag = 'risk_appetite'",
    )[0]
    assert hit > 0.4  # five classes: chance is 0.2; the Bayes accuracy is about 0.6
    churn = f"read_parquet({sql_literal(bank['raw'] / '_truth' / 'churn_90d.parquet')})"
    p_churned, p_retained = (
        one(
            con, f"SELECT avg(p_churned) FROM {labels} l JOIN {churn} USING (customer_id, label_date) WHERE l.tag = 'churn_90d' AND l.label = {sql_literal(k)}"
        )[0]
        for k in ("churned", "retained")
    )
    assert p_churned > 2 * p_retained


# ---- causal structure -----------------------------------------------------------------------


def test_risk_appetite_drives_risky_holdings(bank, con):
    shares = dict(
        con.execute(
            f"""
            WITH m AS (
              SELECT customer_id, month_end,
                sum(balance) FILTER (WHERE product IN ('mutual_fund', 'equity')) AS risky,
                sum(balance) FILTER (WHERE product <> 'credit_card') AS aum
              FROM {src(bank["raw"], "balances")} GROUP BY ALL
            ), c AS (SELECT customer_id, avg(coalesce(risky, 0) / aum) AS share FROM m WHERE aum > 0 GROUP BY ALL)
            SELECT l.label, avg(coalesce(c.share, 0))
            FROM {src(bank["raw"], "tag_labels")} l LEFT JOIN c USING (customer_id)
            WHERE l.tag = 'risk_appetite' GROUP BY l.label
            """
        ).fetchall()
    )
    assert shares["C5"] > shares["C1"] + 0.1
    assert shares["C1"] < shares["C3"] < shares["C5"]


def test_life_stage_drives_spending(bank, con):
    spend = dict(
        con.execute(
            f"""
            WITH s AS (
              SELECT customer_id,
                sum(amount) FILTER (WHERE category = 'childcare') AS childcare,
                count(*) FILTER (WHERE category = 'pension') AS pensions
              FROM {src(bank["raw"], "transactions")} GROUP BY ALL
            )
            SELECT l.label, [avg(coalesce(childcare, 0)), avg(coalesce(pensions, 0))]
            FROM {src(bank["raw"], "tag_labels")} l LEFT JOIN s USING (customer_id)
            WHERE l.tag = 'life_stage' GROUP BY l.label
            """
        ).fetchall()
    )
    assert spend["young_family"][0] > 5 * max(spend["single"][0], 100)
    assert spend["retired"][1] > spend["single"][1]


# ---- drift scenarios ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def drifted(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("drift")
    banks = {}
    for scenario in ("market_shock", "youth_campaign"):
        config = BankConfig(customers=BANK.customers, months=BANK.months, seed=BANK.seed, drift=scenario, drift_month=DRIFT_MONTH)
        summary = generate_bank(config, out / scenario)
        assert summary["drift"]["scenario"] == scenario
        banks[scenario] = out / scenario
    return banks


def test_drifted_banks_still_satisfy_the_contract(drifted, con, tmp_path):
    for scenario, raw in drifted.items():
        staged = stage_all(con, raw, tmp_path / scenario)
        assert all(result.rows > 0 for result in staged.values())


def _monthly(con, raw: Path, sql_value: str, table: str, month_expr: str, where: str) -> dict[date, float]:
    rows = con.execute(f"SELECT {month_expr} AS m, {sql_value} FROM {src(raw, table)} WHERE {where} GROUP BY m").fetchall()
    return {(m.date() if hasattr(m, "date") else m): v for m, v in rows}


def test_market_shock_lowers_equity_and_triggers_selling(bank, drifted, con):
    shock = date(2026, 8, 31)
    before = date(2026, 7, 31)
    equity = _monthly(con, drifted["market_shock"], "sum(balance)", "balances", "month_end", "product = 'equity'")
    base_equity = _monthly(con, bank["raw"], "sum(balance)", "balances", "month_end", "product = 'equity'")
    assert equity[shock] < 0.95 * equity[before], "equity balances must fall in the shock month"
    assert equity[shock] < base_equity[shock]
    assert equity[before] == pytest.approx(base_equity[before])  # nothing changes before the shock
    month = "last_day(txn_ts::DATE)"
    sells = _monthly(con, drifted["market_shock"], "count(*)", "transactions", month, "category = 'investment_sell'")
    base_sells = _monthly(con, bank["raw"], "count(*)", "transactions", month, "category = 'investment_sell'")
    assert sells[shock] > 1.5 * sells[before]
    assert sells[shock] > 1.5 * base_sells[shock]
    views = _monthly(con, drifted["market_shock"], "count(*)", "digital_events", "last_day(event_ts::DATE)", "event_type IN ('view_fund', 'view_equity')")
    assert views[shock] > 1.5 * views[before]


def test_youth_campaign_onboards_young_customers(bank, drifted, con):
    def young_recent(raw: Path) -> tuple[int, float]:
        return one(
            con,
            f"SELECT count(*) FILTER (WHERE date_diff('day', birth_date, onboarding_date) / 365.25 < 32), "
            f"avg((date_diff('day', birth_date, onboarding_date) / 365.25 < 32)::INT) "
            f"FROM {src(raw, 'customers')} WHERE onboarding_date >= DATE '{DRIFT_MONTH}-01'",
        )

    n_young, share_young = young_recent(drifted["youth_campaign"])
    n_base, share_base = young_recent(bank["raw"])
    assert share_young > share_base
    assert n_young > 2 * n_base
    campaign = one(con, f"SELECT count(*) FROM {src(drifted['youth_campaign'], 'customers')} WHERE acquisition_channel = 'campaign'")[0]
    assert campaign > 0.05 * BANK.customers
    before = one(
        con,
        f"SELECT count(*) FROM {src(drifted['youth_campaign'], 'customers')} WHERE acquisition_channel = 'campaign' AND onboarding_date < DATE '{DRIFT_MONTH}-01'",
    )[0]
    assert before == 0


def test_drift_month_outside_the_window_is_rejected(tmp_path):
    with pytest.raises(ValueError):
        generate_bank(BankConfig(customers=10, months=12, seed=1, drift="market_shock", drift_month="2030-01"), tmp_path / "x")
    with pytest.raises(ValueError):
        BankConfig(drift="alien_invasion")


def test_one_day_past_window_has_no_data(bank, con):
    after = WINDOW_END + timedelta(days=1)
    for table, col in (("transactions", "txn_ts"), ("digital_events", "event_ts"), ("balances", "month_end"), ("loans", "open_date")):
        assert one(con, f"SELECT count(*) FROM {src(bank['raw'], table)} WHERE {col} >= DATE {sql_literal(after)}")[0] == 0, table
