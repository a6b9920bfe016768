"""Through a real PgBouncer in transaction pooling mode, under uvicorn, at 50 concurrent.

Transaction pooling hands a client connection a server connection for one transaction at a
time, which is the unit sessionmw settles per request: every request's queries, its commit
or its rollback run on one server connection, and between requests the server connection
serves others.  The app (``tests.pooler_app``) runs with the engine settings the docs give
for PgBouncer (no prepared statement outlives its transaction); a load generator in another
process sends reads, writes that commit and writes that fail after adding a row.  Afterwards,
checked on the server itself: the rows are exactly those of the 2xx writes, no server
backend is idle in transaction, the server saw no more backends than PgBouncer's pool, and
the app's registry and pool are empty.  Two-phase commit across two databases goes through
PgBouncer whole as well.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, create_engine, make_url, select, text
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import NullPool
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import sessionmw
from tests.models import Base as ModelsBase
from tests.models import Note, User
from tests.pgbouncer import POOL_SIZE, PgBouncer
from tests.pooler_app import POOLER_CONNECT_ARGS, Base, Entry
from tests.servers import answering, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
REQUESTS = 500
CONCURRENCY = 50
EXPECTED = {"read": 200, "ok": 201, "reject": 409, "crash": 500, "commit_fail": 500}
DRIVERS = {"sync": "psycopg", "async": "asyncpg"}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def serve_and_load(variant: str, url: str, tmp_path: Path) -> list[list[Any]]:
    """Serve the app under uvicorn on ``url``, send the load, wait for the app to drain."""
    port = free_port()
    log = tmp_path / "uvicorn.log"
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        f"tests.pooler_app:{variant}_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--timeout-keep-alive",
        "60",
    ]
    env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(ROOT)}
    env.pop("DRIVER_SETTINGS", None)
    out = tmp_path / "results.json"
    with (
        log.open("w") as log_file,
        subprocess.Popen(command, cwd=ROOT, env=env, stdout=log_file, stderr=log_file) as server,
        answering(server, f"http://127.0.0.1:{port}", log) as base,
    ):
        load = [sys.executable, "-m", "tests.pooler_loadgen", base, str(REQUESTS)]
        subprocess.run([*load, str(CONCURRENCY), str(out)], cwd=ROOT, check=True, timeout=180)

        def drained() -> bool:
            state = httpx.get(f"{base}/_state", timeout=5).json()
            return bool(state == {"registry": 0, "checkedout": 0})

        wait_until(drained, timeout=15, what="the app's registry and pool to drain")
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def backend_states(direct: Engine, database: str) -> Counter[str]:
    """The state of each server backend on ``database``, other than the one asking."""
    with direct.connect() as conn:
        rows = conn.scalars(
            text(
                "select coalesce(state, '') from pg_stat_activity"
                " where datname = :db and pid <> pg_backend_pid()"
            ),
            {"db": database},
        )
        return Counter(rows)


@pytest.mark.parametrize("variant", ["sync", "async"])
def test_mixed_load_through_pgbouncer_in_transaction_mode(
    variant: str, pgbouncer: PgBouncer, pg_url: str, tmp_path: Path
) -> None:
    database = str(make_url(pg_url).database)
    direct = create_engine(pg_url, poolclass=NullPool)
    Base.metadata.create_all(direct)

    results = serve_and_load(variant, pgbouncer.url(DRIVERS[variant], database), tmp_path)

    assert len(results) == REQUESTS
    unexpected = Counter(
        f"{kind} {status}" for kind, status, _ in results if status != EXPECTED[kind]
    )
    assert not unexpected, unexpected
    kinds = Counter(kind for kind, _, _ in results)
    assert all(kinds[kind] > 0 for kind in EXPECTED), kinds

    acknowledged = {key for kind, status, key in results if kind == "ok" and status == 201}
    with direct.connect() as conn:
        keys = list(conn.scalars(select(Entry.key)))
    assert sorted(keys) == sorted(acknowledged)  # no row lost, none of a failed request kept

    states = backend_states(direct, database)
    assert not any(state.startswith("idle in transaction") for state in states), states
    assert sum(states.values()) <= POOL_SIZE, states  # 50 clients went through PgBouncer's pool
    direct.dispose()


@pytest.fixture
def twophase_app(
    pgbouncer: PgBouncer, pg_url: str, second_pg_url: str
) -> Iterator[tuple[Starlette, dict[str, Engine]]]:
    """Two databases behind PgBouncer, two stacked middlewares, two-phase commit."""
    direct = {"a": create_engine(pg_url, poolclass=NullPool)}
    direct["b"] = create_engine(second_pg_url, poolclass=NullPool)
    engines = {
        key: create_engine(
            pgbouncer.url("psycopg", str(engine.url.database)),
            connect_args=POOLER_CONNECT_ARGS["psycopg"],
            pool_pre_ping=True,
        )
        for key, engine in direct.items()
    }
    sessions = {
        key: sessionmw.request_scoped(sessionmaker(bind=engine, twophase=True))
        for key, engine in engines.items()
    }
    for engine in direct.values():
        ModelsBase.metadata.create_all(engine)

    def write(request: Request) -> Response:
        for key in sessions:
            db = getattr(request.state, f"db_{key}")
            db.add(User(name=request.path_params["name"]))
            if key == request.query_params.get("fail"):
                db.add(Note(user_id=10**6, body="fails at PREPARE TRANSACTION"))
            db.flush()
        return PlainTextResponse("created", status_code=201)

    middleware = [
        Middleware(
            sessionmw.ASGISessionMiddleware,
            session=session,
            commit="on_success",
            state_key=f"db_{key}",
        )
        for key, session in sessions.items()
    ]
    app = Starlette(routes=[Route("/{name}", write, methods=["POST"])], middleware=middleware)
    app.state.sessions = sessions
    yield app, direct
    for engine in [*engines.values(), *direct.values()]:
        engine.dispose()


@pytest.mark.anyio
async def test_two_phase_commit_across_databases_through_pgbouncer(
    twophase_app: tuple[Starlette, dict[str, Engine]],
) -> None:
    """PREPARE TRANSACTION ends the transaction and COMMIT PREPARED may run on any server
    connection, so PgBouncer's transaction pooling keeps two-phase commit whole."""
    app, direct = twophase_app
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        good = await asyncio.gather(*(client.post(f"/good-{n}") for n in range(20)))
        bad = [await client.post(f"/bad-{db}", params={"fail": db}) for db in ("a", "b")]
    assert [r.status_code for r in good] == [201] * 20
    assert [r.status_code for r in bad] == [500, 500]

    for engine in direct.values():
        with engine.connect() as conn:
            assert set(conn.scalars(select(User.name))) == {f"good-{n}" for n in range(20)}
            assert conn.scalar(text("select count(*) from pg_prepared_xacts")) == 0
        states = backend_states(engine, str(engine.url.database))
        assert not any(state.startswith("idle in transaction") for state in states), states
    for session in app.state.sessions.values():
        assert session.registry.registry == {}
