"""Fairness slices a bank reports: on the test set, the promotion metric, accuracy and the share predicted per
class by gender and by age band, whether or not those attributes are features (risk_appetite excludes gender).

Gender and birth date are joined from the staged customers by customer id at evaluation time only: they never
become features, and only aggregates (groups of at least MIN_GROUP_ROWS rows) leave this module. The promotion
gate does not read them: thresholds for a difference between groups are the bank's to set.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tagml.core.storage import connect, sql_literal, staged_path
from tagml.features.delivery import current_generation
from tagml.training.evaluate import UNSAFE_METRIC_CHARACTERS, metric_value, slice_score
from tagml.training.inference import decide

ATTRIBUTES = ("gender", "age_band")
# age at the label's feature date, [low, high) in years
AGE_BANDS = ((0, 18, "under_18"), (18, 30, "18-29"), (30, 45, "30-44"), (45, 60, "45-59"), (60, 200, "60+"))
MIN_GROUP_ROWS = 30  # a smaller group is reported as "too few" (no numbers: too noisy, and close to identifying)
MIN_ID_MATCH = 0.9  # share of test customers found in the staged customers for a bring-your-own table's ids to count as theirs
MISSING = "missing"
TOO_FEW, MEASURED = "too few", "measured"


@dataclass(frozen=True)
class FairnessReport:
    available: bool
    note: str  # what the groups were measured on, or why they are not available
    metric: str
    classes: tuple[str, ...]
    rows: tuple[dict[str, Any], ...] = field(default_factory=tuple)  # attribute, group, rows, status[, metric, accuracy, share_<class>]

    def metrics(self) -> dict[str, float]:
        """The measured groups as MLflow metrics: fairness_<attribute>_<group>_<measure>."""
        out = {}
        for row in self.rows:
            if row["status"] != MEASURED:
                continue
            prefix = UNSAFE_METRIC_CHARACTERS.sub("_", f"fairness_{row['attribute']}_{row['group'].replace('+', 'plus')}")
            out[f"{prefix}_rows"] = float(row["rows"])
            for key in (self.metric, "accuracy", *(f"share_{c}" for c in self.classes)):
                out[f"{prefix}_{key}"] = row[key]
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"available": self.available, "note": self.note, "metric": self.metric, "classes": list(self.classes), "rows": list(self.rows)}


def load_demographics(staged_dir: Path) -> pd.DataFrame | None:
    """customer_id, gender and birth_date of the staged customers (PII-free by contract), or None when not staged."""
    path = staged_path(current_generation(staged_dir), "customers")
    if not path.exists():
        return None
    con = connect(threads=1, memory_limit="1GB")
    try:
        return con.execute(f"SELECT customer_id::VARCHAR AS customer_id, gender, birth_date FROM read_parquet({sql_literal(path)})").df()
    finally:
        con.close()


def age_band(birth_date: pd.Series, as_of: pd.Series) -> pd.Series:
    """The age band of each row at its as_of (MISSING without a birth date)."""
    years = (pd.to_datetime(as_of) - pd.to_datetime(birth_date)).dt.days / 365.25
    band = pd.Series(MISSING, index=birth_date.index, dtype=object)
    for low, high, name in AGE_BANDS:
        band[(years >= low) & (years < high)] = name
    return band


def fairness_slices(
    test: pd.DataFrame,
    y: np.ndarray,
    proba: np.ndarray,
    classes: tuple[str, ...],
    metric: str,
    threshold: float | None,
    demographics: pd.DataFrame | None,
) -> FairnessReport:
    """Per gender and age band of the test rows (`test`: customer_id and as_of, in the order of `y` and `proba`)."""
    if demographics is None:
        return FairnessReport(False, "not available: no staged customers to take gender and birth date from", metric, classes)
    ids = test["customer_id"].astype(str).reset_index(drop=True)
    joined = pd.DataFrame({"customer_id": ids, "as_of": test["as_of"].to_numpy()}).merge(
        demographics.drop_duplicates("customer_id"), on="customer_id", how="left", indicator=True
    )
    found = float((joined["_merge"] == "both").mean()) if len(joined) else 0.0
    if found < MIN_ID_MATCH:
        return FairnessReport(False, f"not available: {found:.0%} of the test customers are staged customers (ids do not match)", metric, classes)
    groups = {"gender": joined["gender"].fillna(MISSING).astype(str), "age_band": age_band(joined["birth_date"], joined["as_of"])}
    predicted = decide(proba, threshold)
    rows = []
    for attribute in ATTRIBUTES:
        values = groups[attribute].to_numpy()
        order = [name for _, _, name in AGE_BANDS] + [MISSING] if attribute == "age_band" else sorted(set(values))
        for group in (g for g in order if (values == g).any()):
            mask = values == group
            row: dict[str, Any] = {"attribute": attribute, "group": group, "rows": int(mask.sum())}
            if mask.sum() < MIN_GROUP_ROWS:
                rows.append({**row, "status": TOO_FEW})
                continue
            shares = np.bincount(predicted[mask], minlength=len(classes)) / mask.sum()
            rows.append(
                {
                    **row,
                    "status": MEASURED,
                    metric: slice_score(y[mask], proba[mask], metric, len(classes), threshold),
                    "accuracy": metric_value(y[mask], proba[mask], len(classes), "accuracy", threshold),
                    **{f"share_{c}": float(s) for c, s in zip(classes, shares)},
                }
            )
    note = f"{len(ids)} test rows; gender and age (at each label's feature date) joined from the staged customers, never features"
    return FairnessReport(True, note, metric, classes, tuple(rows))
