"""The numbers of one tag's drift, against the reference of the version that scored the partition.

Measures only: PSI of every feature (monitoring/psi.py), the inferred classes' PSI and shares per
slice, the probability histograms' PSI, and realised performance measured by the caller. Whether
they amount to drift is monitoring/decision.py's call.
"""

from dataclasses import dataclass
from datetime import date
from pathlib import Path

import duckdb
import pandas as pd

from tagml.core.storage import quote, sql_literal
from tagml.monitoring.decision import DriftMeasures, large_enough
from tagml.monitoring.performance import RealisedPerformance
from tagml.monitoring.psi import ALL, MISSING, BinCounter, feature_psi, parquet, psi_from_counts, rollup, slice_value_sql
from tagml.monitoring.reference import PROBABILITY_BINS, ReferenceProfile
from tagml.training.catalog import TagSpec
from tagml.training.versions import ModelVersionInfo


@dataclass(frozen=True)
class TagInputs:
    """What one tag's drift is measured on: checked partitions, the scoring version and its reference."""

    tag: TagSpec
    as_of: date
    model: ModelVersionInfo
    features_path: Path  # the snapshot the tag was scored from on as_of (customer_features, or its own table's)
    tags_sql: str  # a relation over the as_of's customer_tags partition (TagStore.read_sql)
    slices: dict[str, str]  # slice name -> SQL over a feature snapshot
    population: Path  # the reference population's features
    profile: ReferenceProfile


@dataclass(frozen=True)
class TagMeasures:
    features: pd.DataFrame  # PSI per (slice_column, slice, feature); '(all)' is the whole population
    predictions: pd.DataFrame  # per (slice_column, slice, class): counts, shares, the slice's class PSI; overall also probabilities
    performance: RealisedPerformance
    classes: tuple[str, ...]

    @property
    def overall_features(self) -> pd.DataFrame:
        return self.features[self.features["slice_column"] == ALL]

    @property
    def overall_predictions(self) -> pd.DataFrame:
        return self.predictions[self.predictions["slice_column"] == ALL]

    @property
    def prediction_psi(self) -> float:
        """The class PSI of the whole population (every overall row carries it)."""
        return float(self.overall_predictions["slice_psi"].iloc[0])

    def for_decision(self) -> DriftMeasures:
        return DriftMeasures(
            features=self.overall_features[["feature", "psi", "reference_rows", "current_rows"]],
            prediction_psi=self.prediction_psi,
            class_shares=self.overall_predictions[["class", "reference_share", "current_share"]],
            classes=self.classes,
            performance=self.performance,
        )

    def worst_slice(self) -> pd.Series | None:
        """The slice (both sides large enough to count) whose class PSI is largest, if any."""
        per_slice = self.predictions[(self.predictions["slice_column"] != ALL) & large_enough(self.predictions)]
        per_slice = per_slice.drop_duplicates(["slice_column", "slice"]).sort_values("slice_psi", ascending=False)
        return per_slice.iloc[0] if len(per_slice) else None


def measure_tag(con: duckdb.DuckDBPyConnection, inputs: TagInputs, performance: RealisedPerformance, bin_counter: BinCounter | None = None) -> TagMeasures:
    """Feature PSI over every customer (counted by `bin_counter`, default DuckDB's) and the tag store's inferred classes against the version's reference predictions."""
    mm = inputs.model
    features = feature_psi(con, inputs.population, inputs.features_path, mm.kinds, inputs.slices, bin_counter)
    current_counts, current_bins = _current_predictions(con, inputs.tags_sql, inputs.features_path, inputs.tag.name, inputs.slices)
    predictions = _prediction_table(inputs.profile, current_counts, current_bins, mm.classes)
    return TagMeasures(features, predictions, performance, mm.classes)


def _current_predictions(con: duckdb.DuckDBPyConnection, tags_sql: str, features: Path, tag: str, slices: dict[str, str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(class counts per slice, probability bins per class) of one tag in a tag-store partition."""
    slice_cols = "".join(f"{slice_value_sql(expr)} AS {quote(name)}, " for name, expr in slices.items())
    finest = con.execute(
        f"SELECT {slice_cols}coalesce(t.inferred_value, {sql_literal(MISSING)}) AS class, count(*) AS n "
        f"FROM (SELECT customer_id, inferred_value FROM {tags_sql} WHERE tag = ?) t "
        f"JOIN (SELECT * FROM {parquet(features)}) f ON f.customer_id = t.customer_id GROUP BY ALL",
        [tag],
    ).df()
    counts = rollup(finest, list(slices), ["class"])
    bins = con.execute(
        f"SELECT e.key AS class, least(floor(e.value * {PROBABILITY_BINS}), {PROBABILITY_BINS - 1})::INTEGER AS bin, "
        f"count(*) AS n, sum(e.value) AS total FROM (SELECT unnest(map_entries(probabilities)) AS e FROM {tags_sql} "
        f"WHERE tag = ? AND probabilities IS NOT NULL) GROUP BY ALL",
        [tag],
    ).df()
    return counts, bins


def _prediction_table(profile: ReferenceProfile, current_counts: pd.DataFrame, current_bins: pd.DataFrame, classes: tuple[str, ...]) -> pd.DataFrame:
    """Per slice and class: reference and current counts and shares, the slice's class PSI; overall also probabilities."""
    ref = profile.class_counts.rename(columns={"class": "bin"})
    cur = current_counts.rename(columns={"class": "bin"})
    psi = psi_from_counts(ref, cur, ["slice_column", "slice"]).rename(columns={"psi": "slice_psi"})
    merged = ref.merge(cur, on=["slice_column", "slice", "bin"], how="outer", suffixes=("_ref", "_cur")).fillna({"n_ref": 0, "n_cur": 0})
    merged = merged.merge(psi[["slice_column", "slice", "slice_psi", "reference_rows", "current_rows"]], on=["slice_column", "slice"])
    merged["reference_share"] = merged["n_ref"] / merged["reference_rows"].where(merged["reference_rows"] > 0)
    merged["current_share"] = merged["n_cur"] / merged["current_rows"].where(merged["current_rows"] > 0)
    table = merged.rename(columns={"bin": "class", "n_ref": "reference_count", "n_cur": "current_count"})
    # probabilities: overall only (a class's mean probability and the PSI of its histogram)
    ref_bins = profile.probability_bins.rename(columns={"bin": "b"}).assign(bin=lambda d: d["b"].astype(str)).drop(columns="b")
    cur_bins = current_bins.assign(bin=current_bins["bin"].astype(str))[["class", "bin", "n"]]
    prob_psi = psi_from_counts(ref_bins, cur_bins, ["class"]).set_index("class")["psi"]
    current_total = current_bins.groupby("class")["total"].sum()
    current_rows = current_bins.groupby("class")["n"].sum()
    overall = table["slice_column"] == ALL
    table.loc[overall, "reference_mean_probability"] = table.loc[overall, "class"].map({c: s / profile.rows for c, s in profile.probability_sums.items()})
    table.loc[overall, "current_mean_probability"] = table.loc[overall, "class"].map(current_total / current_rows)
    table.loc[overall, "probability_psi"] = table.loc[overall, "class"].map(prob_psi)
    order = {c: i for i, c in enumerate(classes)}
    table["_o"] = table["class"].map(order).fillna(len(order))
    return table.sort_values(["slice_column", "slice", "_o"]).drop(columns=["_o"]).reset_index(drop=True)
