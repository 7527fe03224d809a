"""The numbers of one tag's drift, against the reference of the version that scored the partition.

Measures only: PSI of every feature (monitoring/psi.py), the inferred classes' PSI and shares per
slice, the probability histograms' PSI, and realised performance measured by the caller. Whether
they amount to drift is monitoring/decision.py's call.
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import duckdb
import pandas as pd

from tagml.core.storage import sql_literal
from tagml.monitoring.decision import DriftMeasures, large_enough
from tagml.monitoring.performance import RealisedPerformance
from tagml.monitoring.psi import (
    ALL,
    MISSING,
    BinCounter,
    Bins,
    ReferenceCounts,
    bin_counts,
    parquet,
    psi_from_counts,
    psi_table,
    rollup,
    slice_value_sql,
    slice_values,
)
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
    reference_features: ReferenceCounts  # the feature PSI's bins and the population's counts in them (cached per version)


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


def measure_tags(
    con: duckdb.DuckDBPyConnection, night: Sequence[TagInputs], performances: Sequence[RealisedPerformance], bin_counter: BinCounter | None = None
) -> list[TagMeasures]:
    """Every tag's measures of one night, in the order of `night`: feature PSI over every customer (the current side
    counted by `bin_counter`, default DuckDB's) and the tag store's inferred classes against the version's reference.

    The tags share their snapshot and most features, so the current side is counted once for all of them
    (`_current_feature_counts`) and the predictions are read in one query (`_current_predictions`); the reference
    side comes from each version's cache. Each tag's PSI is then computed from exactly the counts a scan of its
    own would give (the same integers, summed into the same slices), so the numbers are those of `feature_psi`.
    """
    feature_counts = _current_feature_counts(con, night, bin_counter)
    predictions = _current_predictions(con, night)
    measures = []
    for inputs, performance, current, (class_counts, probability_bins) in zip(night, performances, feature_counts, predictions):
        mm = inputs.model
        features = psi_table(inputs.reference_features.counts, current, mm.kinds, inputs.slices)
        table = _prediction_table(inputs.profile, class_counts, probability_bins, mm.classes)
        measures.append(TagMeasures(features, table, performance, mm.classes))
    return measures


def _compatible(shared: Mapping[str, object], own: Mapping[str, object]) -> bool:
    return all(shared[k] == v for k, v in own.items() if k in shared)


def _shared_scans(night: Sequence[TagInputs], by: Callable[[TagInputs], object], binned: bool = True) -> list[list[int]]:
    """Positions of the tags one scan can serve together: the same `by` (snapshot, partition), and for every slice
    name two tags share the same slice SQL; when the scan bins features (`binned`), also for every feature two tags
    share the same kind and bins (a version on another reference bins differently). The predictions' scan bins no
    feature, so tags trained on different dates still share it."""
    groups: list[tuple[object, dict, dict, dict, list[int]]] = []
    for i, inputs in enumerate(night):
        kinds, edges = (dict(inputs.model.kinds), inputs.reference_features.edges) if binned else ({}, {})
        slices = inputs.slices
        for key, g_kinds, g_edges, g_slices, members in groups:
            if key == by(inputs) and _compatible(g_kinds, kinds) and _compatible(g_edges, edges) and _compatible(g_slices, slices):
                g_kinds.update(kinds)
                g_edges.update(edges)
                g_slices.update(slices)
                members.append(i)
                break
        else:
            groups.append((by(inputs), kinds, dict(edges), dict(slices), [i]))
    return [members for *_, members in groups]


def _current_feature_counts(con: duckdb.DuckDBPyConnection, night: Sequence[TagInputs], bin_counter: BinCounter | None) -> list[pd.DataFrame]:
    """Per tag, the current snapshot's counts in its version's bins (slice_column, slice, feature, bin, n), from one
    scan per group of tags that share a snapshot (`_shared_scans`): the union of their features and slices."""
    count = bin_counter or bin_counts
    out: list[pd.DataFrame] = [pd.DataFrame()] * len(night)
    for members in _shared_scans(night, lambda inputs: inputs.features_path):
        kinds: dict[str, str] = {}
        edges: dict[str, Bins] = {}
        slices: dict[str, str] = {}
        for i in members:
            kinds.update(night[i].model.kinds)
            edges.update(night[i].reference_features.edges)
            slices.update(night[i].slices)
        path = night[members[0]].features_path
        counts = count(con, path, kinds, edges, slices, slice_values(con, [path], slices))
        for i in members:
            own = counts["feature"].isin(list(night[i].model.kinds)) & counts["slice_column"].isin([ALL, *night[i].slices])
            out[i] = counts[own].reset_index(drop=True)
    return out


def _current_predictions(con: duckdb.DuckDBPyConnection, night: Sequence[TagInputs]) -> list[tuple[pd.DataFrame, pd.DataFrame]]:
    """Per tag, (class counts overall and per slice, probability bins per class) in the tag-store partition: one
    join of the partition with the snapshot's slice columns, and one pass over the probabilities, for every tag at once."""
    out: list[tuple[pd.DataFrame, pd.DataFrame]] = [(pd.DataFrame(), pd.DataFrame())] * len(night)
    for members in _shared_scans(night, lambda inputs: (inputs.tags_sql, inputs.features_path), binned=False):
        first = night[members[0]]
        names = [night[i].tag.name for i in members]
        slices: dict[str, str] = {}
        for i in members:
            slices.update(night[i].slices)
        # positional aliases: a slice may be named like any column of this query (a bank's names are free text)
        alias = {name: f"_slice_{j}" for j, name in enumerate(slices)}
        slice_cols = "".join(f"{slice_value_sql(expr)} AS {alias[name]}, " for name, expr in slices.items())
        which = f"tag IN ({', '.join('?' for _ in names)})"
        finest = con.execute(
            f"SELECT t.tag AS _tag, {slice_cols}coalesce(t.inferred_value, {sql_literal(MISSING)}) AS class, count(*) AS n "
            f"FROM (SELECT tag, customer_id, inferred_value FROM {first.tags_sql} WHERE {which}) t "
            f"JOIN (SELECT * FROM {parquet(first.features_path)}) f ON f.customer_id = t.customer_id GROUP BY ALL",
            names,
        ).df()
        bins = con.execute(
            f"SELECT tag AS _tag, e.key AS class, least(floor(e.value * {PROBABILITY_BINS}), {PROBABILITY_BINS - 1})::INTEGER AS bin, "
            f"count(*) AS n, sum(e.value) AS total FROM (SELECT tag, unnest(map_entries(probabilities)) AS e FROM {first.tags_sql} "
            f"WHERE {which} AND probabilities IS NOT NULL) GROUP BY ALL",
            names,
        ).df()
        for i, name in zip(members, names):
            own = finest[finest["_tag"] == name].rename(columns={a: s for s, a in alias.items()})
            counts = rollup(own, list(night[i].slices), ["class"])
            out[i] = (counts, bins[bins["_tag"] == name].drop(columns="_tag").reset_index(drop=True))
    return out


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
