"""Incremental staging (#14): one new day staged on top of a year of staged history vs the full staging of the same data.

    .venv/bin/python bench/bench_incremental_staging.py --bank /path/to/generated/raw --workdir /tmp/stage-bench

`--bank` is a generated bank (`tagml generate` / `generate_bank`: whole tables); it is split into dated deliveries
(`split_deliveries`) through the day before `--day`, that history is staged, then the day's files are delivered and
staged incrementally; finally the same data (through `--day`) is staged from scratch into a fresh directory: the full
staging. Each step runs in its own forked process, so its peak RSS is its own (ru_maxrss).
"""

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import sys
import time
from datetime import date, timedelta
from pathlib import Path


def _child(queue, step: str, kw: dict) -> None:
    from tagml.core.storage import connect
    from tagml.features.delivery import stage_delivery
    from tagml.features.synthetic.deliveries import split_deliveries

    started = time.perf_counter()
    detail: dict = {}
    if step == "split":
        detail = split_deliveries(
            Path(kw["bank"]), Path(kw["raw"]), date.fromisoformat(kw["through"]), [date.fromisoformat(d) for d in kw["days"]] if kw.get("days") else None
        )
        detail = {t: v["files"] for t, v in detail.items()}
    else:
        con = connect(threads=2, memory_limit="3GB")
        result = stage_delivery(con, Path(kw["raw"]), Path(kw["staged"]), date.fromisoformat(kw["delivery"]))
        con.close()
        detail = {
            "validated": {t: len(i.validated) for t, i in result.ingest.items() if i.validated},
            "rows_new": {t: i.rows_new for t, i in result.ingest.items() if i.rows_new},
            "changed_periods": {t: len(d) for t, d in result.changed_periods.items()},
        }
    queue.put({"seconds": round(time.perf_counter() - started, 2), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), **detail})


def run(step: str, **kw) -> dict:
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, step, kw))
    proc.start()
    out = queue.get()
    proc.join()
    print(step, json.dumps(out), flush=True)
    return out


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bank", type=Path, required=True)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--day", type=date.fromisoformat, default=date(2026, 10, 31), help="the new day (default: the bank's last)")
    args = p.parse_args(argv)
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    raw, staged, full = work / "raw", work / "inc" / "raw", work / "full" / "raw"
    before = args.day - timedelta(days=1)
    results = {"split_history": run("split", bank=str(args.bank), raw=str(raw), through=before.isoformat())}
    results["stage_history"] = run("stage", raw=str(raw), staged=str(staged), delivery=args.day.isoformat())
    results["split_day"] = run("split", bank=str(args.bank), raw=str(raw), through=args.day.isoformat(), days=[args.day.isoformat()])
    results["incremental"] = run("stage", raw=str(raw), staged=str(staged), delivery=(args.day + timedelta(days=1)).isoformat())
    results["full"] = run("stage", raw=str(raw), staged=str(full), delivery=(args.day + timedelta(days=1)).isoformat())
    results["ratio_full_over_incremental"] = round(results["full"]["seconds"] / results["incremental"]["seconds"], 1)
    print(json.dumps(results, indent=1))
    (work / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
