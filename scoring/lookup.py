"""One customer's current tags as plain data: values, probabilities, reasons and, for model tags,
the lineage of the model version that produced them (what a CRM lookup, `tagml tags` and an API return).

Only published tags are shown (the caller passes them, from the governance store's tag lifecycle);
the others are named under `hidden`, without their values."""

import json
import math
from collections.abc import Callable, Collection
from datetime import date
from typing import Any

import duckdb

from tagml.scoring.store import TagStore

# what each tag row of the lookup carries, besides its probabilities, reasons and lineage
TAG_FIELDS = (
    "tag",
    "value",
    "probability",
    "source",
    "producer",
    "model_version",
    "observed_value",
    "inferred_value",
    "observed_mismatch",
    "assessment",
    "assessed_on",
    "inferred_as_of",
)

Lineage = Callable[[str, str], dict[str, Any]]  # (tag, model version) -> where that version came from


def is_present(value: object) -> bool:
    """Not None/NA/NaN and, for containers, not empty."""
    import pandas as pd

    if value is None or value is pd.NA:
        return False
    if isinstance(value, float):
        return not math.isnan(value)
    try:
        return len(value) > 0  # type: ignore[arg-type]
    except TypeError:
        return True


def customer_tags(
    con: duckdb.DuckDBPyConnection,
    store: TagStore,
    customer_id: str,
    as_of: date | None = None,
    lineage: Lineage | None = None,
    *,
    published: Collection[str],
) -> dict[str, Any]:
    """The customer's published tags in the partition of `as_of` (default: the newest), JSON-ready; the
    names of the unpublished ones under `hidden`. `lineage` is asked once per model-tag row (None: no lineage)."""
    frame = store.customer_tags(con, customer_id, as_of)
    hidden = sorted(set(frame["tag"]) - set(published))
    shown = frame[frame["tag"].isin(list(published))].reset_index(drop=True)
    # through JSON: NaN -> null, timestamps ISO, numpy scalars -> plain numbers
    rows = json.loads(shown.to_json(orient="records", date_format="iso", default_handler=str))
    tags = []
    for record, row in zip(rows, shown.itertuples()):
        entry = {k: record.get(k) for k in TAG_FIELDS}
        for day in ("assessed_on", "inferred_as_of"):  # dates, not pandas' midnight timestamps
            entry[day] = entry[day][:10] if entry[day] else None
        entry["probabilities"] = dict(row.probabilities) if is_present(row.probabilities) else None
        entry["reasons"] = list(row.reasons) if is_present(row.reasons) else []
        if lineage is not None and is_present(row.model_version):
            entry["lineage"] = lineage(row.tag, row.model_version)
        tags.append(entry)
    return {
        "customer_id": customer_id,
        "as_of": f"{frame['as_of'].iloc[0]:%Y-%m-%d}",
        "scored_at": f"{frame['scored_at'].iloc[0]:%Y-%m-%d %H:%M}",
        "tags": tags,
        "hidden": hidden,
    }
