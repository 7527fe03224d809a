"""Feature-build benchmark: synthetic bank -> staged Parquet -> 79 features, DuckDB vs pandas.

    .venv/bin/python bench/bench_features.py                       # 100k and 1M customers
    .venv/bin/python bench/bench_features.py --sizes 100000 --repeats 1
    .venv/bin/python bench/bench_features.py --check               # pandas == DuckDB on 20k customers

Every measured step (generate, stage, duckdb, pandas) runs in its own subprocess
(`bench_features.py _step ...`), so the peak RSS reported is that step's alone: the child reports
`getrusage(RUSAGE_SELF).ru_maxrss` and the parent also polls `/proc/<pid>/status` (VmHWM), which
is what remains if the child has to be killed. The parent kills a step that exceeds `--mem-cap-gb`
of resident memory or `--timeout` seconds and records that it did not finish instead.

Wall time is measured inside the child around the work itself (imports and interpreter start-up
excluded; they are reported separately as `process_s`). The parent also reads /proc/stat around
each step and reports how much CPU *other* processes used meanwhile (the machine is shared, and
on 2 cores a busy neighbour changes the wall time a lot).

Data lives under `--workdir` (default bench/out/, gitignored): `n<customers>/raw`, `.../staged`,
`.../features_duckdb.parquet`, `.../features_pandas.parquet`, and `results-<time>.json`.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import UTC, date, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_WORKDIR = HERE / "out"
STEPS = ("generate", "stage", "duckdb", "pandas", "periods", "aggregate", "full_periods", "incremental")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------
# steps (run in a child process)
# ---------------------------------------------------------------------------------------------
def _self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Timer:
    """Wall and CPU seconds of the work itself (all threads of this process)."""

    def __init__(self) -> None:
        self.wall0, self.cpu0 = time.perf_counter(), _self_cpu_s()

    def done(self, **result) -> dict:
        return {"wall_s": time.perf_counter() - self.wall0, "work_cpu_s": round(_self_cpu_s() - self.cpu0, 1), **result}


def bank_dir(workdir: Path, customers: int) -> Path:
    return workdir / f"n{customers}"


def step_generate(args) -> dict:
    from tagml.features.synthetic import BankConfig, generate_bank

    timer = Timer()
    summary = generate_bank(BankConfig(customers=args.size, months=args.months, seed=args.seed), bank_dir(args.workdir, args.size) / "raw")
    return timer.done(rows=summary["rows"])


def step_stage(args) -> dict:
    from tagml.core.storage import connect
    from tagml.features.contract import RAW_TABLES
    from tagml.features.validation import validate_and_stage

    d = bank_dir(args.workdir, args.size)
    con = connect(args.threads, args.memory_limit)
    con.execute("SET enable_progress_bar = false")
    timer = Timer()
    rows, per_table = 0, {}
    for spec in RAW_TABLES:  # customers first: the others are checked against it
        t = time.perf_counter()
        staged = validate_and_stage(con, spec, d / "raw", d / "staged")
        per_table[spec.name] = round(time.perf_counter() - t, 3)
        rows += staged.rows
    return timer.done(rows=rows, per_table_s=per_table)


def step_duckdb(args) -> dict:
    from tagml.core.storage import connect
    from tagml.features.customer_features import build_customer_features

    d = bank_dir(args.workdir, args.size)
    con = connect(args.threads, args.memory_limit)
    con.execute("SET enable_progress_bar = false")
    timer = Timer()
    rows = build_customer_features(con, d / "staged", date.fromisoformat(args.as_of), d / "features_duckdb.parquet")
    return timer.done(rows=rows)


def _periods_dir(args) -> Path:
    return bank_dir(args.workdir, args.size) / "staged_periods"


def step_periods(args) -> dict:
    """The staged tables laid out by period (a file per day, balances per month end), as incremental staging writes them."""
    import shutil

    sys.path.insert(0, str(HERE.parent / "tests"))
    from test_incremental_features import write_period_bank  # the tests' layout writer: one home

    from tagml.core.storage import connect

    shutil.rmtree(_periods_dir(args), ignore_errors=True)
    con = connect(args.threads, args.memory_limit)
    timer = Timer()
    write_period_bank(con, bank_dir(args.workdir, args.size) / "staged", _periods_dir(args))
    return timer.done(rows=0)


def step_aggregate(args) -> dict:
    """Every monthly aggregate built from scratch (the one-time cost; a nightly rebuilds at most a month)."""
    import shutil

    from tagml.core.storage import connect
    from tagml.features.aggregates import update_monthly_aggregates

    aggregates = bank_dir(args.workdir, args.size) / "aggregates"
    shutil.rmtree(aggregates, ignore_errors=True)
    con = connect(args.threads, args.memory_limit)
    con.execute("SET enable_progress_bar = false")
    timer = Timer()
    update = update_monthly_aggregates(con, _periods_dir(args), aggregates)
    return timer.done(rows=update.rows, months=sum(len(v) for v in update.built.values()))


def step_full_periods(args) -> dict:
    """The full recompute over the by-period layout (what the incremental build is compared with)."""
    from tagml.core.storage import connect
    from tagml.features.customer_features import build_customer_features

    d = bank_dir(args.workdir, args.size)
    con = connect(args.threads, args.memory_limit)
    con.execute("SET enable_progress_bar = false")
    timer = Timer()
    rows = build_customer_features(con, _periods_dir(args), date.fromisoformat(args.as_of), d / "features_full_periods.parquet")
    return timer.done(rows=rows)


def step_incremental(args) -> dict:
    """The snapshot from the monthly aggregates plus the windows' edge days (aggregates already up to date:
    the check that they are is timed too), then checked == the full recompute (not timed)."""
    import pyarrow.parquet as pq

    from tagml.core.storage import connect, write_parquet_atomically
    from tagml.features.aggregates import incremental_snapshot_plan, update_monthly_aggregates

    d = bank_dir(args.workdir, args.size)
    con = connect(args.threads, args.memory_limit)
    con.execute("SET enable_progress_bar = false")
    as_of = date.fromisoformat(args.as_of)
    timer = Timer()
    update = update_monthly_aggregates(con, _periods_dir(args), d / "aggregates")
    check_s = time.perf_counter() - timer.wall0
    plan = incremental_snapshot_plan(con, _periods_dir(args), as_of, d / "aggregates")
    rows = write_parquet_atomically(con, plan.sql, d / "features_incremental.parquet")
    result = timer.done(rows=rows, update_check_s=round(check_s, 2), rebuilt_months=sum(len(v) for v in update.built.values()))
    full = d / "features_full_periods.parquet"
    if full.exists():
        result["equal_to_full"] = pq.read_table(full).equals(pq.read_table(d / "features_incremental.parquet"))
    return result


def step_pandas(args) -> dict:
    sys.path.insert(0, str(HERE))
    from pandas_features import build_pandas_features

    d = bank_dir(args.workdir, args.size)
    timer = Timer()
    df = build_pandas_features(d / "staged", date.fromisoformat(args.as_of))
    df.to_parquet(d / "features_pandas.parquet", index=False)
    return timer.done(rows=len(df))


def run_step_in_child(args) -> None:
    fn = {
        "generate": step_generate,
        "stage": step_stage,
        "duckdb": step_duckdb,
        "pandas": step_pandas,
        "periods": step_periods,
        "aggregate": step_aggregate,
        "full_periods": step_full_periods,
        "incremental": step_incremental,
    }[args.step]
    result = fn(args)
    result["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# parent: launch, watch, measure
# ---------------------------------------------------------------------------------------------
def _proc_status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _busy_cpu_s() -> float:
    with open("/proc/stat") as fh:
        parts = fh.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in parts[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def wait_for_idle(args) -> float:
    """Wait (up to --wait-idle-max s) until other processes use less than --wait-idle % of the CPUs.

    Returns the busy share seen last. 0 disables waiting (one 1-second sample is still taken).
    """
    deadline = time.perf_counter() + args.wait_idle_max
    while True:
        b0 = _busy_cpu_s()
        time.sleep(1.0)
        busy_pct = 100 * (_busy_cpu_s() - b0) / (os.cpu_count() or 1)
        if not args.wait_idle or busy_pct <= args.wait_idle or time.perf_counter() > deadline:
            return busy_pct
        time.sleep(2.0)


def launch(step: str, args, size: int) -> dict:
    """Run one step in a fresh interpreter; return its measurements (or why it did not finish)."""
    busy_before = wait_for_idle(args)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "_step",
        step,
        "--size",
        str(size),
        "--workdir",
        str(args.workdir),
        "--seed",
        str(args.seed),
        "--months",
        str(args.months),
        "--as-of",
        args.as_of,
        "--threads",
        str(args.threads),
        "--memory-limit",
        args.memory_limit,
    ]
    cap_kb = int(args.mem_cap_gb * 1024 * 1024)
    log = bank_dir(args.workdir, size) / f"{step}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    busy0, t0 = _busy_cpu_s(), time.perf_counter()
    with open(log, "w") as out:
        # cwd = the bank's directory: DuckDB's spill directory (.tmp) lands there, not in the repo
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=bank_dir(args.workdir, size), env=env)
        peak_kb, killed = 0, None
        while proc.poll() is None:  # the pid is not reaped before poll() returns non-None: safe to kill
            rss = _proc_status_kb(proc.pid, "VmRSS")
            peak_kb = max(peak_kb, _proc_status_kb(proc.pid, "VmHWM"), rss)
            elapsed = time.perf_counter() - t0
            if rss > cap_kb:
                killed = f"killed at {rss / 1024**2:.1f} GB RSS (cap {args.mem_cap_gb:g} GB) after {elapsed:.0f} s"
            elif elapsed > args.timeout:
                killed = f"killed after {elapsed:.0f} s (timeout {args.timeout:g} s) at {rss / 1024**2:.1f} GB RSS"
            if killed:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.1)
    process_s = time.perf_counter() - t0
    rusage = resource.getrusage(resource.RUSAGE_CHILDREN)  # cumulative; only used for the CPU delta below
    busy = _busy_cpu_s() - busy0
    result: dict = {
        "step": step,
        "size": size,
        "process_s": round(process_s, 2),
        "polled_peak_mb": round(peak_kb / 1024, 1),
        "busy_before_pct": round(busy_before, 1),
    }
    text = log.read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
    if killed or proc.returncode != 0 or not lines:
        result["error"] = killed or f"exit code {proc.returncode}: {text.strip().splitlines()[-1] if text.strip() else ''}"
        result["peak_mb"] = result["polled_peak_mb"]
    else:
        result.update(json.loads(lines[-1][len("RESULT ") :]))
        result["peak_mb"] = round(max(result.pop("maxrss_mb"), result["polled_peak_mb"]), 1)
        result["wall_s"] = round(result["wall_s"], 2)
    own_cpu = rusage.ru_utime + rusage.ru_stime - launch.cpu_seen  # type: ignore[attr-defined]
    launch.cpu_seen = rusage.ru_utime + rusage.ru_stime  # type: ignore[attr-defined]
    result["cpu_s"] = round(own_cpu, 1)
    result["other_cpu_pct"] = round(100 * max(busy - own_cpu, 0) / (process_s * (os.cpu_count() or 1)), 1)
    return result


launch.cpu_seen = 0.0  # type: ignore[attr-defined]


QUIET_PCT = 10  # a run is "quiet" if other processes used less than this share of the CPUs meanwhile


def _fmt_s(values: list[float]) -> str:
    if not values:
        return "–"
    return f"{statistics.median(values):.1f}" + (f" ({min(values):.1f}–{max(values):.1f})" if len(values) > 1 else "")


def summarise(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    s = {"runs": len(runs), "ok": len(ok), "errors": [r["error"] for r in runs if "error" in r]}
    if ok:
        s["wall_s"] = [r["wall_s"] for r in ok]
        s["wall_median_s"] = statistics.median(s["wall_s"])
        s["quiet_wall_s"] = [r["wall_s"] for r in ok if r["other_cpu_pct"] < QUIET_PCT]
        s["quiet_median_s"] = statistics.median(s["quiet_wall_s"]) if s["quiet_wall_s"] else None
        s["cpu_s"] = [r["work_cpu_s"] for r in ok]
        s["peak_mb"] = max(r["peak_mb"] for r in ok)
        s["rows"] = ok[-1]["rows"]
        s["other_cpu_pct"] = max(r["other_cpu_pct"] for r in ok)
    else:
        s["peak_mb"] = max(r["peak_mb"] for r in runs)
    return s


def markdown(results: dict, months, seed, as_of) -> str:
    out = []
    labels = {
        "generate": "generate raw (numpy/pyarrow)",
        "stage": "validate + stage all raw tables (DuckDB)",
        "duckdb": "features, DuckDB",
        "pandas": "features, pandas",
        "periods": "lay the staged tables out by period (setup)",
        "aggregate": "monthly aggregates from scratch (one-time)",
        "full_periods": "features, DuckDB full recompute (by-period layout)",
        "incremental": "features, DuckDB incremental (aggregates + edge days)",
    }
    for size, steps in results.items():
        raw_rows = steps.get("generate", {}).get("rows")
        out.append(f"### {int(size):,} customers × {months} months (seed {seed}, as_of {as_of})\n")
        if isinstance(raw_rows, dict):
            out.append("Raw rows: " + ", ".join(f"{k} {v:,}" for k, v in raw_rows.items()) + "\n")
        out.append(
            f"| step | wall s: median (min–max), all runs | wall s: quiet runs (others < {QUIET_PCT}% CPU) "
            "| CPU s (median) | runs | peak RSS | others' CPU, worst run | output rows |"
        )
        out.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for step in STEPS:
            s = steps.get(step)
            if not s or not s["runs"]:
                continue
            rows = s.get("rows")
            rows = f"{sum(rows.values()):,}" if isinstance(rows, dict) else (f"{rows:,}" if rows else "")
            if s["ok"]:
                note = f" ({s['ok']}/{s['runs']} finished: {'; '.join(s['errors'])})" if s["errors"] else ""
                out.append(
                    f"| {labels[step]} | {_fmt_s(s['wall_s'])}{note} | {_fmt_s(s['quiet_wall_s'])} "
                    f"| {statistics.median(s['cpu_s']):.1f} | {s['ok']} | {s['peak_mb'] / 1024:.2f} GB "
                    f"| {s['other_cpu_pct']:.0f}% | {rows} |"
                )
            else:
                out.append(f"| {labels[step]} | did not finish: {s['errors'][0]} | | | 0 | ≥{s['peak_mb'] / 1024:.2f} GB | | |")
        d, p, st = steps.get("duckdb"), steps.get("pandas"), steps.get("stage")
        out.append("")
        if st and d and st.get("ok") and d.get("ok"):
            line = f"- From raw (stage + DuckDB features): **{st['wall_median_s'] + d['wall_median_s']:.1f} s** (medians of all runs)"
            if st["quiet_median_s"] and d["quiet_median_s"]:
                line += f", **{st['quiet_median_s'] + d['quiet_median_s']:.1f} s** (quiet runs)"
            out.append(line + f"; peak RSS of the two steps {max(st['peak_mb'], d['peak_mb']) / 1024:.2f} GB.")
        if d and p and d.get("ok") and p.get("ok"):
            line = f"- pandas / DuckDB feature build: **{p['wall_median_s'] / d['wall_median_s']:.1f}× wall time** (medians of all runs)"
            if d["quiet_median_s"] and p["quiet_median_s"]:
                line += f", **{p['quiet_median_s'] / d['quiet_median_s']:.1f}×** (quiet runs)"
            line += f", {statistics.median(p['cpu_s']) / statistics.median(d['cpu_s']):.1f}× CPU time, **{p['peak_mb'] / d['peak_mb']:.1f}× peak RSS**."
            out.append(line)
        fp, inc = steps.get("full_periods"), steps.get("incremental")
        if fp and inc and fp.get("ok") and inc.get("ok"):
            line = (
                f"- full recompute / incremental (same layout, same run): **{fp['wall_median_s'] / inc['wall_median_s']:.1f}× wall time** (medians of all runs)"
            )
            if fp["quiet_median_s"] and inc["quiet_median_s"]:
                line += f", **{fp['quiet_median_s'] / inc['quiet_median_s']:.1f}×** (quiet runs)"
            out.append(
                line + f", {statistics.median(fp['cpu_s']) / statistics.median(inc['cpu_s']):.1f}× CPU time, {fp['peak_mb'] / inc['peak_mb']:.1f}× peak RSS."
            )
        if d and p and d.get("ok") and not p.get("ok"):
            out.append(f"- pandas did not finish within the cap; DuckDB took {d['wall_median_s']:.1f} s at {d['peak_mb'] / 1024:.2f} GB.")
        out.append("")
    return "\n".join(out)


def render(sources: list[str]) -> str:
    """Merge the runs of several results files (same data) and render one markdown report.

    A source is `results.json` (every step in it) or `results.json:stage,duckdb` (only those steps,
    e.g. to leave out runs made with an older version of the code).
    """
    merged: dict = {}
    first_args = None
    for source in sources:
        path, _, only = str(source).partition(":")
        meta = json.loads(Path(path).read_text())
        first_args = first_args or meta["args"]
        wanted = set(only.split(",")) if only else None
        for size, steps in meta["results"].items():
            for step, s in steps.items():
                if wanted is not None and step not in wanted:
                    continue
                slot = merged.setdefault(size, {}).setdefault(step, {"details": [], "rows": s.get("rows")})
                slot["details"] += s.get("details", [])
    results = {}
    for size, steps in merged.items():
        results[size] = {}
        for step in STEPS:
            if step not in steps:
                continue
            s = steps[step]
            results[size][step] = summarise(s["details"]) if s["details"] else {"runs": 0, "ok": 0, "rows": s["rows"]}
            if step == "generate":
                results[size][step]["rows"] = s["details"][-1]["rows"] if s["details"] else s["rows"]
    return markdown(results, first_args["months"], first_args["seed"], first_args["as_of"])


def run_bench(args) -> None:
    args.workdir.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    for size in args.sizes:
        steps: dict = {}
        results[size] = steps
        raw_manifest = bank_dir(args.workdir, size) / "raw" / "_truth" / "manifest.json"
        if args.reuse_raw and raw_manifest.exists():
            print(f"[n={size}] reusing raw data in {raw_manifest.parent.parent}", flush=True)
            steps["generate"] = {"runs": 0, "ok": 0, "errors": [], "rows": json.loads(raw_manifest.read_text())["rows"], "skipped": True}
        todo = [("generate", 1)] if "generate" not in steps else []
        todo += [(s, args.repeats) for s in ("stage", "duckdb", "pandas") if s not in args.skip]
        if args.incremental:
            todo += [("periods", 1), ("aggregate", 1), ("full_periods", args.repeats), ("incremental", args.repeats)]
        for step, n in todo:
            runs = []
            for i in range(n):
                r = launch(step, args, size)
                runs.append(r)
                print(f"[n={size}] {step} run {i + 1}/{n}: " + json.dumps(r), flush=True)
                if "error" in r and step != "pandas":
                    raise SystemExit(f"{step} failed at n={size}: {r['error']} (log: {bank_dir(args.workdir, size) / (step + '.log')})")
                if "error" in r:  # a capped pandas run: do not repeat it
                    break
            steps[step] = summarise(runs) | {"details": runs}
            if step == "generate" and runs[-1].get("rows"):
                steps[step]["rows"] = runs[-1]["rows"]
    md = markdown(results, args.months, args.seed, args.as_of)
    print("\n" + md)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    meta = {"argv": sys.argv, "args": {k: str(v) for k, v in vars(args).items()}, "results": results, "markdown": md}
    target = args.json or args.workdir / f"results-{stamp}.json"
    Path(target).write_text(json.dumps(meta, indent=2, default=str))
    print(f"results: {target}")


# ---------------------------------------------------------------------------------------------
# --check: pandas output == DuckDB output
# ---------------------------------------------------------------------------------------------
def compare(duck, pand, rtol: float, atol: float) -> list[tuple[str, int, str]]:
    """Per-feature mismatches: (feature, n_rows, example)."""
    import numpy as np

    from tagml.features.dictionary import CATEGORICAL_FEATURES, FEATURE_NAMES

    problems = []
    if len(duck) != len(pand) or not (duck["customer_id"].to_numpy() == pand["customer_id"].to_numpy()).all():
        only_d = set(duck["customer_id"]) - set(pand["customer_id"])
        only_p = set(pand["customer_id"]) - set(duck["customer_id"])
        return [("(rows)", len(only_d) + len(only_p), f"{len(duck)} vs {len(pand)} rows; only DuckDB {sorted(only_d)[:3]}, only pandas {sorted(only_p)[:3]}")]
    as_of_d = duck["as_of"].astype(str).to_numpy()
    as_of_p = pand["as_of"].astype(str).to_numpy()
    if (as_of_d != as_of_p).any():
        problems.append(("as_of", int((as_of_d != as_of_p).sum()), f"{as_of_d[0]} vs {as_of_p[0]}"))
    for name in FEATURE_NAMES:
        if name not in pand.columns:
            problems.append((name, len(duck), "missing in pandas output"))
            continue
        a, b = duck[name], pand[name]
        if name in CATEGORICAL_FEATURES:
            bad = ~((a.isna() & b.isna()) | (a.astype(object) == b.astype(object)))
        else:
            x, y = a.astype("float64").to_numpy(), b.astype("float64").to_numpy()
            bad = ~((np.isnan(x) & np.isnan(y)) | np.isclose(x, y, rtol=rtol, atol=atol))
        n_bad = int(np.asarray(bad).sum())
        if n_bad:
            i = np.flatnonzero(np.asarray(bad))[0]
            problems.append((name, n_bad, f"{duck['customer_id'].iloc[i]}: duckdb={a.iloc[i]!r} pandas={b.iloc[i]!r}"))
    return problems


def run_check(args) -> None:
    import pandas as pd

    sys.path.insert(0, str(HERE))
    from pandas_features import build_pandas_features

    from tagml.core.storage import connect
    from tagml.features.contract import RAW_TABLES
    from tagml.features.customer_features import build_customer_features
    from tagml.features.dictionary import FEATURE_NAMES
    from tagml.features.synthetic import BankConfig, generate_bank
    from tagml.features.validation import validate_and_stage

    d = bank_dir(args.workdir, args.check_size)
    if not (d / "raw" / "_truth" / "manifest.json").exists() or not args.reuse_raw:
        generate_bank(BankConfig(customers=args.check_size, months=args.months, seed=args.seed), d / "raw")
    con = connect(args.threads, args.memory_limit)
    con.execute("SET enable_progress_bar = false")
    for spec in RAW_TABLES:
        validate_and_stage(con, spec, d / "raw", d / "staged")
    failed = False
    for as_of_text in args.check_as_of or [args.as_of]:
        as_of = date.fromisoformat(as_of_text)
        target = d / f"check_duckdb_{as_of}.parquet"
        build_customer_features(con, d / "staged", as_of, target)
        duck = pd.read_parquet(target)
        pand = build_pandas_features(d / "staged", as_of)
        problems = compare(duck, pand, args.rtol, args.atol)
        print(f"as_of {as_of}: {len(duck):,} rows, {len(FEATURE_NAMES)} features, {len(problems)} mismatching (rtol {args.rtol:g}, atol {args.atol:g})")
        for name, n, example in problems:
            print(f"  MISMATCH {name}: {n} rows, e.g. {example}")
        failed |= bool(problems)
    if failed:
        raise SystemExit("pandas and DuckDB features differ")
    print("OK: every feature matches")


# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="customers per bank")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--months", type=int, default=12)
    p.add_argument("--as-of", default="2026-10-31")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    p.add_argument("--threads", type=int, default=2, help="DuckDB threads")
    p.add_argument("--memory-limit", default="8GB", help="DuckDB memory_limit")
    p.add_argument("--repeats", type=int, default=3, help="runs of stage / duckdb / pandas per size (generate runs once)")
    p.add_argument("--timeout", type=float, default=1200, help="kill a step after this many seconds")
    p.add_argument("--mem-cap-gb", type=float, default=20, help="kill a step whose resident memory exceeds this")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        metavar="PCT",
        help="before each step, wait until the machine's CPUs are at most PCT%% busy (shared machine); 0: do not wait",
    )
    p.add_argument("--wait-idle-max", type=float, default=600, help="give up waiting for an idle machine after this many seconds")
    p.add_argument("--reuse-raw", action="store_true", help="do not regenerate raw data that already exists (generate is then not timed)")
    p.add_argument("--skip", nargs="*", default=[], choices=["stage", "duckdb", "pandas"], help="steps not to run (their inputs must exist)")
    p.add_argument(
        "--incremental", action="store_true", help="also: lay the staged tables out by period, build the monthly aggregates, and time full vs incremental"
    )
    p.add_argument("--json", type=Path, help="where to write the results (default: WORKDIR/results-<time>.json)")
    p.add_argument(
        "--render",
        nargs="+",
        metavar="RESULTS_JSON[:STEP,...]",
        help="print the markdown report for these results files, pooling runs of the same step (FILE:stage,duckdb takes only those steps from FILE)",
    )
    p.add_argument("--check", action="store_true", help="assert pandas == DuckDB feature by feature instead of timing")
    p.add_argument("--check-size", type=int, default=20_000)
    p.add_argument("--check-as-of", nargs="*", help="as_of dates to compare (default: --as-of)")
    p.add_argument("--rtol", type=float, default=1e-6)
    p.add_argument("--atol", type=float, default=1e-12, help="absolute tolerance (differences of equal shares can be ~1e-17, not 0)")
    if argv and argv[0] == "_step":
        p.add_argument("step", choices=STEPS)
        p.add_argument("--size", type=int, required=True)
        args = p.parse_args(argv[1:])
        args.internal = True
        return args
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    args.workdir = args.workdir.resolve()
    if getattr(args, "internal", False):
        run_step_in_child(args)
    elif args.render:
        print(render(args.render))
    elif args.check:
        run_check(args)
    else:
        run_bench(args)


if __name__ == "__main__":
    main(sys.argv[1:])
