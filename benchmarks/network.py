"""Networked mode: real servers, a real PostgreSQL, and a network's latency in between.

    python benchmarks/network.py               # 0, 0.5 and 2 ms each way: about 9 minutes
    python benchmarks/network.py --quick       # a smoke run: about 2 minutes
    python benchmarks/network.py --latency 2 --only sessionmw --seconds 5

The in-process benchmark (``run.py``) uses a SQLite file, where a query costs microseconds
and so does the ROLLBACK that closing a Session sends. Across a network that ROLLBACK is a
round trip, and whether it runs on the event loop or in a worker thread decides how many
requests a server can serve. This mode measures that, the way production runs:

- PostgreSQL, started here (``tests/postgres.py``), reached over TCP through
  ``latency_proxy.py``: its own process, delaying every chunk by D ms each way;
- one server process per variant, all started at once: uvicorn (1 worker) serving FastAPI
  apps with sync ``def`` endpoints for a sync Session and ``async def`` endpoints for an
  AsyncSession, and gunicorn's gthread worker (1 worker, 16 threads) serving Flask apps
  (``net_apps.py``);
- ``loadgen.py`` in its own process: 50 keep-alive clients on the database route and, at
  the same time, 5 on a route that never touches the database; that route's p99 is the
  event loop's lag under load.

Every row runs once per round, rounds in a shuffled order, for each latency in turn. It
writes ``benchmarks/results/network.md``, ``network.json`` (every run) and ``network.png``;
``python benchmarks/net_report.py`` redraws them from the JSON. Every process it starts
(PostgreSQL, the proxy, the servers, the load generator) is stopped when it ends, also on
an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import ctypes.util
import importlib.util
import json
import os
import random
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT))  # tests.postgres

from common import RESULTS, Base, Item, machine, version  # noqa: E402

LATENCIES_MS = (0.0, 0.5, 2.0)
DB_PATH, NO_DB_PATH = "/one", "/none"
GUNICORN_THREADS = 16
#: The same for every engine of every variant: 60 connections, as many as 20 + 40 overflow,
#: but all kept. With overflow, a connection beyond pool_size is closed when it is returned
#: and reopened by the next request, and through a 2 ms link plus a backend fork that
#: costs more than the request: the runs would measure connection set-up, not sessions.
DEFAULT_POOL = {"pool_size": 60, "max_overflow": 0, "pool_timeout": 10}
#: fastapi-sqla pins FastAPI below the version the rest runs on: it gets a virtualenv of
#: its own (built once, from requirements-fastapi-sqla.txt), with a hand-written row beside
#: it on the same FastAPI.
SIDE_VENV = Path(
    os.environ.get(
        "SESSIONMW_FASTAPI_SQLA_VENV",
        Path.home() / ".cache" / "sessionmw-benchmarks" / "fastapi-sqla-venv",
    )
)
SIDE_REQUIREMENTS = HERE / "requirements-fastapi-sqla.txt"
PACKAGES = (
    "sessionmw", "SQLAlchemy", "psycopg", "asyncpg", "anyio", "starlette", "fastapi",
    "uvicorn", "h11", "Flask", "gunicorn", "advanced-alchemy", "Flask-SQLAlchemy",
)  # fmt: skip


@dataclass(frozen=True)
class Row:
    key: str
    server: str  # "uvicorn" or "gunicorn"
    group: str  # rows are shown, and compared, within a group
    label: str
    flavor: str  # "sync" or "async"
    role: str  # "reference", "sessionmw", "peer" or "control" (the same as its reference)
    builder: str  # a function of net_apps.py
    reference: str | None  # the key of the hand-written row it is compared with
    venv: str = "main"  # or "fastapi-sqla"


FASTAPI = "FastAPI on uvicorn"
SIDE = "FastAPI on uvicorn, fastapi-sqla's virtualenv"
FLASK = "Flask on gunicorn gthread"

ROWS = (
    Row("fastapi-hand-sync", "uvicorn", FASTAPI, "hand-written sync", "sync", "reference",
        "fastapi_hand_sync", None),
    Row("fastapi-hand-sync-aa", "uvicorn", FASTAPI, "hand-written sync, a second server (A/A)",
        "sync", "control", "fastapi_hand_sync", "fastapi-hand-sync"),
    Row("fastapi-depends-def", "uvicorn", FASTAPI, "Depends, tutorial def get_db (sync)",
        "sync", "peer", "fastapi_depends_def", "fastapi-hand-sync"),
    Row("fastapi-sessionmw-sync-manual", "uvicorn", FASTAPI, 'sessionmw sync, "manual"',
        "sync", "sessionmw", "fastapi_sessionmw_sync_manual", "fastapi-hand-sync"),
    Row("fastapi-sessionmw-sync-on_success", "uvicorn", FASTAPI, 'sessionmw sync, "on_success"',
        "sync", "sessionmw", "fastapi_sessionmw_sync_on_success", "fastapi-hand-sync"),
    Row("fastapi-sessionmw-sync-manual-in-thread", "uvicorn", FASTAPI,
        'sessionmw sync, "manual", @ends_in_thread', "sync", "sessionmw",
        "fastapi_sessionmw_sync_manual_in_thread", "fastapi-hand-sync"),
    Row("fastapi-sessionmw-sync-on_success-in-thread", "uvicorn", FASTAPI,
        'sessionmw sync, "on_success", @ends_in_thread', "sync", "sessionmw",
        "fastapi_sessionmw_sync_on_success_in_thread", "fastapi-hand-sync"),
    Row("fastapi-sessionmw-sync-on_success-depends", "uvicorn", FASTAPI,
        'sessionmw sync, "on_success", Depends(get_db)', "sync", "sessionmw",
        "fastapi_sessionmw_sync_on_success_depends", "fastapi-hand-sync"),
    Row("fastapi-advanced-alchemy-sync", "uvicorn", FASTAPI, "advanced-alchemy sync", "sync",
        "peer", "fastapi_advanced_alchemy_sync", "fastapi-hand-sync"),
    Row("fastapi-hand-async", "uvicorn", FASTAPI, "hand-written async", "async", "reference",
        "fastapi_hand_async", None),
    Row("fastapi-sessionmw-async-manual", "uvicorn", FASTAPI, 'sessionmw async, "manual"',
        "async", "sessionmw", "fastapi_sessionmw_async_manual", "fastapi-hand-async"),
    Row("fastapi-sessionmw-async-on_success", "uvicorn", FASTAPI,
        'sessionmw async, "on_success"', "async", "sessionmw",
        "fastapi_sessionmw_async_on_success", "fastapi-hand-async"),
    Row("fastapi-sessionmw-async-on_success-depends", "uvicorn", FASTAPI,
        'sessionmw async, "on_success", Depends(get_db)', "async", "sessionmw",
        "fastapi_sessionmw_async_on_success_depends", "fastapi-hand-async"),
    Row("fastapi-advanced-alchemy-async", "uvicorn", FASTAPI, "advanced-alchemy async",
        "async", "peer", "fastapi_advanced_alchemy_async", "fastapi-hand-async"),
    Row("fastapi-sqla-venv-hand-sync", "uvicorn", SIDE, "hand-written sync", "sync",
        "reference", "fastapi_hand_sync", None, "fastapi-sqla"),
    Row("fastapi-sqla-sync", "uvicorn", SIDE, "fastapi-sqla sync", "sync", "peer",
        "fastapi_sqla_sync", "fastapi-sqla-venv-hand-sync", "fastapi-sqla"),
    Row("flask-hand", "gunicorn", FLASK, "hand-written", "sync", "reference", "flask_hand",
        None),
    Row("flask-sessionmw-manual", "gunicorn", FLASK, 'sessionmw, "manual"', "sync",
        "sessionmw", "flask_sessionmw_manual", "flask-hand"),
    Row("flask-sessionmw-on_success", "gunicorn", FLASK, 'sessionmw, "on_success"', "sync",
        "sessionmw", "flask_sessionmw_on_success", "flask-hand"),
    Row("flask-sqlalchemy", "gunicorn", FLASK, "Flask-SQLAlchemy", "sync", "peer",
        "flask_sqlalchemy", "flask-hand"),
)  # fmt: skip


@dataclass(frozen=True)
class Settings:
    seconds: float  # measured, per load run
    warmup: float  # per load run, before measuring
    rounds: int
    prime: float  # one unmeasured run per server before the first latency


FULL = Settings(seconds=2.5, warmup=0.6, rounds=3, prime=1.0)
QUICK = Settings(seconds=1.0, warmup=0.4, rounds=1, prime=0.3)


# --- processes: every one is stopped on exit --------------------------------------------------


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the benchmark dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Processes:
    """What this run started, stopped in reverse order by ``close()`` (also atexit)."""

    def __init__(self) -> None:
        self.children: list[subprocess.Popen[Any]] = []
        self.postgres: Any = None
        self.closed = False

    def spawn(self, command: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        child = subprocess.Popen(
            command, start_new_session=True, preexec_fn=_die_with_parent, **kwargs
        )
        self.children.append(child)
        return child

    def stop(self, child: subprocess.Popen[Any], timeout: float = 10.0) -> None:
        if child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGTERM)  # gunicorn: its worker too
            try:
                child.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                child.wait()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for child in reversed(self.children):
            if child.stdin:
                with contextlib.suppress(OSError):
                    child.stdin.close()
        for child in reversed(self.children):
            self.stop(child)
        if self.postgres is not None:
            from tests.postgres import stop_server

            stop_server(self.postgres)
            self.postgres = None


def _on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks


# --- PostgreSQL and the proxy ------------------------------------------------------------


def start_postgres(processes: Processes) -> Any:
    from tests.postgres import start_server

    server = start_server()
    if isinstance(server, str):
        raise RuntimeError(server)
    processes.postgres = server
    # Every server keeps its pool: up to 15 x 60 connections, more than the tests' 300.
    with open(server.datadir / "postgresql.conf", "a") as conf:
        conf.write("max_connections = 1000\n")
    server.restart()
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import Session

    engine = create_engine(server.url("psycopg"))
    Base.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        session.add_all(Item(id=i, name=f"item-{i}") for i in range(1, 101))
    with engine.connect() as conn:
        conn.execute(text("ANALYZE item"))
        pg_version = conn.execute(text("SHOW server_version")).scalar_one()
    engine.dispose()
    return server, str(pg_version)


class LatencyProxy:
    def __init__(self, processes: Processes, target_port: int) -> None:
        self.process = processes.spawn(
            [sys.executable, str(HERE / "latency_proxy.py"), str(target_port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        first = self._line(10)
        if not first.startswith("listening "):
            raise RuntimeError(f"the latency proxy said {first!r}")
        self.port = int(first.split()[1])

    def _line(self, timeout: float) -> str:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            raise RuntimeError("the latency proxy did not answer")
        line: str = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the latency proxy exited ({self.process.poll()})")
        return line.strip()

    def command(self, line: str) -> str:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        return self._line(10)

    def set_delay(self, ms: float) -> None:
        self.command(f"delay {ms}")

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = json.loads(self.command("stats"))
        return stats


def round_trip_ms(port: int, count: int = 200) -> float:
    """Median ``SELECT 1`` round trip seen by psycopg, through ``port``."""
    import psycopg

    with psycopg.connect(
        host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True
    ) as conn:
        for _ in range(20):
            conn.execute("SELECT 1")
        times = []
        for _ in range(count):
            began = time.perf_counter()
            conn.execute("SELECT 1").fetchone()
            times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


# --- fastapi-sqla's virtualenv -----------------------------------------------------------


def side_python(venv: Path) -> tuple[Path | None, str]:
    """The fastapi-sqla virtualenv's python, built on first use; else (None, why not)."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import fastapi_sqla, uvicorn, psycopg, sqlalchemy.ext.asyncio"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python, ""
    print(f"  building fastapi-sqla's virtualenv in {venv} (once)", flush=True)
    try:
        shutil.rmtree(venv, ignore_errors=True)
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "-r", str(SIDE_REQUIREMENTS)],
            check=True,
            timeout=600,
            capture_output=True,
            text=True,
        )
        subprocess.run(probe, check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = (getattr(exc, "stderr", "") or "").strip().splitlines()[-1:] or [str(exc)]
        return None, f"its virtualenv could not be built: {detail[0][:200]}"
    return python, ""


def side_versions(python: Path) -> dict[str, str]:
    code = (
        "import json; from importlib import metadata as m; print(json.dumps({p: m.version(p) "
        "for p in ('fastapi-sqla', 'fastapi', 'starlette', 'SQLAlchemy', 'uvicorn', 'psycopg')"
        "}))"
    )
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    versions: dict[str, str] = json.loads(out.stdout)
    return versions


# --- servers ------------------------------------------------------------------------------


def free_port() -> int:
    """A free port *below* the kernel's ephemeral range.

    A port the kernel handed out for ``bind(0)`` can be handed out again, to any outgoing
    connection, before the server binds it; and this run opens hundreds (the proxy's, the
    load generator's) while 16 servers start. Below the range, only an explicit bind can
    take it, and a server that still loses the race is started again on another port.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found")


def server_command(row: Row, python: Path, port: int) -> list[str]:
    if row.server == "uvicorn":
        return [
            str(python), "-m", "uvicorn", "--factory", "net_apps:app",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--log-level", "warning", "--no-access-log", "--lifespan", "auto",
        ]  # fmt: skip
    return [
        str(python), "-m", "gunicorn", "--worker-class", "gthread", "--workers", "1",
        "--threads", str(GUNICORN_THREADS), "--bind", f"127.0.0.1:{port}",
        "--log-level", "warning", "net_apps:app()",
    ]  # fmt: skip


def get(port: int, path: str) -> tuple[int, bytes]:
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


#: What every app of this benchmark answers once it is loaded: path -> body.
READY = {DB_PATH: b"item-1", NO_DB_PATH: b"ok"}


def wait_ready(
    port: int,
    process: subprocess.Popen[Any],
    log: Path,
    timeout: float,
    expect: Mapping[str, bytes] = READY,
) -> str:
    """'' once every route of ``expect`` answers 200 with its body, else why not: a bound
    port is not a loaded app."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            return f"server exited with {process.returncode}: " + " / ".join(tail)[-300:]
        try:
            for path, wanted in expect.items():
                status, body = get(port, path)
                if status != 200 or body != wanted:
                    last = f"{path} answered {status} {body[:100]!r}"
                    break
            else:
                return ""
        except (OSError, ValueError, IndexError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.2)
    tail = log.read_text(errors="replace").strip().splitlines()[-2:]
    return f"not ready in {timeout:.0f} s ({last}) " + " / ".join(tail)[-300:]


@dataclass
class Running:
    row: Row
    port: int = 0
    error: str = ""


def load(
    port: int,
    settings: Settings,
    db_clients: int,
    nodb_clients: int,
    seconds: float,
    db_path: str = DB_PATH,
) -> dict[str, Any]:
    command = [
        sys.executable, str(HERE / "loadgen.py"), "--mix", str(port), str(seconds),
        str(settings.warmup), f"{db_path}={db_clients}", f"{NO_DB_PATH}={nodb_clients}",
    ]  # fmt: skip
    out = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=seconds + settings.warmup + 60,
        check=True,
        preexec_fn=_die_with_parent,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def uvicorn_stack() -> str:
    """uvicorn picks uvloop and httptools only if they are installed."""
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"{loop} + {http}"


def parse_pool(text: str) -> dict[str, int]:
    size, _, overflow = text.partition("+")
    return {"pool_size": int(size), "max_overflow": int(overflow or 0), "pool_timeout": 10}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run, about 2 minutes")
    parser.add_argument(
        "--latency",
        type=float,
        action="append",
        help="ms each way (repeatable); default: 0, 0.5 and 2",
    )
    parser.add_argument("--only", help="only the rows whose key contains this text")
    parser.add_argument("--seconds", type=float, help="measured seconds per load run")
    parser.add_argument("--rounds", type=int, help="runs of every row per latency")
    parser.add_argument("--db-clients", type=int, default=50)
    parser.add_argument("--nodb-clients", type=int, default=5)
    parser.add_argument(
        "--pool", type=parse_pool, default=None, help="pool_size+max_overflow, default 60+0"
    )
    parser.add_argument("--seed", type=int, default=1, help="of the shuffled run order")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where results go")
    parser.add_argument(
        "--fastapi-sqla-venv",
        type=Path,
        default=SIDE_VENV,
        help="fastapi-sqla's virtualenv (built there on first use)",
    )
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
    pool = args.pool or DEFAULT_POOL
    chosen = {r.key for r in ROWS if not args.only or args.only in r.key}
    if not chosen:
        print(f"no row's key contains {args.only!r}")
        return 2
    chosen |= {r.reference for r in ROWS if r.key in chosen and r.reference}
    rows = [r for r in ROWS if r.key in chosen]  # with their references, for the ratios
    started = time.perf_counter()
    results: dict[str, Any] = {
        "kind": "network",
        "mode": "quick" if args.quick else "full",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "settings": {
            **asdict(settings),
            "latencies_ms": list(latencies),
            "db_clients": args.db_clients,
            "nodb_clients": args.nodb_clients,
            "pool": pool,
            "gunicorn_threads": GUNICORN_THREADS,
            "uvicorn_stack": uvicorn_stack(),
            "seed": args.seed,
        },
        "versions": {p: version(p) for p in PACKAGES},
        "notes": [],
    }
    processes = Processes()
    atexit.register(processes.close)
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    logs = Path(tempfile.mkdtemp(prefix="sessionmw-network-"))
    try:
        run_all(args, settings, latencies, pool, rows, processes, logs, results)
    except (KeyboardInterrupt, SystemExit):
        print("interrupted: stopping every process this run started", flush=True)
        raise
    finally:
        processes.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(logs, ignore_errors=True)
    results["duration_s"] = round(time.perf_counter() - started, 1)
    results["machine"]["load_end"] = f"{os.getloadavg()[0]:.2f}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "network.json").write_text(json.dumps(results, indent=1) + "\n")
    from net_report import write_report

    written = write_report(results, args.out)
    print(f"done in {results['duration_s']:.0f} s: " + ", ".join(str(p) for p in written))
    return 0


def run_all(
    args: argparse.Namespace,
    settings: Settings,
    latencies: tuple[float, ...],
    pool: dict[str, int],
    rows: list[Row],
    processes: Processes,
    logs: Path,
    results: dict[str, Any],
) -> None:
    print("starting PostgreSQL", flush=True)
    pg, pg_version = start_postgres(processes)
    results["versions"]["PostgreSQL"] = pg_version
    proxy = LatencyProxy(processes, pg.port)
    results["proxy_precise_timer"] = proxy.stats()["precise_timer"]
    results["direct_rtt_ms"] = round(round_trip_ms(pg.port), 3)

    pythons: dict[str, Path | None] = {"main": Path(sys.executable)}
    unavailable: dict[str, str] = {}
    if any(r.venv == "fastapi-sqla" for r in rows):
        python, why = side_python(args.fastapi_sqla_venv)
        pythons["fastapi-sqla"] = python
        if python is None:
            results["notes"].append(f"fastapi-sqla: {why}")
        else:
            results["side_versions"] = side_versions(python)

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    env["BENCH_SYNC_URL"] = f"postgresql+psycopg://postgres@127.0.0.1:{proxy.port}/postgres"
    env["BENCH_ASYNC_URL"] = f"postgresql+asyncpg://postgres@127.0.0.1:{proxy.port}/postgres"
    env["BENCH_POOL"] = json.dumps(pool)
    print(f"starting {len(rows)} servers", flush=True)
    running: list[Running] = []

    def start(row: Row, python: Path) -> tuple[int, subprocess.Popen[Any], Path]:
        port = free_port()
        log = logs / f"{row.key}.log"
        with log.open("wb") as output:
            child = processes.spawn(
                server_command(row, python, port),
                cwd=HERE,
                env=dict(env, BENCH_VARIANT=row.builder),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        return port, child, log

    starting = []
    for row in rows:
        python = pythons.get(row.venv)
        if python is None:
            unavailable[row.key] = "unavailable: fastapi-sqla's virtualenv could not be built"
            continue
        starting.append((row, python, *start(row, python)))
    for row, python, port, child, log in starting:
        for attempt in range(3):
            error = wait_ready(port, child, log, timeout=90)
            lost = ("address already in use", "connection in use")  # uvicorn, gunicorn
            if not any(text in error.lower() for text in lost) or attempt == 2:
                break
            port, child, log = start(row, python)  # lost the port to someone else: again
        if error:
            unavailable[row.key] = error
            print(f"  {row.key}: {error}", flush=True)
            processes.stop(child)
        else:
            running.append(Running(row, port))
    results["rows"] = [{**asdict(r), "unavailable": unavailable.get(r.key, "")} for r in rows]

    if settings.prime:
        for run in running:  # fills every pool and warms every cache before measuring
            with contextlib.suppress(subprocess.SubprocessError, ValueError):
                load(run.port, settings, args.db_clients, args.nodb_clients, settings.prime)
        print(f"  primed {len(running)} servers", flush=True)

    order = random.Random(args.seed)
    results["latencies"] = []
    for delay in latencies:
        proxy.set_delay(delay)
        phase: dict[str, Any] = {
            "delay_ms": delay,
            "rtt_ms": round(round_trip_ms(proxy.port), 3),
            "runs": [],
        }
        results["latencies"].append(phase)
        cpu_before, wall_before = proxy.stats()["cpu_s"], time.monotonic()
        print(
            f"latency {delay:g} ms each way (SELECT 1 round trip {phase['rtt_ms']:.2f} ms): "
            f"{len(running)} rows x {settings.rounds} rounds",
            flush=True,
        )
        for n in range(settings.rounds):
            todo = list(running)
            order.shuffle(todo)
            for position, run in enumerate(todo):
                before = proxy.stats()["accepted"]
                record: dict[str, Any] = {"round": n, "position": position, "row": run.row.key}
                try:
                    clients = (args.db_clients, args.nodb_clients)
                    record.update(load(run.port, settings, *clients, settings.seconds))
                    record["error"] = ""
                except (subprocess.SubprocessError, ValueError) as exc:
                    record["error"] = f"load failed: {type(exc).__name__}"
                record["pg_connections_opened"] = proxy.stats()["accepted"] - before
                phase["runs"].append(record)
                one = record.get(DB_PATH, {})
                print(
                    f"  [{n + 1}/{settings.rounds}] {run.row.key:36} "
                    f"{one.get('rps', 0):7.0f} req/s  p99 {one.get('p99_ms', 0):7.1f} ms  "
                    f"no-DB p99 {record.get(NO_DB_PATH, {}).get('p99_ms', 0):6.1f} ms"
                    + (f"  {record['error']}" if record["error"] else ""),
                    flush=True,
                )
        used = proxy.stats()["cpu_s"] - cpu_before
        phase["proxy_cpu_percent"] = round(100 * used / (time.monotonic() - wall_before), 1)
    results["proxy_stats"] = proxy.stats()


if __name__ == "__main__":
    sys.exit(main())
