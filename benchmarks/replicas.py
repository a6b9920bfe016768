"""Read throughput of one server: the primary alone against the primary plus a replica.

    python benchmarks/replicas.py            # 0 and 0.5 ms each way, 3 rounds of 10 s: ~8 min
    python benchmarks/replicas.py --quick    # a smoke run: about 2 minutes
    python benchmarks/replicas.py --latency 0.5 --rounds 5

What it runs, all on 127.0.0.1:

- a PostgreSQL primary and a ``pg_basebackup -R`` streaming replica of it
  (``tests/replication.py``), a table of ``replica_apps.ROWS`` rows written on the primary
  and replayed by the replica before anything is measured;
- one ``latency_proxy.py`` in front of each server, delaying every chunk by D ms each way;
- one uvicorn server of ``replica_apps.py`` per variant, sync endpoints reading one page
  of rows through ``ASGISessionMiddleware``: **A** ``request_scoped(factory)``, the primary
  alone; **B** ``request_scoped(factory, replicas=[replica])``, whose GETs read the
  replica; **C** the same routing with its "replica" engine on the primary, which
  separates the routing's own cost (C against A) from reading on a standby (B against C);
- ``loadgen.py`` in its own process, 50 keep-alive clients on ``/page``.

The variants run one after the other, A B C A B C..., for each latency. Around every run the
transactions each server committed or rolled back in the benchmark's database
(``pg_stat_database``) are counted: where the reads went is asked of PostgreSQL, not
inferred. It writes ``benchmarks/results/replicas.md`` and ``replicas.json``;
``python benchmarks/replica_report.py`` redraws the Markdown from the JSON.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT))  # tests.replication

from common import RESULTS, Base, Item, machine, version  # noqa: E402
from network import (  # noqa: E402
    DEFAULT_POOL,
    LatencyProxy,
    Processes,
    Settings,
    _on_signal,
    free_port,
    load,
    round_trip_ms,
    uvicorn_stack,
    wait_ready,
)

from replica_apps import PAGE, ROWS  # noqa: E402
from tests.replication import ReplicationPair, query, start_pair, stop_pair  # noqa: E402

LATENCIES_MS = (0.0, 0.5)
READ_PATH = "/page"
FULL = Settings(seconds=10.0, warmup=1.0, rounds=3, prime=2.0)
QUICK = Settings(seconds=2.0, warmup=0.5, rounds=1, prime=0.5)
#: PostgreSQL 15 publishes a busy backend's statistics at most once a second and, once
#: it is idle, up to 10 s later: the counts after a run wait that long, or the next run
#: (the other variant, on the same primary) would be charged with this one's reads.
STATS_SETTLE_S = 11.0
PACKAGES = ("sessionmw", "SQLAlchemy", "psycopg", "starlette", "uvicorn", "anyio")


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    #: The server the ``replicas=`` engine reaches ("": no ``replicas=``).
    replicas_on: str
    #: The server its reads must reach, checked before the variant is measured.
    reads_from: str


VARIANTS = (
    Variant("A", "primary alone: request_scoped(factory)", "", "primary"),
    Variant(
        "B", "primary + replica: request_scoped(factory, replicas=[replica])", "replica", "replica"
    ),
    # The routing without a second server: B against C is reading on a standby, C against
    # A the cost of routing itself.
    Variant(
        "C",
        "routing, no replica: request_scoped(factory, replicas=[an engine on the primary])",
        "primary",
        "primary",
    ),
)


def fill(pair: ReplicationPair, database: str) -> str:
    """The table, written on the primary and replayed by the replica; PostgreSQL's version.

    Vacuumed, and the vacuum replayed, before any read: nothing is left for autovacuum
    to clean up while the replica reads (a cleanup can cancel a standby's queries).
    """
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    engine = create_engine(pair.primary.url("psycopg", database))
    Base.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        session.add_all(Item(id=i, name=f"item-{i}") for i in range(1, ROWS + 1))
    engine.dispose()
    query(pair.primary, "vacuum analyze item", database)
    pair.wait_for_replay()
    return str(query(pair.primary, "show server_version"))


def transactions(pair: ReplicationPair, database: str) -> dict[str, int]:
    """Transactions each server has finished in ``database``, by its own statistics."""
    sql = f"select xact_commit + xact_rollback from pg_stat_database where datname = '{database}'"
    return {"primary": int(query(pair.primary, sql)), "replica": int(query(pair.replica, sql))}


def server_command(port: int) -> list[str]:
    return [
        sys.executable, "-m", "uvicorn", "--factory", "replica_apps:app",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--log-level", "warning", "--no-access-log", "--lifespan", "off",
    ]  # fmt: skip


def start_servers(
    processes: Processes, env: dict[str, str], urls: dict[str, str], logs: Path
) -> dict[str, tuple[int, int]]:
    """One uvicorn per variant, each checked to read where it should: variant -> (port, pid)."""
    servers = {}
    for variant in VARIANTS:
        for attempt in range(3):
            port = free_port()
            log = logs / f"{variant.key}.log"
            with log.open("wb") as output:
                child = processes.spawn(
                    server_command(port),
                    cwd=HERE,
                    env=dict(env, BENCH_REPLICA_URL=urls.get(variant.replicas_on, "")),
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                )
            expect = {"/where": variant.reads_from.encode()}
            error = wait_ready(port, child, log, timeout=60, expect=expect)
            if not error:
                break
            processes.stop(child)
            if "address already in use" not in error.lower() or attempt == 2:
                raise RuntimeError(f"server {variant.key}: {error}")
        servers[variant.key] = (port, child.pid)
    return servers


def cpu_seconds(pid: int) -> float:
    """User + system CPU time process ``pid`` has used (Linux): unlike req/s, hardly moved
    by what else the machine runs."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run, 1 round of 2 s")
    parser.add_argument(
        "--latency", type=float, action="append", help="ms each way (repeatable); default 0, 0.5"
    )
    parser.add_argument("--seconds", type=float, help="measured seconds per run")
    parser.add_argument("--rounds", type=int, help="runs of each variant per latency")
    parser.add_argument("--clients", type=int, default=50, help="keep-alive clients on /page")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where results go")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    base = QUICK if args.quick else FULL
    settings = Settings(
        seconds=args.seconds or base.seconds,
        warmup=base.warmup,
        rounds=args.rounds or base.rounds,
        prime=base.prime,
    )
    latencies = tuple(args.latency) if args.latency else LATENCIES_MS
    started = time.perf_counter()
    results: dict[str, Any] = {
        "kind": "replicas",
        "mode": "quick" if args.quick else "full",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "settings": {
            **asdict(settings),
            "latencies_ms": list(latencies),
            "clients": args.clients,
            "stats_settle_s": STATS_SETTLE_S,
            "pool": DEFAULT_POOL,
            "rows": ROWS,
            "page": PAGE,
            "uvicorn_stack": uvicorn_stack(),
        },
        "variants": [asdict(v) for v in VARIANTS],
        "versions": {p: version(p) for p in PACKAGES},
    }
    processes = Processes()
    atexit.register(processes.close)
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    logs = Path(tempfile.mkdtemp(prefix="sessionmw-replicas-"))
    pair: ReplicationPair | None = None
    try:
        print("starting a PostgreSQL primary and its streaming replica", flush=True)
        started_pair = start_pair()
        if isinstance(started_pair, str):
            raise RuntimeError(started_pair)
        pair = started_pair
        run_all(args, settings, latencies, pair, processes, logs, results)
    except (KeyboardInterrupt, SystemExit):
        print("interrupted: stopping every process this run started", flush=True)
        raise
    finally:
        processes.close()  # the servers and proxies first, then PostgreSQL
        if pair is not None:
            stop_pair(pair)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(logs, ignore_errors=True)
    results["duration_s"] = round(time.perf_counter() - started, 1)
    results["machine"]["load_end"] = f"{os.getloadavg()[0]:.2f}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "replicas.json").write_text(json.dumps(results, indent=1) + "\n")
    from replica_report import write_report

    written = write_report(results, args.out)
    print(f"done in {results['duration_s']:.0f} s: " + ", ".join(str(p) for p in written))
    return 0


def run_all(
    args: argparse.Namespace,
    settings: Settings,
    latencies: tuple[float, ...],
    pair: ReplicationPair,
    processes: Processes,
    logs: Path,
    results: dict[str, Any],
) -> None:
    database = pair.create_database()
    results["versions"]["PostgreSQL"] = fill(pair, database)
    proxies = {
        "primary": LatencyProxy(processes, pair.primary.port),
        "replica": LatencyProxy(processes, pair.replica.port),
    }

    def through(proxy: LatencyProxy) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{proxy.port}/{database}"

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    env["BENCH_SYNC_URL"] = through(proxies["primary"])
    env["BENCH_POOL"] = json.dumps(DEFAULT_POOL)
    print("starting the servers", flush=True)
    urls = {name: through(proxy) for name, proxy in proxies.items()}
    servers = start_servers(processes, env, urls, logs)

    def run(variant: Variant, seconds: float) -> dict[str, Any]:
        port = servers[variant.key][0]
        return load(port, settings, args.clients, 0, seconds, db_path=READ_PATH)

    for variant in VARIANTS:  # fills the pools and warms the caches before measuring
        run(variant, settings.prime)
    time.sleep(STATS_SETTLE_S)

    results["latencies"] = []
    for delay in latencies:
        for proxy in proxies.values():
            proxy.set_delay(delay)
        phase: dict[str, Any] = {
            "delay_ms": delay,
            "rtt_ms": {name: round(round_trip_ms(p.port), 3) for name, p in proxies.items()},
            "runs": [],
        }
        results["latencies"].append(phase)
        print(
            f"latency {delay:g} ms each way (SELECT 1 round trip "
            f"{phase['rtt_ms']['primary']:.2f} ms): {len(VARIANTS)} variants x "
            f"{settings.rounds} rounds",
            flush=True,
        )
        for n in range(settings.rounds):
            for variant in VARIANTS:
                pid = servers[variant.key][1]
                before, cpu_before = transactions(pair, database), cpu_seconds(pid)
                measured = run(variant, settings.seconds)[READ_PATH]
                time.sleep(STATS_SETTLE_S)
                after, cpu = transactions(pair, database), cpu_seconds(pid) - cpu_before
                served = {k: after[k] - before[k] for k in after}
                record = {
                    "round": n,
                    "variant": variant.key,
                    **measured,
                    "transactions": served,
                    # every request of the run, warm-up included, is one transaction
                    "server_cpu_us": 1e6 * cpu / max(1, sum(served.values())),
                }
                phase["runs"].append(record)
                print(
                    f"  [{n + 1}/{settings.rounds}] {variant.key} {measured['rps']:7.0f} req/s"
                    f"  p50 {measured['p50_ms']:6.1f} ms  p99 {measured['p99_ms']:6.1f} ms"
                    f"  errors {measured['errors']}  transactions on primary "
                    f"{record['transactions']['primary']}, on replica "
                    f"{record['transactions']['replica']}  server CPU "
                    f"{record['server_cpu_us']:.0f} µs/req",
                    flush=True,
                )


if __name__ == "__main__":
    sys.exit(main())
