"""A real uvicorn server on 127.0.0.1, 200 concurrent clients, sync and async sessions."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker

import sessionmw
from tests.asgi_helpers import Db, build_app
from tests.conftest import Tracker, sqlite_pragmas
from tests.models import Base, User
from tests.servers import uvicorn_server, wait_until

REQUESTS = 200
KINDS = (
    ["read"] * 3 + ["write"] * 3 + ["crash", "missing", "stream", "abandon", "cancel", "background"]
)
EXPECTED = {
    "read": 200,
    "write": 201,
    "crash": 500,
    "missing": 404,
    "stream": 200,
    "abandon": 200,
    "cancel": None,
    "background": 202,
}


async def one(client: httpx.AsyncClient, n: int, kind: str) -> tuple[str, int | None, str]:
    name = f"user{n}"
    if kind == "read":
        r = await client.get("/read")
    elif kind == "write":
        r = await client.post(f"/write/{name}")
    elif kind == "crash":
        r = await client.post(f"/crash/{name}")
    elif kind == "missing":
        r = await client.post(f"/write/{name}?status=404")
    elif kind == "stream":
        r = await client.get("/stream?n=50")
        assert r.text.count("chunk") == 50
    elif kind == "abandon":
        async with client.stream("GET", "/stream?n=100000") as r:
            async for _ in r.aiter_bytes():
                break
    elif kind == "background":
        r = await client.post(f"/background/{name}")
    else:  # the client gives up on a slow request
        try:
            await asyncio.wait_for(client.post(f"/slow/{name}?read=1&seconds=0.5"), 0.1)
        except asyncio.TimeoutError:
            return kind, None, name
        raise AssertionError("the slow request was not cancelled")
    return kind, r.status_code, name


async def load(base: str) -> list[tuple[str, int | None, str]]:
    plan = [(n, random.Random(n).choice(KINDS)) for n in range(REQUESTS)]
    limits = httpx.Limits(max_connections=REQUESTS)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as client:
        return await asyncio.gather(*(one(client, n, kind) for n, kind in plan))


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_200_concurrent_requests_against_uvicorn(tmp_path: Path, kind: str) -> None:
    url = f"sqlite:///{tmp_path / 'uvicorn.db'}"
    # A connection for every request in flight. The sync streamed bodies keep theirs
    # between chunks, and each chunk hops through anyio's shared 40-token limiter; with a
    # smaller pool, endpoints waiting for a connection can hold all 40 tokens while the
    # streams that would give connections back wait for one: a stall until the pool
    # timeout that any sync Starlette app streaming from its database can meet.
    engine = create_engine(url, pool_size=5, max_overflow=REQUESTS)
    sqlite_pragmas(engine)
    Base.metadata.create_all(engine)
    tracker = Tracker()
    on_stop = None
    if kind == "sync":
        session: Any = sessionmw.request_scoped(
            sessionmaker(bind=engine, class_=tracker.session_class())
        )
        pool_engine = engine
    else:
        async_engine = create_async_engine(url.replace("sqlite://", "sqlite+aiosqlite://"))
        sqlite_pragmas(async_engine.sync_engine)
        session = sessionmw.request_scoped(
            async_sessionmaker(async_engine, sync_session_class=tracker.session_class())
        )
        pool_engine = async_engine.sync_engine
        on_stop = async_engine.dispose
    db = Db(kind, session, engine, tracker, pool_engine)
    app = build_app(db)

    with uvicorn_server(app, on_stop=on_stop) as base:
        results = asyncio.run(load(base))
        wait_until(lambda: session.registry.registry == {}, what="every session removed")
        assert pool_engine.pool.checkedout() == 0

    got = Counter((k, status) for k, status, _ in results)
    assert got == Counter((k, EXPECTED[k]) for k, _, _ in results)
    written = {
        name for k, status, name in results if k in ("write", "background") and status in (201, 202)
    }
    with engine.connect() as conn:
        assert set(conn.scalars(select(User.name))) == written
    # Each request that touched the database had its own Session, each closed exactly once.
    tokens = [token for token, _, _ in app.state.seen]
    assert len(set(tokens)) == len({id(s) for _, s, _ in app.state.seen}) == got[("read", 200)]
    assert tracker.closed_once()
    # Every kind of request touches the database; a cancelled one may not have reached it.
    cancelled = sum(1 for k, _, _ in results if k == "cancel")
    assert REQUESTS - cancelled <= len(tracker.created) <= REQUESTS
    engine.dispose()
