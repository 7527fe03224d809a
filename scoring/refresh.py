"""A model tag's catalog `refresh` cadence, honoured night by night.

A tag declared `refresh: weekly` (monthly, quarterly) is inferred once per calendar period, not every
night: on the first night of its period that runs, every customer is inferred from that night's
features; on the other nights of the period, a customer keeps the inference carried from the
previous partition (its probabilities, value and reasons, and `inferred_as_of`, the as_of of the
features it was inferred from). What depends on the night itself is computed tonight for every
customer: the observed labels and their precedence, the assessments' validity, the partition's
as_of. Customers with no carried inference (new customers, or rows of another model version) are
inferred tonight. `daily` tags are inferred every night.

A carried inference is used only when it is exactly what tonight's champion inferred within the
period: the previous partition must be readable and record, for the tag, the same champion version
(and run) and reason settings; its rows must be of that version and inferred on or after the start
of tonight's period. Anything else (a new champion, a corrupt partition, changed reason settings)
infers everyone again and the summary says why. Never raises: carrying only saves work.

Periods are calendar periods (ISO weeks starting Monday, months, quarters), so a night's partition
does not depend on which nights ran before it within the period, only on which inference the period
made first.
"""

from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tagml.scoring.reuse import champion_output_problem, class_ordered_proba
from tagml.training.catalog import TagSpec
from tagml.training.versions import ModelVersionInfo

NO_EARLIER_PARTITION = "no earlier tag partition to carry from: every customer inferred"
CARRY_OFF = "carrying inferences is off (refresh_all, or no earlier partition given): every customer inferred"
DAILY = "refresh: daily: every customer inferred every night"


def refresh_period_start(refresh: str, day: date) -> date:
    """The first day of the calendar period of `refresh` that holds `day` (`day` itself for daily)."""
    if refresh == "daily":
        return day
    if refresh == "weekly":
        return day - timedelta(days=day.weekday())
    if refresh == "monthly":
        return day.replace(day=1)
    if refresh == "quarterly":
        return date(day.year, 3 * ((day.month - 1) // 3) + 1, 1)
    raise ValueError(f"unknown refresh cadence {refresh!r}")


@dataclass
class CarriedInference:
    """The inferences of one tag that tonight carries from an earlier partition, by customer."""

    period_start: date
    source: Path
    index: pd.Index  # customer_id
    proba: np.ndarray  # (customers, classes) in the champion's class order
    reasons: pa.ListArray
    inferred_as_of: pa.Array  # date32
    scored_at: pa.Array  # timestamp[s, UTC]
    carried: int = 0
    inferred: int = 0

    def positions(self, customers: np.ndarray) -> np.ndarray:
        """Per customer of tonight's batch, its row among the carried inferences (-1: inferred tonight)."""
        return self.index.get_indexer(customers)

    def summary(self) -> dict[str, object]:
        return {"carried_rows": self.carried, "inferred_rows": self.inferred, "period_start": self.period_start.isoformat(), "from": str(self.source)}


def _carry_problem(partition: Path, tag: TagSpec, info: ModelVersionInfo, top_reasons: int) -> str | None:
    problem, _ = champion_output_problem(partition, tag.name, info, top_reasons)
    return f"{problem}: every customer inferred" if problem else None


def _load(partition: Path, tag: TagSpec, info: ModelVersionInfo, period_start: date) -> CarriedInference:
    columns = ["customer_id", "as_of", "tag", "probabilities", "reasons", "model_version", "scored_at"]
    has_inferred_as_of = "inferred_as_of" in pq.read_schema(partition).names
    rows = pq.read_table(partition, columns=columns + (["inferred_as_of"] if has_inferred_as_of else []), filters=[("tag", "=", tag.name)])
    # a partition written before inferred_as_of was recorded inferred every row on its own as_of
    inferred_as_of = rows.column("inferred_as_of" if has_inferred_as_of else "as_of").cast(pa.date32())
    keep = pc.and_(
        pc.equal(rows.column("model_version"), pa.scalar(info.version, pa.string())),
        pc.greater_equal(inferred_as_of, pa.scalar(period_start, pa.date32())),
    )
    keep = pc.fill_null(keep, False)
    rows = rows.filter(keep)
    inferred_as_of = inferred_as_of.filter(keep)
    proba = class_ordered_proba(rows.column("probabilities").combine_chunks(), info.classes)
    customers = rows.column("customer_id").to_numpy(zero_copy_only=False).astype(object)
    index = pd.Index(customers)
    if not index.is_unique:
        raise ValueError("it holds a customer twice")
    return CarriedInference(
        period_start,
        partition,
        index,
        proba,
        rows.column("reasons").combine_chunks().cast(pa.list_(pa.string())),
        inferred_as_of.combine_chunks(),
        rows.column("scored_at").cast(pa.timestamp("s", tz="UTC")).combine_chunks(),
    )


def carried_counts(con: duckdb.DuckDBPyConnection, parts: Path) -> tuple[int, int]:
    """(carried, inferred tonight) rows of one model tag's written rows at `parts` (a file or a glob)."""
    carried, inferred = con.execute(
        "SELECT count(*) FILTER (WHERE inferred_as_of < as_of), count(*) FILTER (WHERE inferred_as_of >= as_of) FROM read_parquet(?)", [str(parts)]
    ).fetchone()
    return int(carried), int(inferred)


def plan_carry(partition: Path | None, tag: TagSpec, info: ModelVersionInfo, top_reasons: int, as_of: date) -> tuple[CarriedInference | None, str | None]:
    """Tonight's inferences of `tag` carried from the earlier `partition` under the tag's refresh cadence, or None
    and why every customer is inferred tonight. Never raises."""
    if tag.refresh == "daily":
        return None, DAILY
    if partition is None:
        return None, NO_EARLIER_PARTITION
    problem = _carry_problem(partition, tag, info, top_reasons)
    if problem:
        return None, problem
    period_start = refresh_period_start(tag.refresh, as_of)
    try:
        carried = _load(partition, tag, info, period_start)
    except (ValueError, KeyError, OSError, pa.ArrowException) as exc:
        return (
            None,
            f"the earlier partition's inferences are not usable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): every customer inferred",
        )
    if not len(carried.index):
        return None, f"refresh: {tag.refresh}: the period starting {period_start} has no inference yet: every customer inferred"
    return carried, None
