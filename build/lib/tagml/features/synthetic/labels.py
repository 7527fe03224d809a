"""The labels a bank has for some of its customers, drawn *last* from probabilities that depend only
on the latents, and those true probabilities (`_truth/<tag>.parquet`): a risk questionnaire, the
KYC / relationship-manager life stage and churn in the next three months."""

import numpy as np
import pyarrow as pa

from tagml.features.synthetic.config import CHURN_CLASSES, CHURN_HORIZON_MONTHS, LIFE_STAGES, RISK_CLASSES, days, life_stage_of, sigmoid
from tagml.features.synthetic.customers import Chunk

RISK_CUTPOINTS = np.array([-1.3, -0.45, 0.45, 1.3])
RISK_LABEL_SCALE = 0.4  # questionnaires are noisy self-reports
LIFE_STAGE_RECORD_ERROR = 0.08
LABEL_COLUMNS = ("customer_id", "tag", "label", "label_date", "known_date", "source")


class _Labels:
    """The tag_labels rows of a chunk, and the true class probabilities behind them."""

    def __init__(self, c: Chunk):
        self.c = c
        self.cols: dict[str, list] = {k: [] for k in LABEL_COLUMNS}
        self.truth: dict[str, pa.Table] = {}

    def add(
        self, tag: str, idx: np.ndarray, labels: np.ndarray, label_day: np.ndarray, known_day: np.ndarray, source, probs: np.ndarray, classes: tuple
    ) -> None:
        ids = self.c.ids.take(pa.array(idx))
        self.cols["customer_id"].append(ids)
        self.cols["tag"].append(pa.array(np.full(idx.size, tag)))
        self.cols["label"].append(pa.array(labels))
        self.cols["label_date"].append(pa.array(label_day.astype("datetime64[D]")))
        self.cols["known_date"].append(pa.array(known_day.astype("datetime64[D]")))
        self.cols["source"].append(pa.array(np.asarray(source, dtype=object), pa.string()))
        table = {"customer_id": ids, "label_date": pa.array(label_day.astype("datetime64[D]"))}
        table.update({f"p_{cls}": pa.array(probs[:, k]) for k, cls in enumerate(classes)})
        self.truth[tag] = pa.table(table)

    def table(self) -> pa.Table:
        return pa.table({k: pa.concat_arrays(v) if v else pa.array([]) for k, v in self.cols.items()})


def labels_table(c: Chunk) -> tuple[pa.Table, dict[str, pa.Table]]:
    """The chunk's tag_labels table and, per tag, the true probabilities of each labelled row."""
    out = _Labels(c)
    _risk_questionnaires(c, out)
    _recorded_life_stages(c, out)
    _churn_outcomes(c, out)
    return out.table(), out.truth


def _label_days(c: Chunk, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A label day for each customer who is a customer long enough to be labelled (the others dropped)."""
    end_days = days(c.ends)
    first_label_month = min(3, c.config.months - 1)
    lo = np.maximum(end_days[first_label_month - 1] + 1, c.onboard_day[idx] + 30)
    hi = np.minimum(end_days[-1], c.churn_day[idx] - 1)
    ok = hi > lo
    return idx[ok], (lo[ok] + c.rng.random(ok.sum()) * (hi[ok] - lo[ok])).astype(np.int64)


def _risk_questionnaires(c: Chunk, out: _Labels) -> None:
    """Mandatory before buying investment products, so mostly investors answer it; ordinal-logit
    around the latent appetite."""
    rng = c.rng
    invests = c.aum > 20_000
    asked = np.nonzero(rng.random(c.n) < np.where(invests, 0.38, 0.05))[0]
    idx, day = _label_days(c, asked)
    cdf = sigmoid((RISK_CUTPOINTS[None, :] - c.risk[idx, None]) / RISK_LABEL_SCALE)
    cdf = np.concatenate([np.zeros((idx.size, 1)), cdf, np.ones((idx.size, 1))], axis=1)
    probs = np.diff(cdf, axis=1)
    drawn = (rng.random(idx.size)[:, None] > np.cumsum(probs, axis=1)).sum(axis=1)
    labels = np.array(RISK_CLASSES)[np.minimum(drawn, 4)]
    out.add("risk_appetite", idx, labels, day, day, np.full(idx.size, "risk_questionnaire"), probs, RISK_CLASSES)


def _recorded_life_stages(c: Chunk, out: _Labels) -> None:
    """Life stage from KYC / relationship managers, with recording errors."""
    rng = c.rng
    recorded = np.nonzero(rng.random(c.n) < 0.18)[0]
    idx, day = _label_days(c, recorded)
    years_before_end = (c.end_day - day) / 365.25
    stage = life_stage_of(c.age_end[idx] - years_before_end, c.married[idx], c.n_kids[idx], c.youngest_end[idx] - years_before_end)
    K = len(LIFE_STAGES)
    probs = np.full((idx.size, K), LIFE_STAGE_RECORD_ERROR / (K - 1))
    probs[np.arange(idx.size), stage] = 1 - LIFE_STAGE_RECORD_ERROR
    drawn = (rng.random(idx.size)[:, None] > np.cumsum(probs, axis=1)).sum(axis=1)
    source = np.where(rng.random(idx.size) < 0.7, "kyc", "relationship_manager")
    out.add("life_stage", idx, np.array(LIFE_STAGES)[np.minimum(drawn, K - 1)], day, day, source, probs, LIFE_STAGES)


def _churn_outcomes(c: Chunk, out: _Labels) -> None:
    """Churn in the next three months, observed at quarter ends, known 90 days later."""
    M, end_days = c.config.months, days(c.ends)
    obs_months = [t for t in range(M - 1 - CHURN_HORIZON_MONTHS, 0, -CHURN_HORIZON_MONTHS)]
    if not obs_months:
        return
    all_idx, all_day, all_p, all_lab = [], [], [], []
    for t in obs_months:
        alive = np.nonzero((c.onboard_month <= t) & (c.churn_month > t) & (c.onboard_day <= end_days[t]))[0]
        h = c.hazard[alive, t + 1 : t + 1 + CHURN_HORIZON_MONTHS]
        p = 1 - np.prod(1 - h, axis=1)
        churned = c.churn_month[alive] <= t + CHURN_HORIZON_MONTHS
        all_idx.append(alive), all_p.append(p), all_lab.append(churned)
        all_day.append(np.full(alive.size, end_days[t]))
    idx, day, p, lab = (np.concatenate(x) for x in (all_idx, all_day, all_p, all_lab))
    labels = np.array(CHURN_CLASSES)[lab.astype(int)]
    out.add("churn_90d", idx, labels, day, day + 90, np.full(idx.size, "observed_outcome"), np.stack([1 - p, p], axis=1), CHURN_CLASSES)
