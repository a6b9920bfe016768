"""Where a sync request's transaction ends, and what that costs across a network.

uvicorn serves a Starlette app whose ``def`` endpoint runs one primary-key SELECT;
PostgreSQL sits behind ``latency_proxy.py`` (2 ms each way by default); the load
generator keeps 50 clients on ``/one`` and 5 on ``/none``, which never touches the
database.  The rows differ only in where the transaction ends:

- hand-written: inside the endpoint's thread (``with Session() as s``);
- sessionmw ``"manual"`` / ``"on_success"``: after the endpoint returned, by the
  middleware (the commit or the close of a Session holding a connection is a hop off the
  event loop);
- the same with the endpoint decorated with ``@sessionmw.ends_in_thread``: the policy
  decides and the Session closes in the endpoint's thread, so the middleware has nothing
  left that needs a round trip.

Every row is interleaved in each round.  Besides throughput and latency it reports how
long a connection stays checked out per request (pool events), the steadiest of the
figures on a shared machine, and where that time goes: in the endpoint's thread, waiting
for the event loop's turn, or after the response started::

    python benchmarks/ending.py                  # SQLAlchemy's default pool, 5 + 10
    python benchmarks/ending.py --pool 60+0 --out benchmarks/results/ending-pool60.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import network  # noqa: E402 - after the path is set

VARIANTS = (
    ("hand", "hand-written: ends in the endpoint's thread"),
    ("sessionmw_manual", 'sessionmw "manual"'),
    ("sessionmw_on_success", 'sessionmw "on_success"'),
    ("sessionmw_manual_ends_in_thread", 'sessionmw "manual", @ends_in_thread'),
    ("sessionmw_on_success_ends_in_thread", 'sessionmw "on_success", @ends_in_thread'),
)


#: Where the connection's hold goes (``ending_apps.Moments``), in ms per request.
SEGMENTS = ("in_endpoint", "loop_turn", "after_start")


def stats(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as reply:
        result: dict[str, float] = json.load(reply)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", default="5+10", help="pool_size+max_overflow")
    parser.add_argument("--latency", type=float, default=2.0, help="ms each way")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "ending.md")
    args = parser.parse_args(argv)
    settings = network.Settings(seconds=args.seconds, warmup=0.6, rounds=args.rounds, prime=1.0)
    processes = network.Processes()
    try:
        pg, _ = network.start_postgres(processes)
        proxy = network.LatencyProxy(processes, pg.port)
        proxy.set_delay(args.latency)
        env = {
            **os.environ,
            "PYTHONPATH": str(HERE),
            "BENCH_SYNC_URL": f"postgresql+psycopg://postgres@127.0.0.1:{proxy.port}/postgres",
            "BENCH_POOL": json.dumps(network.parse_pool(args.pool)),
        }
        ports: dict[str, int] = {}
        logs = Path(tempfile.mkdtemp(prefix="sessionmw-ending-"))
        for key, _ in VARIANTS:
            port = network.free_port()
            log = logs / f"{key}.log"
            with log.open("wb") as output:
                child = processes.spawn(
                    [sys.executable, "-m", "uvicorn", "--factory", "ending_apps:app",
                     "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
                     "--no-access-log"],
                    cwd=HERE, env={**env, "BENCH_VARIANT": key}, stdin=subprocess.DEVNULL,
                    stdout=output, stderr=subprocess.STDOUT,
                )  # fmt: skip
            error = network.wait_ready(port, child, log, timeout=60)
            if error:
                raise SystemExit(f"{key}: {error}")
            ports[key] = port
        for port in ports.values():  # fills the pools, warms the caches
            network.load(port, settings, 50, 5, settings.prime)
        runs: dict[str, list[dict[str, float]]] = {key: [] for key, _ in VARIANTS}
        for n in range(args.rounds):
            order = list(ports)
            random.shuffle(order)
            for key in order:
                port = ports[key]
                stats(port)  # resets the hold times
                result = network.load(port, settings, 50, 5, args.seconds)
                after = stats(port)
                one, none = result[network.DB_PATH], result[network.NO_DB_PATH]
                runs[key].append({
                    "rps": one["rps"],
                    "p99_ms": one["p99_ms"],
                    "nodb_p99_ms": none["p99_ms"],
                    "held_ms": 1000 * after["seconds"] / max(after["checkouts"], 1),
                    **{segment: after[segment] for segment in SEGMENTS},
                })  # fmt: skip
                print(f"  [{n + 1}/{args.rounds}] {key:44} {one['rps']:6.0f} req/s", flush=True)
        table = report(runs, args)
        print(table)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
        saved = {**vars(args), "out": str(args.out), "runs": runs}
        args.out.with_suffix(".json").write_text(json.dumps(saved, indent=1))
    finally:
        processes.close()
    return 0


def report(runs: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> str:
    reference = runs["hand"]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True
    ).stdout.strip()
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"{when}, sessionmw at {commit or 'an unknown commit'}, `python benchmarks/ending.py "
        f"{' '.join(sys.argv[1:])}`.".replace(" `.", "`."),
        "",
        f"Starlette `def` endpoint, one SELECT, uvicorn; PostgreSQL {args.latency:g} ms away "
        f"each way; pool {args.pool}; 50 + 5 clients; {args.rounds} rounds of {args.seconds:g} s, "
        "interleaved. req/s: mean over rounds; x ref: median over rounds of the ratio to the "
        "hand-written row of the same round; connection held: median over rounds of the mean "
        "time from checkout to checkin, then split: in the endpoint's thread; waiting for the "
        "event loop to take the endpoint's result and start the response; after that start.",
        "",
        "| row | req/s | x ref | DB p99 x ref | no-DB p99 x ref | connection held "
        "| in endpoint | loop's turn | after start |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for key, label in VARIANTS:
        mine = runs[key]

        def ratio(field: str, mine: list[dict[str, float]] = mine) -> float:
            pairs = zip(mine, reference, strict=True)
            return statistics.median(a[field] / b[field] for a, b in pairs)

        lines.append(
            f"| {label} | {statistics.mean(r['rps'] for r in mine):.0f} | {ratio('rps'):.2f} "
            f"| {ratio('p99_ms'):.2f} | {ratio('nodb_p99_ms'):.2f} "
            f"| {statistics.median(r['held_ms'] for r in mine):.1f} ms | "
            + " | ".join(f"{statistics.median(r[s] for r in mine):.1f}" for s in SEGMENTS)
            + " |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
