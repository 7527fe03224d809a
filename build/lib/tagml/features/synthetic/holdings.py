"""What the customers of a chunk hold: month-end balances per product (moved by the market and by
each customer's reaction to it) and loans."""

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from tagml.features.contract import PRODUCTS
from tagml.features.synthetic.config import ids, market_index, sigmoid
from tagml.features.synthetic.customers import Chunk

MAX_BUY_THE_DIP = 0.15  # log of the largest extra risky allocation an aggressive customer buys after a fall


@dataclass(frozen=True)
class LoanRows:
    """The chunk's loans as arrays (row i: customer index, kind, open and close day, monthly payment);
    a close day < 0 is a loan still open."""

    customer: np.ndarray
    kind: np.ndarray
    open_day: np.ndarray
    close_day: np.ndarray
    payment: np.ndarray


def balances_table(c: Chunk) -> pa.Table:
    """Month-end balances per product held, the risky part moved by the market and by how each customer reacts to it."""
    rng, n, M = c.rng, c.n, c.config.months
    r = c.risk
    # product -> (base log-weight, sensitivity to risk appetite)
    weights = {
        "current_deposit": (1.2, -0.3),
        "time_deposit": (0.8, -0.9),
        "wealth_management": (0.2, 0.3),
        "mutual_fund": (-0.6, 1.1),
        "equity": (-1.6, 1.7),
        "bond": (-0.9, 0.2),
        "insurance": (-1.2, -0.2),
    }
    logw = np.stack([a + b * r + rng.normal(0, 0.25, n) for a, b in weights.values()], axis=1)
    share = np.exp(logw)
    share /= share.sum(axis=1, keepdims=True)
    # small savers do not spread their money across products
    min_holding = 5_000.0
    holding = share * c.aum[:, None]
    holding[:, 1:] = np.where(holding[:, 1:] < min_holding, 0.0, holding[:, 1:])
    holding[:, 0] = c.aum - holding[:, 1:].sum(axis=1)
    growth = np.exp(rng.normal(0.004, 0.004, n))[:, None] ** (np.arange(M) - (M - 1))[None, :]
    values = holding[:, :, None] * growth[:, None, :] * rng.lognormal(0, 0.04, (n, 7, M))  # (n, P, M)
    risky = np.array([p in ("mutual_fund", "equity") for p in weights])
    mult = _risky_multiplier(c)
    moved = (values[:, risky, :] * (1 - mult[:, None, :])).sum(axis=1)  # > 0 sold, < 0 bought
    values[:, risky, :] *= mult[:, None, :] * market_index(c.config)[None, None, :]
    # de-risked money lands in time deposits; dip purchases are paid from time, then current deposits
    values[:, 1, :] += moved
    short = np.clip(-values[:, 1, :], 0, None)
    values[:, 1, :] += short
    values[:, 0, :] = np.maximum(values[:, 0, :] - short, 0)
    card_limit = np.where(c.has_card, c.card_limit, 0.0)
    util = np.clip(c.card_util[:, None] * rng.lognormal(0, 0.25, (n, M)), 0, 1.0)
    card = card_limit[:, None] * util * c.activity
    values = np.concatenate([values, card[:, None, :]], axis=1)  # (n, 8, M)
    values *= np.where(c.active, 1.0, 0.0)[:, None, :]
    held = values > 1.0
    cust, prod, month = np.nonzero(held)
    return pa.table(
        {
            "customer_id": c.ids.take(pa.array(cust)),
            "month_end": pa.array(c.ends[month]),
            "product": pa.DictionaryArray.from_arrays(pa.array(prod, pa.int32()), pa.array(list(PRODUCTS))).cast(pa.string()),
            "balance": pa.array(np.round(values[cust, prod, month], 2)),
        }
    )


def _risky_multiplier(c: Chunk) -> np.ndarray:
    """How much of the normal risky allocation each customer holds in each month (n, M), before
    market moves (those are applied separately: a price fall is a loss, not a sale)."""
    market = market_index(c.config)
    returns = np.r_[0.0, market[1:] / market[:-1] - 1]
    # After a drawdown conservative customers de-risk and aggressive ones add; the reaction decays.
    reaction = np.zeros((c.n, c.config.months))
    level = np.zeros(c.n)
    for m, ret in enumerate(returns):
        level = level * 0.75
        if ret < -0.03:
            level = level + (-ret * 6) * np.tanh(c.risk - 0.3)
        reaction[:, m] = level
    return np.exp(np.clip(reaction, -2.5, MAX_BUY_THE_DIP))


def loans_table(c: Chunk) -> tuple[pa.Table, LoanRows]:
    """Every loan of the chunk (one credit-card line per card holder), and the rows transactions pay from."""
    rng, n = c.rng, c.n
    kinds = {
        "mortgage": c.has_mortgage,
        "auto": (c.age_end > 25) & (rng.random(n) < 0.1 * sigmoid(c.income_z + 1)),
        "personal": rng.random(n) < 0.06 + 0.06 * (c.income_z < 0),
        "business": (c.occ == 3) & (rng.random(n) < 0.35),
        "credit_card": c.has_card,
    }
    terms = {"mortgage": (240, 360), "auto": (36, 60), "personal": (12, 36), "business": (12, 60)}
    rates = {"mortgage": 0.038, "auto": 0.055, "personal": 0.09, "business": 0.06, "credit_card": 0.18}
    size = {"mortgage": (60, 140), "auto": (6, 18), "personal": (1, 6), "business": (8, 40)}
    parts = []
    for kind, has in kinds.items():
        idx = np.nonzero(has)[0]
        k = idx.size
        if kind == "credit_card":
            principal, term, payment = c.card_limit[idx], np.full(k, -1), np.zeros(k)
        else:
            lo, hi = terms[kind]
            term = rng.integers(lo // 12, hi // 12 + 1, k) * 12
            principal = np.round(c.income[idx] * rng.uniform(*size[kind], k), -2)
            i = rates[kind] / 12
            payment = np.round(principal * i / (1 - (1 + i) ** -term), 2)
        latest_open = c.end_day - 30
        earliest_open = np.maximum(c.onboard_day[idx], c.birth_day[idx] + int(21 * 365.25))
        span = np.maximum(latest_open - earliest_open, 1)
        open_day = earliest_open + (rng.random(k) ** 0.7 * span).astype(np.int64)
        open_day = np.minimum(open_day, latest_open)
        close = np.full(k, -1, np.int64)
        if kind != "credit_card":
            matures = open_day + (term * 30.44).astype(np.int64)
            early = rng.random(k) < 0.15
            close = np.where(early, open_day + (rng.random(k) * (matures - open_day)).astype(np.int64), matures)
            close = np.where(close <= c.end_day, close, -1)
        parts.append((idx, kind, open_day, close, principal, term, rates[kind], payment))
    idx = np.concatenate([p[0] for p in parts])
    kind = np.concatenate([np.full(p[0].size, p[1], dtype=object) for p in parts])
    open_day = np.concatenate([p[2] for p in parts])
    close = np.concatenate([p[3] for p in parts])
    term = np.concatenate([p[5] for p in parts])
    rows = LoanRows(idx, kind, open_day, close, np.concatenate([p[7] for p in parts]))
    number = c.index[idx] * 10 + np.concatenate([np.full(p[0].size, j) for j, p in enumerate(parts)])
    table = pa.table(
        {
            "loan_id": ids("L", number, 11),
            "customer_id": c.ids.take(pa.array(idx)),
            "loan_type": pa.array(kind, pa.string()),
            "open_date": pa.array(open_day.astype("datetime64[D]")),
            "close_date": pa.array(close.astype("datetime64[D]"), mask=close < 0),
            "principal": pa.array(np.concatenate([p[4] for p in parts]).astype(float)),
            "term_months": pa.array(term, mask=term < 0, type=pa.int64()),
            "interest_rate": pa.array(np.concatenate([np.full(p[0].size, p[6]) for p in parts])),
            "monthly_payment": pa.array(np.concatenate([p[7] for p in parts])),
        }
    )
    return table, rows
