"""Audience counts (圈人) on 1M customers: tagml's count over its cached wide table (and the consent, previous
partition and contact-history tables aligned with it) vs the same queries written by hand as set operations
over the long partitions, and vs tagml's count without its cache (a fresh connection per count).

Data: two synthetic partitions of the shipped catalog (scoring/synthetic.py: 1M customers x 6 tags =
6M rows each, 5 % of values changed between them), synthetic marketing consents (~70 % granted, ~10 %
granted then withdrawn, ~20 % never asked), and the contact history of two earlier audience exports
(so that the contact-frequency cap of the third query has customers to exclude).

Three queries of increasing complexity:
  q1  value_tier in [affluent, high_net_worth]
  q2  all: risk_appetite in [C4, C5], its probability >= 0.7, not life_stage = retired       (purpose marketing)
  q3  all: any(risk_appetite changed C1/C2 -> C4/C5 since the previous partition, value_tier private_banking),
      consent marketing, not churn_90d = churned, life_stage in 3 classes                   (marketing + cap 2/30d)

The hand-written SQL must give the same counts as tagml (asserted): a check of the compiler at 1M customers.

    .venv/bin/python bench/bench_audiences.py --customers 1000000 --repeat 30
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BEFORE, CURRENT = date(2026, 9, 30), date(2026, 10, 31)
QUERIES = {
    "q1": ({"tag": "value_tier", "in": ["affluent", "high_net_worth"]}, None, False),
    "q2": (
        {
            "all": [
                {"tag": "risk_appetite", "in": ["C4", "C5"]},
                {"tag": "risk_appetite", "probability": {"gte": 0.7}},
                {"not": {"tag": "life_stage", "in": ["retired"]}},
            ]
        },
        "marketing",
        False,
    ),
    "q3": (
        {
            "all": [
                {
                    "any": [
                        {"tag": "risk_appetite", "changed": {"from": ["C1", "C2"], "to": ["C4", "C5"], "since": BEFORE.isoformat()}},
                        {"tag": "value_tier", "in": ["private_banking"]},
                    ]
                },
                {"consent": "marketing"},
                {"not": {"tag": "churn_90d", "in": ["churned"]}},
                {"tag": "life_stage", "in": ["young_family", "mature_family", "empty_nest"]},
            ]
        },
        "marketing",
        True,
    ),
}


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def _stats(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    return {"median_ms": round(statistics.median(ms), 1), "p95_ms": round(p95, 1), "runs": len(ms)}


def _prepare(home: Path, customers: int):
    from tagml.compliance import lifecycle
    from tagml.core.settings import Settings
    from tagml.core.storage import WarehouseLayout, connect, sql_literal, staged_path
    from tagml.scoring.synthetic import write_synthetic_partition
    from tagml.serving.audiences import AudienceSources

    settings = Settings.from_env({"TAGML_HOME": str(home)})
    settings.ensure_dirs()
    sources = AudienceSources.from_settings(settings)
    con = connect(2, "4GB")
    started = time.perf_counter()
    for day in (BEFORE, CURRENT):
        write_synthetic_partition(con, sources.catalog, sources.store.partition_path(day), day, customers, seed=7, changed_share=0.05)
    staged = WarehouseLayout(settings.warehouse_dir).staged_dir
    staged.mkdir(parents=True, exist_ok=True)
    consents = staged_path(staged, "consents")
    con.execute(
        f"""COPY (
            WITH c AS (SELECT 'C' || lpad(CAST(i AS VARCHAR), 9, '0') AS customer_id, hash(i, 'consent') % 100 AS h FROM range({int(customers)}) r(i))
            SELECT customer_id, 'marketing' AS purpose, 'granted' AS status, TIMESTAMP '2026-01-01 10:00:00' AS recorded_at, 'app' AS channel FROM c WHERE h < 80
            UNION ALL
            SELECT customer_id, 'marketing', 'withdrawn', TIMESTAMP '2026-06-01 10:00:00', 'app' FROM c WHERE h >= 70 AND h < 80
        ) TO {sql_literal(consents)} (FORMAT PARQUET)"""
    )
    for spec in sources.catalog.tags:
        lifecycle.approve(sources.governance, spec, by="validator", reason="bench")
        lifecycle.publish(sources.governance, spec, by="tag-owner")
    return settings, sources, con, round(time.perf_counter() - started, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=30, help="counts per query for tagml's cached wide table")
    parser.add_argument("--repeat-alternatives", type=int, default=5, help="counts per query for the uncached alternatives")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md", help="append the table here ('-': print only)")
    args = parser.parse_args()

    from tagml.core.storage import connect
    from tagml.serving.audiences import ContactCap, count_audience, export_audience, visible_tags

    load_before = _uptime()
    with tempfile.TemporaryDirectory(prefix="bench-audiences-") as tmp:
        _settings, sources, con, prepare_s = _prepare(Path(tmp) / "home", args.customers)
        visible = visible_tags(sources, confidential=True)
        cap = ContactCap(2, 30)
        now = datetime.now(UTC)

        started = time.perf_counter()
        first = count_audience(con, sources, QUERIES["q1"][0], visible_tags=visible)
        cold_s = time.perf_counter() - started  # builds the wide table of the current partition

        exports = []
        for i, days_ago in enumerate((20, 10)):  # contact history for q3's cap
            t0 = time.perf_counter()
            record = export_audience(
                con,
                sources,
                QUERIES["q1"][0],
                name=f"earlier {i}",
                purpose="marketing",
                by="bench",
                cap=cap,
                visible_tags=visible,
                now=now - timedelta(days=days_ago),
            )
            exports.append({"selected": record.selected, "seconds": round(time.perf_counter() - t0, 2)})

        rows = {}
        for name, (query, purpose, capped) in QUERIES.items():
            kwargs = {"purpose": purpose, "cap": cap if capped else None, "visible_tags": visible, "now": now}
            count = count_audience(con, sources, query, **kwargs)  # warm: the previous partition's, consents' and history's tables are built here
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                again = count_audience(con, sources, query, **kwargs)
                times.append(time.perf_counter() - t0)
                assert (again.matched, again.excluded) == (count.matched, count.excluded)
            # the obvious alternative: set-based SQL straight over the long partitions (what one would write by hand)
            sql, params = _long_sql(sources, name, cap, now)
            long_times, long_result = [], {}
            for _ in range(args.repeat_alternatives):
                t0 = time.perf_counter()
                long_result = {reason: n for reason, n in con.execute(sql, params).fetchall()}
                long_times.append(time.perf_counter() - t0)
            assert sum(long_result.values()) == count.matched and {k: v for k, v in long_result.items() if k} == count.excluded, (name, long_result, count)
            # no cache: a fresh connection per count (the pivots, consent and history tables built each time)
            cold_times = []
            for _ in range(args.repeat_alternatives):
                with closing(connect(2, "4GB")) as fresh:
                    t0 = time.perf_counter()
                    cold = count_audience(fresh, sources, query, **kwargs)
                    cold_times.append(time.perf_counter() - t0)
                assert (cold.matched, cold.excluded) == (count.matched, count.excluded)
            rows[name] = {"count": count.as_dict(), "tagml": _stats(times), "long": _stats(long_times), "uncached": _stats(cold_times)}
        load_after = _uptime()

    report = {
        "customers": args.customers,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "prepare_s": prepare_s,
        "cold_first_count_s": round(cold_s, 2),
        "first_count": first.as_dict(),
        "earlier_exports": exports,
        "queries": rows,
        "load_before": load_before,
        "load_after": load_after,
    }
    print(json.dumps(report, indent=2))
    if str(args.results) != "-":
        _append(args.results, report)


def _long_sql(sources, name: str, cap, now: datetime) -> tuple[str, list]:
    """q1..q3 written by hand as set operations over the long partitions, with the exclusions; (excluded_because, customers) rows."""
    from tagml.compliance.consent import consent_states_sql, exclusions_sql

    current, before = (sources.store.read_sql(d) for d in (CURRENT, BEFORE))
    if name == "q1":
        return f"SELECT NULL, count(DISTINCT customer_id) FROM {current} WHERE tag = 'value_tier' AND value IN ('affluent', 'high_net_worth')", []
    if name == "q2":
        matched = (
            f"(SELECT customer_id FROM {current} WHERE tag = 'risk_appetite' AND value IN ('C4', 'C5') AND probability >= 0.7) "
            f"EXCEPT (SELECT customer_id FROM {current} WHERE tag = 'life_stage' AND value = 'retired')"
        )
        return f"SELECT excluded_because, count(*) FROM ({exclusions_sql(matched, sources.staged_dir, 'marketing', CURRENT)}) GROUP BY ALL", []
    changed = (
        f"SELECT a.customer_id FROM {current} a JOIN {before} b USING (customer_id, tag) "
        "WHERE a.tag = 'risk_appetite' AND b.value IN ('C1', 'C2') AND a.value IN ('C4', 'C5')"
    )
    matched = f"""
        WITH up AS (({changed}) UNION (SELECT customer_id FROM {current} WHERE tag = 'value_tier' AND value = 'private_banking')),
        consented AS (SELECT customer_id FROM ({consent_states_sql(sources.staged_dir, "marketing", CURRENT)}) WHERE state = 'granted'),
        churned AS (SELECT customer_id FROM {current} WHERE tag = 'churn_90d' AND value = 'churned'),
        families AS (SELECT customer_id FROM {current} WHERE tag = 'life_stage' AND value IN ('young_family', 'mature_family', 'empty_nest'))
        SELECT customer_id FROM ((SELECT * FROM up INTERSECT SELECT * FROM consented) EXCEPT (SELECT * FROM churned)) INTERSECT SELECT * FROM families
    """
    history = sources.contact_history_dir / "purpose=marketing" / "*.parquet"
    capped = (
        f"SELECT customer_id FROM read_parquet('{history}') WHERE selected_at >= ? AND selected_at < ? "
        "GROUP BY customer_id HAVING count(DISTINCT audience_id) >= ?"
    )
    sql = (
        f"SELECT CASE WHEN e.excluded_because IS NOT NULL THEN e.excluded_because WHEN c.customer_id IS NOT NULL THEN 'contact_cap' END, count(*) "
        f"FROM ({exclusions_sql(matched, sources.staged_dir, 'marketing', CURRENT)}) e LEFT JOIN ({capped}) c USING (customer_id) GROUP BY ALL"
    )
    naive = [(m - timedelta(days=d)).astimezone(UTC).replace(tzinfo=None) for m, d in ((now, cap.days), (now, 0))]
    return sql, [*naive, cap.max_audiences]


def _append(path: Path, report: dict) -> None:
    lines = [
        "",
        f"## Audiences (#13): counts on {report['customers']:,} customers",
        "",
        (
            f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `bench/bench_audiences.py` (Python {report['python']}, {report['cpus']} cores, shared with three "
            f"other sessions). Load before: `{report['load_before'].split('load average:')[-1].strip()}`, after: "
            f"`{report['load_after'].split('load average:')[-1].strip()}` (1/5/15 min)."
        ),
        "",
        (
            "The hand-written SQL gives the same counts (asserted); it is the set-based query one would write over the long partitions. "
            "\"No cache\" is tagml's own count on a fresh DuckDB connection (the CLI's case: pivots, consent and history tables built each time)."
        ),
        "",
        "| query | matched | selected | excluded | tagml, cached wide table: median / p95 ms | hand-written SQL on the long partitions | ratio | no cache (fresh connection) | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in report["queries"].items():
        t, long, cold = row["tagml"], row["long"], row["uncached"]
        lines.append(
            f"| {name} | {row['count']['matched']:,} | {row['count']['selected']:,} | {row['count']['excluded']} | {t['median_ms']} / {t['p95_ms']} (n={t['runs']}) | "
            f"{long['median_ms']} / {long['p95_ms']} (n={long['runs']}) | {long['median_ms'] / t['median_ms']:.1f}× | "
            f"{cold['median_ms']} / {cold['p95_ms']} (n={cold['runs']}) | {cold['median_ms'] / t['median_ms']:.0f}× |"
        )
    lines += [
        "",
        f"The first count after a partition appears builds the wide table: {report['cold_first_count_s']} s (6 tags × {report['customers']:,} rows pivoted, "
        "held in memory by the long-lived process; a refresh or erasure rewrites the partition file, whose new identity builds a new table). "
        "Exports of the two earlier audiences (file, manifest, contact history, record): "
        + ", ".join(f"{e['selected']:,} customers in {e['seconds']} s" for e in report["earlier_exports"])
        + ".",
        "",
    ]
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("\n".join(lines))


if __name__ == "__main__":
    main()
