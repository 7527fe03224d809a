"""The nightly drift's shared scans and reference cache (issue #14) against independent per-tag computations,
with real stores: DuckDB/Parquet features and tag store, an MLflow SQLite registry with trained champions.

Two model tags trained on different dates have different reference populations, so the features they
share are binned differently and one scan must not serve both; each tag's numbers must be those of a
scan of its own (`feature_psi` on its reference and current files) and of its own rows in the tag store.
"""

import json
import os
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from tagml.features.customer_features import build_customer_features
from tagml.monitoring.drift import DriftLocations, compute_night_drift
from tagml.monitoring.psi import ALL, MISSING, bin_counts, distribution_psi, feature_psi
from tagml.monitoring.reference import PROBABILITY_BINS, DriftInputError, _digest
from tagml.scoring.score import score_partition
from tagml.scoring.store import ParquetTagStore
from tagml.training.catalog import load_catalog
from tagml.training.dataset import build_training_set
from tagml.training.registry import apply_gate, champion_version, evaluate_gate, promote
from tagml.training.tracking import connect_tracking
from tagml.training.train import train_tag
from tests.conftest import make_connection, shipped_slices, write_test_catalog

TRAINED = {"risk_appetite": date(2026, 8, 31), "life_stage": date(2026, 6, 30)}
NIGHTS = (date(2026, 9, 30), date(2026, 10, 31))


@pytest.fixture(scope="module")
def home(bank, tmp_path_factory):
    """A warehouse with both tags' champions, the features of their training dates and of both nights, and both nights scored."""
    tmp = tmp_path_factory.mktemp("shared_scan")
    catalog = load_catalog(write_test_catalog(tmp / "catalog.yaml", tuple(TRAINED)))
    client = connect_tracking(f"sqlite:///{tmp / 'mlflow.db'}")
    warehouse = tmp / "warehouse"
    warehouse.mkdir()
    (warehouse / "raw").symlink_to(bank["staged"])
    store = ParquetTagStore.in_warehouse(warehouse)
    features = {}
    con = make_connection(tmp)
    for day in sorted({*TRAINED.values(), *NIGHTS}):
        features[day] = warehouse / "customer_features" / f"as_of={day}" / "data.parquet"
        build_customer_features(con, bank["staged"], day, features[day])
    for name, day in TRAINED.items():
        tag = catalog.get(name)
        data = build_training_set(con, bank["staged"], tag, day, tmp / "sets")
        trained = train_tag(tag, data, client, shipped_slices(data), artifact_location=str(tmp / "artifacts"), seed=0, threads=1)
        apply_gate(client, evaluate_gate(client, tag, trained.version, data, shipped_slices(data)))
        if champion_version(client, name) != trained.version:  # the pipeline is under test here, not the gate
            promote(client, name, trained.version, by="test")
    for day in NIGHTS:
        score_partition(con, client, catalog, features[day], bank["staged"], day, store.partition_path(day))
    con.close()
    return {"tmp": tmp, "catalog": catalog, "client": client, "warehouse": warehouse, "store": store, "features": features}


class CountingBinCounter:
    """DuckDB's `bin_counts`, recording which files it counted: the reference cache's use is then visible without timing."""

    def __init__(self) -> None:
        self.paths: list[Path] = []

    def __call__(self, con, path, features, edges, slices, values):
        self.paths.append(Path(path))
        return bin_counts(con, path, features, edges, slices, values)


def _locations(home: dict, drift_dir: Path) -> DriftLocations:
    return DriftLocations(home["warehouse"], home["store"], drift_dir, drift_dir / "reports")


def _night(home: dict, drift_dir: Path, day: date, counter: CountingBinCounter | None = None):
    with make_connection(drift_dir) as con:
        return compute_night_drift(con, home["client"], home["catalog"], home["catalog"].model_tags, day, _locations(home, drift_dir), 500, counter)


def _sorted(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    return frame.sort_values(keys).reset_index(drop=True)


def _independent_features(con, result) -> pd.DataFrame:
    """The tag's feature PSI from a scan of its own: bins from its reference population, both files counted alone."""
    inputs = result.inputs
    return feature_psi(con, inputs.population, inputs.features_path, inputs.model.kinds, inputs.slices)


def _assert_features_match(con, result) -> None:
    keys = ["slice_column", "slice", "feature"]
    shared = _sorted(result.features, keys)
    own = _sorted(_independent_features(con, result), keys)
    assert shared[keys].equals(own[keys]), result.tag
    for column in ("reference_rows", "current_rows", "bins"):
        assert (shared[column].to_numpy() == own[column].to_numpy()).all(), (result.tag, column)
    assert np.abs(shared["psi"].to_numpy() - own["psi"].to_numpy()).max() <= 1e-12, result.tag


def _own_predictions(con, result) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The tag's rows of the tag store read on their own, in pandas: (class per customer with its slices, probability bins)."""
    inputs = result.inputs
    rows = pd.read_parquet(
        ParquetTagStore(Path(inputs.features_path).parents[2] / "customer_tags").partition_path(inputs.as_of), filters=[("tag", "=", result.tag)]
    )
    slices = ", ".join(f"coalesce(({expr})::VARCHAR, '{MISSING}') AS \"{name}\"" for name, expr in inputs.slices.items())
    frame = con.execute(f"SELECT customer_id, {slices} FROM read_parquet(?)", [str(inputs.features_path)]).df()
    joined = rows[["customer_id", "inferred_value", "probabilities"]].merge(frame, on="customer_id")
    joined["class"] = joined["inferred_value"].fillna(MISSING)
    probabilities = [(k, v) for pairs in rows["probabilities"].dropna() for k, v in pairs]
    bins = pd.DataFrame(probabilities, columns=["class", "p"])
    bins["bin"] = np.minimum(np.floor(bins["p"] * PROBABILITY_BINS), PROBABILITY_BINS - 1).astype(int)
    return joined, bins.groupby(["class", "bin"], as_index=False).size().rename(columns={"size": "n"})


def _assert_predictions_match(con, result) -> None:
    joined, bins = _own_predictions(con, result)
    table, profile = result.predictions, result.inputs.profile
    ref = profile.class_counts
    groups = [(ALL, {ALL: joined})] + [(name, dict(tuple(joined.groupby(name)))) for name in result.inputs.slices]
    for column, parts in groups:
        for value, part in parts.items():
            current = part["class"].value_counts().to_dict()
            rows = table[(table["slice_column"] == column) & (table["slice"] == value)].set_index("class")
            assert {c: int(n) for c, n in rows["current_count"].items() if n} == current, (result.tag, column, value)
            reference = ref[(ref["slice_column"] == column) & (ref["slice"] == value)].set_index("class")["n"].to_dict()
            if reference:
                assert abs(rows["slice_psi"].iloc[0] - distribution_psi(reference, current)) <= 1e-12, (result.tag, column, value)
    overall = table[table["slice_column"] == ALL].set_index("class")
    ref_bins = profile.probability_bins
    for cls, own in bins.groupby("class"):
        reference = {str(b): n for b, n in ref_bins[ref_bins["class"] == cls][["bin", "n"]].itertuples(index=False)}
        current = {str(b): n for b, n in own[["bin", "n"]].itertuples(index=False)}
        assert abs(overall.loc[cls, "probability_psi"] - distribution_psi(reference, current)) <= 1e-12, (result.tag, cls)


def test_every_tags_shared_scan_psi_is_that_of_its_own_scan(home, tmp_path):
    counter = CountingBinCounter()
    results = _night(home, tmp_path / "drift", NIGHTS[1], counter)
    assert [r.tag for r in results] == list(TRAINED)
    populations = {r.tag: r.inputs.population for r in results}
    assert populations["risk_appetite"] != populations["life_stage"]  # two references: the shared features binned twice
    shared = set(results[0].inputs.model.features) & set(results[1].inputs.model.features)
    assert shared and any(results[0].inputs.reference_features.edges.get(f) != results[1].inputs.reference_features.edges.get(f) for f in shared)
    with make_connection(tmp_path) as con:
        for result in results:
            _assert_features_match(con, result)
            _assert_predictions_match(con, result)
    # one count per reference (first night), and the current snapshot counted once per group of compatible tags
    assert sorted(map(str, counter.paths)).count(str(home["features"][NIGHTS[1]])) <= len(results)


def _cache_file(drift_dir: Path, result) -> Path:
    return drift_dir / "reference" / result.tag / f"v{result.inputs.model.version}" / "feature_counts.json"


def test_the_reference_counts_are_read_from_the_cache_and_recounted_when_the_population_is_rewritten(home, tmp_path):
    drift_dir = tmp_path / "drift"
    first_counter, second_counter = CountingBinCounter(), CountingBinCounter()
    first = _night(home, drift_dir, NIGHTS[0], first_counter)
    populations = {r.inputs.population for r in first}
    assert populations <= set(first_counter.paths)
    caches = {(r.tag, name): _cache_file(drift_dir, r).with_name(name) for r in first for name in ("feature_counts.json", "profile.json")}
    before = {key: (os.stat(path).st_ino, os.stat(path).st_mtime_ns, path.read_bytes()) for key, path in caches.items()}

    second = _night(home, drift_dir, NIGHTS[1], second_counter)
    assert not populations & set(second_counter.paths), "the second night counted a reference again"
    assert {key: (os.stat(path).st_ino, os.stat(path).st_mtime_ns, path.read_bytes()) for key, path in caches.items()} == before
    with make_connection(tmp_path) as con:
        for result in second:
            _assert_features_match(con, result)

    # a restated reference day: the same path, other content
    target = next(r for r in second if r.tag == "life_stage")
    population = target.inputs.population
    original = population.read_bytes()
    try:
        table = pq.read_table(population).to_pandas()
        numeric = next(f for f, k in target.inputs.model.kinds.items() if k == "numeric" and table[f].notna().sum() > 100)
        table[numeric] = table[numeric] * 3 + 1
        table.to_parquet(population, index=False)
        third_counter = CountingBinCounter()
        third = _night(home, drift_dir, NIGHTS[1], third_counter)
        assert population in third_counter.paths
        restated = next(r for r in third if r.tag == "life_stage")
        with make_connection(tmp_path) as con:
            _assert_features_match(con, restated)
            _assert_predictions_match(con, restated)
        old = target.features.set_index(["slice_column", "slice", "feature"])["psi"]
        new = restated.features.set_index(["slice_column", "slice", "feature"])["psi"]
        assert abs(new[(ALL, ALL, numeric)] - old[(ALL, ALL, numeric)]) > 0.1  # the new reference, not the cached one
        # and every number (the predictions' reference profile too) is that of a drift directory that never saw the old file
        fresh = next(r for r in _night(home, tmp_path / "fresh", NIGHTS[1]) if r.tag == "life_stage")
        pd.testing.assert_frame_equal(
            _sorted(restated.features, ["slice_column", "slice", "feature"]), _sorted(fresh.features, ["slice_column", "slice", "feature"])
        )
        pd.testing.assert_frame_equal(restated.predictions, fresh.predictions)
    finally:
        population.write_bytes(original)


def _corruptions(payload: dict) -> dict[str, str]:
    """Hostile versions of a cache file: broken JSON, wrong types, and well-formed JSON whose counts were changed."""
    text = json.dumps(payload)
    edges_as_text = json.loads(text)
    edges_as_text["edges"] = {name: {"edges": "0.5", "mass": "x"} for name in payload["edges"]}
    counts_as_text = json.loads(text)
    counts_as_text["counts"]["n"] = [str(n) for n in payload["counts"]["n"]]
    ragged = json.loads(text)
    ragged["counts"]["bin"] = ragged["counts"]["bin"][:-1]
    tampered = json.loads(text)
    tampered["counts"]["n"][0] += 500
    not_a_dict = json.loads(text)
    not_a_dict["edges"] = [1, 2, 3]
    signed = {}  # wrong types in a file whose digest was recomputed: only the checks of the content stand between it and a PSI
    for what, change in (("edges", {"x": {"edges": ["a"], "mass": None}}), ("counts", {**payload["counts"], "n": [-1.5] * len(payload["counts"]["n"])})):
        hostile = {k: v for k, v in json.loads(text).items() if k != "digest"}
        hostile[what] = change
        signed[f"signed, wrong {what}"] = json.dumps({**hostile, "digest": _digest(hostile)})
    return {
        **signed,
        "truncated": text[: len(text) // 2],
        "empty": "",
        "a list": "[1, 2]",
        "edges as text": json.dumps(edges_as_text),
        "counts as text": json.dumps(counts_as_text),
        "ragged counts": json.dumps(ragged),
        "tampered count": json.dumps(tampered),
        "edges not a mapping": json.dumps(not_a_dict),
    }


def test_a_corrupt_or_hostile_cache_is_recounted_never_read_into_a_wrong_psi(home, tmp_path):
    drift_dir = tmp_path / "drift"
    first = _night(home, drift_dir, NIGHTS[1])
    path = _cache_file(drift_dir, first[0])
    payload = json.loads(path.read_text())
    for what, text in _corruptions(payload).items():
        path.write_text(text)
        counter = CountingBinCounter()
        try:
            results = _night(home, drift_dir, NIGHTS[1], counter)
        except DriftInputError as err:  # a clear error is acceptable; a wrong number is not
            assert str(path) in str(err), what
            continue
        assert first[0].inputs.population in counter.paths, what
        with make_connection(tmp_path) as con:
            _assert_features_match(con, results[0])
        assert json.loads(path.read_text())["counts"] == payload["counts"], what  # rewritten whole


def test_a_copied_drift_directory_keeps_its_reference_cache(home, tmp_path):
    import shutil

    # no customer_features partition on the training dates: drift builds each reference population into its own directory
    warehouse = tmp_path / "warehouse"
    (warehouse / "customer_features").mkdir(parents=True)
    for name in ("raw", "customer_tags"):
        (warehouse / name).symlink_to(home["warehouse"] / name)
    for day in NIGHTS:
        (warehouse / "customer_features" / f"as_of={day}").symlink_to(home["features"][day].parent)
    moved = {**home, "warehouse": warehouse}
    first = _night(moved, tmp_path / "drift", NIGHTS[1])
    assert all(r.inputs.population.is_relative_to(tmp_path / "drift") for r in first)
    shutil.copytree(tmp_path / "drift", tmp_path / "copy")  # copy2: the files keep their size and mtime
    counter = CountingBinCounter()
    copied = _night(moved, tmp_path / "copy", NIGHTS[1], counter)
    assert set(counter.paths) == {warehouse / "customer_features" / f"as_of={NIGHTS[1]}" / "data.parquet"}, (
        "a copied drift directory counted its references again"
    )
    for a, b in zip(first, copied):
        pd.testing.assert_frame_equal(a.features, b.features)
        pd.testing.assert_frame_equal(a.predictions, b.predictions)
