"""Load test of `GET /customers/{id}/tags` on a 1M-customer online store, against the same endpoint served from
DuckDB over the Parquet partition (the `tagml tags` path: ParquetTagStore.customer_tags), in the same run.

    /work/main/.venv/bin/python bench/bench_api.py --work /tmp/bench-api [--customers 1000000] [--seconds 30] [--connections 1 8]

Builds (once; reused from --work) a synthetic 1M-customer tag partition (scoring/synthetic.py) and the SQLite online
store from it, publishes every tag, creates a key, starts `tagml serve` as a subprocess on 127.0.0.1 and loads it
with `wrk` (one thread, fixed connections, random customer ids, 30 s), then does the same against a baseline
server (this file, `--serve-baseline`) whose endpoint reads DuckDB over the Parquet partition. Prints one JSON
line per run (p50/p99 ms, requests/s, errors) and the machine's load (`uptime`) before and after.
"""

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import closing, suppress
from datetime import date
from pathlib import Path

AS_OF = date(2026, 10, 31)
LUA = """
math.randomseed(%(seed)d)
request = function()
  return wrk.format("GET", string.format("/customers/C%%09d/tags", math.random(0, %(last)d)), {["X-API-Key"] = "%(key)s"})
end
"""


def free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare(work: Path, customers: int) -> tuple[dict[str, str], str]:
    """The home (partition, online store, published tags, a key); reused when already built for this size."""
    from tagml.core.settings import Settings
    from tagml.core.storage import WarehouseLayout, connect
    from tagml.scoring.online import SQLiteOnlineStore
    from tagml.scoring.store import ParquetTagStore
    from tagml.scoring.synthetic import write_synthetic_partition
    from tagml.serving.auth import ApiKeyError, create_key, revoke_key
    from tagml.training.catalog import load_catalog

    home = work / f"home-{customers}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAGML_")} | {"TAGML_HOME": str(home)}
    settings = Settings.from_env({"TAGML_HOME": str(home)})
    settings.ensure_dirs()
    partition = WarehouseLayout(settings.warehouse_dir).customer_tags.path(AS_OF)
    with closing(connect()) as con:
        con.execute("SET enable_progress_bar = false")
        if not partition.exists():
            started = time.perf_counter()
            rows = write_synthetic_partition(con, load_catalog(settings.catalog_path), partition, AS_OF, customers)
            print(f"# wrote {rows:,} tag rows in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        if not settings.online_store_path.exists():
            started = time.perf_counter()
            snapshot = SQLiteOnlineStore(settings.online_store_path).refresh(con, ParquetTagStore.in_warehouse(settings.warehouse_dir))
            print(f"# loaded the online store ({snapshot.customers:,} customers) in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.conftest import publish_tags

    publish_tags(settings)
    with suppress(ApiKeyError):  # a key of an earlier run: its secret is gone
        revoke_key(settings.api_keys_path, "bench")
    key = create_key(settings.api_keys_path, "bench", ["read:tags", "read:confidential"])[0]
    return env, key


def wait_for(url: str, process: subprocess.Popen, seconds: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.TransportError:
            time.sleep(0.3)
    raise SystemExit(f"{url} did not answer")


def parse_wrk(text: str) -> dict[str, float]:
    def ms(value: str) -> float:
        number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", value).groups()
        return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    latency = dict(re.findall(r"^\s*(50|99)%\s+([\d.]+(?:us|ms|s))\s*$", text, re.MULTILINE))
    if set(latency) != {"50", "99"}:
        raise SystemExit(f"wrk's output not understood:\n{text}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    requests = int(re.search(r"(\d+) requests in", text).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    socket_errors = re.search(r"Socket errors: (.*)", text)
    return {
        "p50_ms": round(ms(latency["50"]), 3),
        "p99_ms": round(ms(latency["99"]), 3),
        "rps": round(rps, 1),
        "requests": requests,
        "non_2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else "",
    }


def load(url: str, key: str, customers: int, connections: int, seconds: int) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(LUA % {"seed": 13, "last": customers - 1, "key": key})
    try:
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script.name, url], check=True, capture_output=True, text=True
        ).stdout
    finally:
        os.unlink(script.name)
    return parse_wrk(out)


def serve(command: list[str], env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    with open(log, "w") as handle:
        process = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(f"http://127.0.0.1:{port}/health", process)
    return process


def serve_baseline(port: int) -> None:
    """The old path behind the same endpoint: DuckDB over the Parquet partition, a connection per worker thread."""
    import threading

    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import Response

    from tagml.compliance.lifecycle import published_tags
    from tagml.core.governance import GovernanceStore
    from tagml.core.settings import Settings
    from tagml.core.storage import connect
    from tagml.scoring.lookup import customer_tags
    from tagml.scoring.store import ParquetTagStore
    from tagml.training.catalog import load_catalog

    settings = Settings.from_env()
    store = ParquetTagStore.in_warehouse(settings.warehouse_dir)
    published = published_tags(GovernanceStore(settings.governance_db), load_catalog(settings.catalog_path))
    local = threading.local()
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/customers/{customer_id}/tags")
    def tags(customer_id: str) -> Response:
        if not hasattr(local, "con"):
            local.con = connect(threads=1)
        return Response(json.dumps(customer_tags(local.con, store, customer_id, published=published)).encode(), media_type="application/json")

    uvicorn.run(app, host="127.0.0.1", port=port, access_log=False, log_level="warning")


def uptime() -> str:
    return subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench-api")
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--baseline-seconds", type=int, default=None, help="default: --seconds")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--serve-baseline", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_baseline:
        serve_baseline(args.serve_baseline)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    env, key = prepare(args.work, args.customers)
    results = []
    # the store as the nightly refresh leaves it: just written, so in the page cache (a cold 4.6 GB file read at random
    # from this VM's disk costs tens of ms per lookup); read it once so that every run starts the same
    started = time.perf_counter()
    with open(Path(env["TAGML_HOME"]) / "online" / "tags.sqlite", "rb") as handle:
        while handle.read(1 << 24):
            pass
    print(f"# read the online store file into the page cache in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    runs = [("online store (tagml serve)", [sys.executable, "-m", "tagml.cli", "serve", "--port"])]
    if not args.skip_baseline:
        runs.append(("DuckDB over Parquet (baseline)", [sys.executable, str(Path(__file__).resolve()), "--serve-baseline"]))
    for name, command in runs:
        port = free_port()
        process = serve([*command, str(port)], env, port, args.work / f"server-{port}.log")
        try:
            url = f"http://127.0.0.1:{port}"
            load(url, key, args.customers, 1, 3)  # warm-up: imports, first connections, page cache
            for connections in args.connections:
                seconds = args.seconds if "baseline" not in name else (args.baseline_seconds or args.seconds)
                before = uptime()
                result = {"server": name, "connections": connections, "seconds": seconds, **load(url, key, args.customers, connections, seconds)}
                result["uptime_before"], result["uptime_after"] = before, uptime()
                results.append(result)
                print(json.dumps(result), flush=True)
        finally:
            os.killpg(process.pid, 15)
            process.wait(20)
    by = {(r["server"].split(" ")[0], r["connections"]): r for r in results}
    for connections in args.connections:
        online, baseline = by.get(("online", connections)), by.get(("DuckDB", connections))
        if online and baseline:
            print(
                json.dumps(
                    {
                        "connections": connections,
                        "p99_ratio_baseline_over_online": round(baseline["p99_ms"] / online["p99_ms"], 1),
                        "rps_ratio_online_over_baseline": round(online["rps"] / baseline["rps"], 1),
                    }
                )
            )


if __name__ == "__main__":
    main()
