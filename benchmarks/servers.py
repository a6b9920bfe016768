"""Part 3: real servers, sessionmw against hand-written code, on a SQLite file.

    python benchmarks/servers.py [--seconds 3] [--rounds 2]

uvicorn serves the Starlette apps (sync and async sessions), gunicorn's gthread worker the
Flask apps; each is one worker process on 127.0.0.1. All servers are started first, then
``loadgen.py`` (its own process) drives each in turn for a few seconds, and the whole
sequence is repeated (``--rounds``) so drift on the machine reaches every row alike. Only
the one-query route is used: it is what the part 1 numbers predict a difference for.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import make_database  # noqa: E402

CONNECTIONS = 16
PATH = "/one"


@dataclass(frozen=True)
class Target:
    server: str  # "uvicorn" or "gunicorn gthread"
    label: str
    variant: str  # "hand-written" or "sessionmw"
    flavor: str
    builder: str  # a function of variants.py


TARGETS = (
    Target(
        "uvicorn",
        "Starlette hand-written sync",
        "hand-written",
        "sync",
        "starlette_handwritten_sync",
    ),
    Target("uvicorn", "Starlette sessionmw sync", "sessionmw", "sync", "starlette_sessionmw_sync"),
    Target(
        "uvicorn",
        "Starlette hand-written async",
        "hand-written",
        "async",
        "starlette_handwritten_async",
    ),
    Target(
        "uvicorn", "Starlette sessionmw async", "sessionmw", "async", "starlette_sessionmw_async"
    ),
    Target("gunicorn gthread", "Flask hand-written", "hand-written", "sync", "flask_handwritten"),
    Target("gunicorn gthread", "Flask sessionmw", "sessionmw", "sync", "flask_sessionmw"),
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def command(target: Target, port: int) -> list[str]:
    if target.server == "uvicorn":
        return [
            sys.executable, "-m", "uvicorn", "--factory", "server_apps:starlette_app",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--log-level", "warning", "--no-access-log", "--lifespan", "off",
        ]  # fmt: skip
    return [
        sys.executable, "-m", "gunicorn", "--worker-class", "gthread", "--workers", "1",
        "--threads", "8", "--bind", f"127.0.0.1:{port}", "--log-level", "warning",
        "server_apps:flask_app()",
    ]  # fmt: skip


def wait_ready(port: int, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Until the route answers 200: a bound port is not yet a loaded app."""
    request = f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.sendall(request)
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"no 200 from {PATH} within {timeout:.0f} s")


def load(port: int, seconds: float) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            str(HERE / "loadgen.py"),
            str(port),
            PATH,
            str(CONNECTIONS),
            str(seconds),
            "0.5",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    )
    result: dict[str, float] = json.loads(out.stdout)
    return result


def stack() -> str:
    """What the servers run on: uvicorn picks uvloop and httptools only if installed."""
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"uvicorn on {loop} + {http}; gunicorn gthread, 1 worker, 8 threads"


def run_servers(seconds: float = 3.0, rounds: int = 2) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    processes: list[tuple[Target, int, subprocess.Popen[bytes] | None, str]] = []
    with tempfile.TemporaryDirectory(prefix="sessionmw-servers-") as tmp:
        db = make_database(Path(tmp))
        env = dict(os.environ, BENCH_DB=str(db))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
        try:
            for target in TARGETS:
                port = free_port()
                try:
                    started = subprocess.Popen(
                        command(target, port),
                        cwd=HERE,
                        env=dict(env, BENCH_VARIANT=target.builder),
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                    )
                    processes.append((target, port, started, ""))
                except OSError as exc:
                    processes.append((target, port, None, f"{type(exc).__name__}: {exc}"))
            ready = []
            for target, port, process, error in processes:
                if process is None:
                    rows.append({**target.__dict__, "error": error})
                    continue
                try:
                    wait_ready(port, process)
                    ready.append((target, port))
                except RuntimeError as exc:
                    stderr = (
                        process.stderr.read().decode()[-300:]
                        if process.poll() is not None and process.stderr
                        else ""
                    )
                    rows.append({**target.__dict__, "error": f"{exc} {stderr}".strip()})
            runs: dict[Target, list[dict[str, float]]] = {t: [] for t, _ in ready}
            for n in range(rounds):
                for target, port in ready:
                    try:
                        runs[target].append(load(port, seconds))
                    except (subprocess.SubprocessError, ValueError) as exc:
                        print(f"  {target.label}: load failed: {exc}")
                print(f"  servers, round {n + 1}/{rounds}")
            for target, results in runs.items():
                if not results:
                    rows.append({**target.__dict__, "error": "every load run failed"})
                    continue
                rows.append(
                    {
                        **target.__dict__,
                        "connections": CONNECTIONS,
                        "seconds": sum(r["seconds"] for r in results),
                        "requests": int(sum(r["requests"] for r in results)),
                        "errors": int(sum(r["errors"] for r in results)),
                        "rps": statistics.mean(r["rps"] for r in results),
                        "p50_ms": statistics.median(r["p50_ms"] for r in results),
                        "p99_ms": statistics.median(r["p99_ms"] for r in results),
                        "stack": stack(),
                    }
                )
        finally:
            for _, _, running, _ in processes:
                if running is not None and running.poll() is None:
                    running.terminate()
                    try:
                        running.wait(10)
                    except subprocess.TimeoutExpired:
                        running.kill()
                        running.wait()
    order = {t.label: i for i, t in enumerate(TARGETS)}
    return sorted(rows, key=lambda r: order[r["label"]])


def main() -> int:
    parser = argparse.ArgumentParser(description="uvicorn and gunicorn: sessionmw vs hand-written")
    parser.add_argument("--seconds", type=float, default=3.0, help="load per server and round")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from report import server_table

    rows = run_servers(args.seconds, args.rounds)
    print("\n".join(server_table({"servers": rows})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
