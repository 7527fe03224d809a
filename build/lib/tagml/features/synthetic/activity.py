"""What the customers of a chunk do: transactions (salary, spending by life stage, loan payments,
trading that reacts to the market) and digital events (logins, product views, trades)."""

import numpy as np
import pyarrow as pa

from tagml.features.contract import DIGITAL_EVENT_TYPES, TXN_CATEGORIES
from tagml.features.synthetic.config import days, ids
from tagml.features.synthetic.customers import Chunk
from tagml.features.synthetic.holdings import LoanRows

FIXED_PAYMENTS = ("salary", "pension", "mortgage_payment", "loan_payment")
CREDITS = ("salary", "pension", "transfer_in", "investment_sell")
CARD_SPEND = ("groceries", "dining", "shopping", "luxury", "travel", "entertainment")


def transactions_table(c: Chunk, loans: LoanRows) -> pa.Table:
    """Every transaction of the chunk, ordered by customer and time."""
    rng = c.rng
    cats = _category_rates(c, loans)
    names = list(cats)
    fixed = np.isin(names, FIXED_PAYMENTS)
    cust, month, cat = _transaction_slots(c, cats, fixed)
    rows_size = cust.size
    # amounts
    log_mu = np.zeros((c.n, len(names)))
    for j, name in enumerate(names):
        if cats[name][1] is not None:
            log_mu[:, j] = cats[name][1]
    mortgage_pay, other_pay = _monthly_payments(c, loans)
    log_mu[:, names.index("mortgage_payment")] = np.log(np.maximum(mortgage_pay, 1))
    log_mu[:, names.index("loan_payment")] = np.log(np.maximum(other_pay, 1))
    sigma = np.where(fixed, 0.02, 0.7)
    amount = np.round(np.exp(log_mu[cust, cat] + sigma[cat] * rng.standard_normal(rows_size)), 2)
    amount = np.maximum(amount, 1.0)
    ts = _timestamps(c, cust, month)
    credit = np.isin(np.array(names), CREDITS)
    channel = _channels(c, np.array(names), cust, cat)
    order = np.lexsort((ts, cust))
    cust, cat, amount, ts, channel = cust[order], cat[order], amount[order], ts[order], channel[order]
    return pa.table(
        {
            "txn_id": ids("T", c.chunk * 100_000_000 + np.arange(rows_size), 12),
            "customer_id": c.ids.take(pa.array(cust)),
            "txn_ts": pa.array(ts.astype("datetime64[s]")),
            "amount": pa.array(amount),
            "direction": pa.array(np.where(credit[cat], "credit", "debit")),
            "category": pa.array(np.array(names)[cat]),
            "channel": pa.array(np.array(["mobile", "online", "branch", "atm", "pos"])[channel]),
        }
    )


def _category_rates(c: Chunk, loans: LoanRows) -> dict[str, tuple]:
    """Per transaction category: (monthly rate per customer (n,) or (n, M), log-mean amount (n,) or
    None for loan payments, whose amounts come from the loans)."""
    n, M = c.n, c.config.months
    stage = c.stage_end
    single, couple, young, mature, nest, ret = (stage == k for k in range(6))
    inc = np.clip(c.income / 9000, 0.2, 8)
    trade = 0.25 * np.exp(0.9 * c.risk) * (c.aum > 20_000)
    shock_boost = np.ones(M)
    if c.config.drift == "market_shock":
        shock_boost[c.shock : c.shock + 2] = 3.0
    payroll = np.isin(c.occ, [0, 1, 2]) & (c.rng.random(n) < 0.6)
    cats = {
        "salary": (payroll * 1.0, np.log(c.income)),
        "pension": ((c.occ == 4) * 0.9, np.log(c.income * 0.6)),
        "transfer_in": (0.35 + 0.4 * (c.occ == 3), np.log(2000 * inc)),
        "transfer_out": (0.45 + 0.0 * inc, np.log(1800 * inc)),
        "groceries": (0.8 + 0.4 * (young | mature), np.log(180 * inc**0.3)),
        "dining": (0.35 + 0.4 * single + 0.3 * couple, np.log(160 * inc**0.4)),
        "shopping": (0.4 + 0.1 * inc, np.log(350 * inc**0.5)),
        "luxury": (0.02 * inc**1.5, np.log(6000 * inc**0.5)),
        "travel": ((0.06 + 0.12 * (couple | nest | ret) + 0.04 * single - 0.04 * young) * inc**0.5, np.log(3500 * inc**0.5)),
        "entertainment": (0.15 + 0.35 * single + 0.1 * couple, np.log(200 * inc**0.3)),
        "utilities": (0.45 + 0.0 * inc, np.log(300 * inc**0.2)),
        "rent": (c.renter * 0.9, np.log(2500 * inc**0.5)),
        "childcare": (young * 1.2, np.log(1800 * inc**0.4)),
        "education": (mature * 0.9 + young * 0.15, np.log(2500 * inc**0.5)),
        "medical": (0.06 + 0.4 * ret + 0.25 * nest + 0.2 * young, np.log(600 + 0 * inc)),
        "insurance_premium": (0.1 + 0.15 * (young | mature) + 0.2 * (c.risk < -0.5), np.log(1500 * inc**0.5)),
        "mortgage_payment": (_loan_active(c, loans, "mortgage") * 1.0, None),
        "loan_payment": (_loan_active(c, loans, "other") * 1.0, None),
        "investment_buy": (trade[:, None] * shock_boost[None, :] * np.where(c.risk > 0.3, 1.3, 0.7)[:, None], np.log(np.maximum(c.aum, 1e3) * 0.05)),
        "investment_sell": (trade[:, None] * shock_boost[None, :] * np.where(c.risk > 0.3, 0.5, 1.4)[:, None], np.log(np.maximum(c.aum, 1e3) * 0.06)),
        "cash_withdrawal": (0.1 + 0.3 * (c.age_end > 55) + 0.1 * (c.tier >= 3), np.log(800 + 0 * inc)),
    }
    assert set(cats) == set(TXN_CATEGORIES)
    return cats


def _transaction_slots(c: Chunk, cats: dict[str, tuple], fixed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """How many transactions each customer makes of each category in each month, as one row per
    transaction: (customer, month, category) indices."""
    rng, n, M = c.rng, c.n, c.config.months
    names = list(cats)
    rate = np.empty((n, M, len(names)))
    for j, name in enumerate(names):
        base = np.asarray(cats[name][0], dtype=float)
        rate[:, :, j] = base if base.ndim == 2 else base[:, None]
    # fixed payments flow at most once a month while the customer is active, whatever their
    # engagement; everything else scales with engagement
    rate *= np.where(fixed[None, None, :], c.active[:, :, None], c.activity[:, :, None])
    counts = np.where(fixed[None, None, :], rng.random(rate.shape) < rate, rng.poisson(rate))
    flat = counts.ravel()
    rows = np.repeat(np.arange(flat.size), flat)
    cust, rem = np.divmod(rows, M * len(names))
    month, cat = np.divmod(rem, len(names))
    return cust, month, cat


def _timestamps(c: Chunk, cust: np.ndarray, month: np.ndarray) -> np.ndarray:
    """A time within the month (epoch seconds), never before onboarding or after churn."""
    month_start = days(c.starts)[month] * 86_400
    month_end = (days(c.ends)[month] + 1) * 86_400
    lo = np.maximum(month_start, c.onboard_day[cust] * 86_400)
    hi = np.minimum(month_end, (c.churn_day[cust] + 1) * 86_400)
    hi = np.maximum(hi, lo + 1)
    return lo + (c.rng.random(cust.size) * (hi - lo)).astype(np.int64)


def _channels(c: Chunk, names: np.ndarray, cust: np.ndarray, cat: np.ndarray) -> np.ndarray:
    """Digital customers use the app, others the branch / ATM; card spend at POS (index into the channels)."""
    rng = c.rng
    digital = c.digital[cust]
    u = rng.random(cust.size)
    channel = np.where(u < digital * 0.8, 0, np.where(u < digital * 0.8 + 0.1, 1, 2))  # mobile, online, branch
    card_spend = np.isin(names, CARD_SPEND)[cat]
    channel = np.where(card_spend & (rng.random(cust.size) < 0.55), 4, channel)
    channel = np.where(names[cat] == "cash_withdrawal", 3, channel)
    return np.where(np.isin(names[cat], ["salary", "pension"]), 1, channel)


def _loan_active(c: Chunk, loans: LoanRows, kind: str) -> np.ndarray:
    """(n, M) whether the customer has an open loan of this kind (not credit card) in each month."""
    idx, kinds, open_day, close = loans.customer, loans.kind, loans.open_day, loans.close_day
    sel = kinds == kind if kind != "other" else np.isin(kinds, ["auto", "personal", "business"])
    out = np.zeros((c.n, c.config.months), bool)
    end_days = days(c.ends)
    close_eff = np.where(close < 0, np.iinfo(np.int64).max, close)
    active = (open_day[sel, None] <= end_days[None, :]) & (close_eff[sel, None] > end_days[None, :])
    np.logical_or.at(out, idx[sel], active)
    return out


def _monthly_payments(c: Chunk, loans: LoanRows) -> tuple[np.ndarray, np.ndarray]:
    """Each customer's monthly mortgage payment and other loan payments."""
    idx, kinds, payment = loans.customer, loans.kind, loans.payment
    mortgage = np.zeros(c.n)
    other = np.zeros(c.n)
    np.add.at(mortgage, idx[kinds == "mortgage"], payment[kinds == "mortgage"])
    sel = np.isin(kinds, ["auto", "personal", "business"])
    np.add.at(other, idx[sel], payment[sel])
    return mortgage, other


def digital_events_table(c: Chunk) -> pa.Table:
    """Every digital event of the chunk, ordered by customer and time."""
    rng, n, M = c.rng, c.n, c.config.months
    d = c.digital[:, None] * c.activity
    shock = np.ones(M)
    if c.config.drift == "market_shock":
        shock[c.shock : c.shock + 2] = 2.5
    young_or_loan = (c.stage_end == 2) | c.has_mortgage
    rates = {
        "login": d * 1.6,
        "view_deposit": d * 0.15 * np.exp(-0.4 * c.risk)[:, None],
        "view_wealth": d * 0.15 * np.clip(np.log10(np.maximum(c.aum, 10)) - 3, 0.2, 3)[:, None],
        "view_fund": d * 0.22 * np.exp(0.6 * c.risk)[:, None] * shock[None, :],
        "view_equity": d * 0.10 * np.exp(1.0 * c.risk)[:, None] * shock[None, :],
        "view_loan": d * (0.04 + 0.12 * young_or_loan)[:, None],
        "view_insurance": d * (0.04 + 0.1 * np.isin(c.stage_end, [2, 3]))[:, None],
        "trade": d * 0.12 * np.exp(0.9 * c.risk)[:, None] * (c.aum > 20_000)[:, None] * shock[None, :],
        "support_chat": d * 0.03 * (1 + np.clip(c.z[:, :M], 0, None)),
    }
    assert tuple(rates) == DIGITAL_EVENT_TYPES
    lam = np.stack([np.broadcast_to(v, (n, M)) for v in rates.values()], axis=2)
    flat = rng.poisson(lam).ravel()
    rows = np.repeat(np.arange(flat.size), flat)
    cust, rem = np.divmod(rows, M * len(rates))
    month, etype = np.divmod(rem, len(rates))
    lo = np.maximum(days(c.starts)[month] * 86_400, c.onboard_day[cust] * 86_400)
    hi = np.maximum(np.minimum((days(c.ends)[month] + 1) * 86_400, (c.churn_day[cust] + 1) * 86_400), lo + 1)
    ts = lo + (rng.random(rows.size) * (hi - lo)).astype(np.int64)
    web = rng.random(rows.size) < np.clip((c.age_end[cust] - 25) / 80, 0.05, 0.6)
    order = np.lexsort((ts, cust))
    return pa.table(
        {
            "customer_id": c.ids.take(pa.array(cust[order])),
            "event_ts": pa.array(ts[order].astype("datetime64[s]")),
            "event_type": pa.array(np.array(DIGITAL_EVENT_TYPES)[etype[order]]),
            "channel": pa.array(np.where(web[order], "web", "app")),
        }
    )
