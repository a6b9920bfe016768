"""Load on real servers in their own processes, checked from PostgreSQL itself.

gunicorn (threads) serves the Flask example, uvicorn the Starlette example (a sync and an
async session stacked); a load generator in a third process sends a mix of reads, writes the
policy commits, writes that raise, 4xx after writes, commits that fail on a deferred
constraint, streams the client abandons and client timeouts. Afterwards: every row a 2xx
acknowledged is there, no row of any other request is, PostgreSQL shows no connection of the
app idle in transaction, and the servers' own registries and pools are empty.

``SESSIONMW_LOAD_REQUESTS`` and ``SESSIONMW_LOAD_CONCURRENCY`` set the size (2000 and 100;
RELIABILITY.md's figures are from 5000).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, create_engine, func, select, text

from examples.flask_app.models import Author, Book
from examples.starlette_app.models import Event
from examples.starlette_app.models import Note as StarletteNote
from tests.models import User
from tests.servers import answering, free_port, wait_until

REQUESTS = int(os.environ.get("SESSIONMW_LOAD_REQUESTS", "2000"))
CONCURRENCY = int(os.environ.get("SESSIONMW_LOAD_CONCURRENCY", "100"))
ROOT = Path(__file__).resolve().parent.parent
SEED_ROWS = 500

EXPECTED = {
    "read": 200,
    "write": 201,
    "conflict": 409,
    "crash": 500,
    "commit_fail": 500,
    "commit_fail_sync": 500,
    "missing": 404,
    "background": 200,
    "stream": 200,
    "abandon": 200,
    "timeout": None,
}

# 2,000 requests take about 30 s per server on 2 cores (5,000: 75 s), more while other
# work runs.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


@contextmanager
def serve(command: list[str], url: str, port: int) -> Iterator[str]:
    env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"

    with answering(process, base) as url:
        yield url


def run_load(base: str, app: str, tmp_path: Path) -> list[list[Any]]:
    out = tmp_path / "results.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.loadgen",
            base,
            app,
            str(REQUESTS),
            str(CONCURRENCY),
            str(out),
        ],
        cwd=ROOT,
        check=True,
        timeout=600,
    )
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def check_servers_state(base: str, engine: Engine) -> None:
    def drained() -> bool:
        state = httpx.get(f"{base}/_state", timeout=5).json()
        return state == {"registry": 0, "checkedout": 0}

    wait_until(drained, timeout=15, what="the server's registry and pool to drain")
    with engine.connect() as conn:
        states = Counter(
            conn.execute(
                text("select state from pg_stat_activity where application_name = 'sessionmw-load'")
            ).scalars()
        )
    assert not any(s and s.startswith("idle in transaction") for s in states), states
    assert states.get("active", 0) == 0, states


def check_statuses(results: list[list[Any]]) -> Counter[str]:
    unexpected = Counter(
        f"{kind} {status}" for kind, status, _ in results if status != EXPECTED[kind]
    )
    assert not unexpected, unexpected
    assert len(results) == REQUESTS
    return Counter(kind for kind, _, _ in results)


def report(server: str, results: list[list[Any]], written: int) -> None:
    """One line for RELIABILITY.md (shown with ``pytest -s``)."""
    statuses = Counter(str(status) for _, status, _ in results)
    print(
        f"\nLOAD | {server} | {len(results)} requests, {CONCURRENCY} concurrent | "
        f"{dict(sorted(statuses.items()))} | {written} acknowledged rows checked"
    )


def test_gunicorn_threads_serving_the_flask_example(pg_url: str, tmp_path: Path) -> None:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "-w",
        "1",
        "-k",
        "gthread",
        "--threads",
        "32",
        "--keep-alive",
        "60",
        "-b",
        f"127.0.0.1:{port}",
        "--log-level",
        "warning",
        "tests.load_apps:flask_app()",
    ]
    engine = create_engine(pg_url)
    with serve(command, pg_url, port) as base:
        with engine.begin() as conn:
            author_id = conn.execute(
                Author.__table__.insert().values(name="Dup").returning(Author.id)
            ).scalar_one()
            conn.execute(
                Book.__table__.insert(),
                [{"title": f"seed {n}", "author_id": author_id} for n in range(SEED_ROWS)],
            )
        results = run_load(base, "flask", tmp_path)
        check_servers_state(base, engine)
    kinds = check_statuses(results)
    written = {name for kind, status, name in results if kind == "write" and status == 201}
    report("gunicorn gthread, Flask", results, len(written))
    with engine.connect() as conn:
        assert set(conn.scalars(select(Author.name))) == written | {"Dup"}
        assert conn.scalar(select(func.count()).select_from(Book)) == SEED_ROWS
        assert conn.scalar(select(func.count()).select_from(User)) == 0
    assert kinds["write"] > 0
    assert kinds["commit_fail"] > 0
    engine.dispose()


def test_uvicorn_serving_the_starlette_example(pg_url: str, tmp_path: Path) -> None:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "tests.load_apps:starlette_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--timeout-keep-alive",
        "60",
    ]
    engine = create_engine(pg_url)
    with serve(command, pg_url, port) as base:
        with engine.begin() as conn:
            conn.execute(
                StarletteNote.__table__.insert(),
                [{"title": "Dup" if n == 0 else f"seed {n}", "body": ""} for n in range(SEED_ROWS)],
            )
        results = run_load(base, "starlette", tmp_path)
        check_servers_state(base, engine)
    kinds = check_statuses(results)
    written = {name for kind, status, name in results if kind == "write" and status == 201}
    seeds = {"Dup"} | {f"seed {n}" for n in range(1, SEED_ROWS)}
    report("uvicorn, Starlette (sync + async)", results, len(written))
    with engine.connect() as conn:
        assert set(conn.scalars(select(StarletteNote.title))) == written | seeds
        assert conn.scalar(select(func.count()).select_from(User)) == 0
        assert conn.scalar(select(func.count()).select_from(Event)) == kinds["background"]
    assert kinds["write"] > 0
    assert kinds["commit_fail"] > 0
    assert kinds["commit_fail_sync"] > 0
    engine.dispose()
