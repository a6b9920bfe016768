"""Faults on PostgreSQL: restart, killed backends, an exhausted pool, a statement timeout.

Both example apps, served in-process (Werkzeug's threaded server, uvicorn), under concurrent
writes. Every request ends fast with a 2xx or a 5xx, never a 2xx for a write that was lost;
nothing hangs; the app serves normally afterwards (the engines use ``pool_pre_ping=True``);
and the registries and pools are empty at the end.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, select, text

from examples.flask_app.models import Author
from examples.starlette_app.models import Note as StarletteNote
from tests import load_apps
from tests.postgres import PostgresServer
from tests.servers import uvicorn_server, wait_until, werkzeug_server

pytestmark = pytest.mark.slow

WRITES = 300
THREADS = 20


@contextmanager
def serve(kind: str, url: str, **engine_options: Any) -> Iterator[tuple[str, Any]]:
    """Serve one example app on ``url``; yields its base URL and the column of written names."""
    os.environ["DATABASE_URL"] = url
    try:
        if kind == "flask":
            app = load_apps.flask_app(**engine_options)
            with werkzeug_server(app) as base:
                yield base, Author.name
            app.config["ENGINE"].dispose()
        else:
            app = load_apps.starlette_app(**engine_options)
            with uvicorn_server(app, on_stop=app.state.async_engine.dispose) as base:
                yield base, StarletteNote.title
            app.state.engine.dispose()
    finally:
        del os.environ["DATABASE_URL"]


def write(client: httpx.Client, kind: str, name: str) -> int:
    if kind == "flask":
        return client.post("/authors", json={"name": name}).status_code
    return client.post("/notes", json={"title": name}).status_code


def under_load(
    base: str, kind: str, fault: Callable[[], None], count: int = WRITES
) -> list[tuple[str, int | str]]:
    """Concurrent writes with ``fault`` injected a little way in; (name, status) each."""
    started = threading.Event()

    def one(n: int) -> tuple[str, int | str]:
        if n == count // 5:
            started.set()
        name = f"w{n}"
        with httpx.Client(base_url=base, timeout=30) as client:
            try:
                return name, write(client, kind, name)
            except httpx.TransportError as exc:
                return name, type(exc).__name__

    with ThreadPoolExecutor(THREADS) as pool:
        futures = [pool.submit(one, n) for n in range(count)]
        started.wait(30)
        fault()
        return [f.result(timeout=60) for f in futures]


def check(
    base: str, url: str, column: Any, results: list[tuple[str, int | str]], kind: str
) -> None:
    statuses = {status for _, status in results}
    counts = Counter(str(status) for _, status in results)
    print(f"\nFAULT | {kind} | {dict(sorted(counts.items()))}")
    assert statuses <= {201, 500, 503}, statuses  # a 2xx or a 5xx; no hang, no reset
    acknowledged = {name for name, status in results if status == 201}
    # The app serves normally again.
    with httpx.Client(base_url=base, timeout=30) as client:
        after = [write(client, kind, f"after{n}") for n in range(10)]
        assert after == [201] * 10
        wait_until(
            lambda: client.get("/_state").json() == {"registry": 0, "checkedout": 0},
            what="registry and pool to drain",
        )
    engine = create_engine(url)
    with engine.connect() as conn:
        names = {n for n in conn.scalars(select(column)) if n.startswith("w")}
        idle_in_transaction = conn.scalar(
            text(
                "select count(*) from pg_stat_activity where application_name = 'sessionmw-load'"
                " and state like 'idle in transaction%'"
            )
        )
    engine.dispose()
    assert names == acknowledged  # every acknowledged write kept, no other
    assert idle_in_transaction == 0


@pytest.fixture(params=["flask", "starlette"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_database_restarted_mid_load(kind: str, pg_url: str, postgres: PostgresServer) -> None:
    with serve(kind, pg_url) as (base, column):
        results = under_load(base, kind, postgres.restart)
        check(base, pg_url, column, results, kind)


def test_backends_terminated_mid_load(kind: str, pg_url: str) -> None:
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")

    def kill() -> None:
        for _ in range(5):
            with admin.connect() as conn:
                conn.execute(
                    text(
                        "select pg_terminate_backend(pid) from pg_stat_activity"
                        " where application_name = 'sessionmw-load'"
                    )
                )
            time.sleep(0.05)

    with serve(kind, pg_url) as (base, column):
        results = under_load(base, kind, kill)
        check(base, pg_url, column, results, kind)
    admin.dispose()


def test_exhausted_pool_fails_fast_and_recovers(kind: str, pg_url: str) -> None:
    with serve(kind, pg_url, pool_size=2, max_overflow=0, pool_timeout=1) as (base, column):

        def slow() -> int:
            with httpx.Client(base_url=base, timeout=30) as client:
                return client.get("/slow?seconds=3").status_code

        def timed_write(n: int) -> tuple[int, float]:
            with httpx.Client(base_url=base, timeout=30) as client:
                started = time.monotonic()
                status = write(client, kind, f"w{n}")
                return status, time.monotonic() - started

        with ThreadPoolExecutor(12) as pool:
            slow_ones = [pool.submit(slow) for _ in range(2)]
            time.sleep(0.3)  # both slow requests now hold the pool's two connections
            writes = [f.result() for f in [pool.submit(timed_write, n) for n in range(8)]]
            assert [f.result() for f in slow_ones] == [200, 200]
        failed = [elapsed for status, elapsed in writes if status == 500]
        assert failed, writes  # the pool was exhausted for some of them ...
        assert max(failed) < 5, writes  # ... and they failed after pool_timeout, not later
        results = [(f"w{n}", status) for n, (status, _) in enumerate(writes)]
        check(base, pg_url, column, results, kind)


def test_statement_timeout_is_a_fast_500(kind: str, pg_url: str) -> None:
    options = {
        "connect_args": {
            "application_name": "sessionmw-load",
            "options": "-c statement_timeout=200",
        }
    }
    with (
        serve(kind, pg_url, **options) as (base, column),
        httpx.Client(base_url=base, timeout=30) as client,
    ):
        started = time.monotonic()
        assert client.get("/slow").status_code == 500
        assert time.monotonic() - started < 0.9  # pg_sleep(1) was cut at 200 ms
        check(base, pg_url, column, [], kind)
