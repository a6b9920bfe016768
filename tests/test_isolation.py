"""Isolation under concurrency: a request sees only its own Session, objects, rows and info.

Each request loads its own user, writes an uncommitted row, marks ``Session.info``, yields
to the others (thread switch or await), then reports what its Session holds. Runs on SQLite
and PostgreSQL, through Werkzeug's threaded server and through the ASGI middleware with an
async session, 200 requests each.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import sessionmw
from tests.conftest import Tracker, assert_clean, count_rows
from tests.models import User
from tests.servers import werkzeug_server

USERS = 40
REQUESTS = 200


def seed(Session: Any) -> list[int]:
    with sessionmw.request_scope(Session):
        users = [User(name=f"user{n}") for n in range(USERS)]
        Session.add_all(users)
        Session.commit()
        return [u.id for u in users]


def report(session: Any, held: list[User], pending: list[str]) -> dict[str, Any]:
    """What the request's Session holds (``held`` keeps the weakly referenced objects alive)."""
    assert all(o in session for o in held)
    return {
        "identity": sorted(o.name for o in session.identity_map.values()),
        "info": session.info.get("me"),
        "pending_seen": pending,
    }


def expected(user_id: int) -> dict[str, Any]:
    return {
        "identity": sorted([f"pending-{user_id}", f"user{user_id - 1}"]),
        "info": user_id,
        "pending_seen": [f"pending-{user_id}"],
    }


PENDING = User.name.like("pending-%")


def test_wsgi_requests_see_only_their_own(Session: Any, engine: Engine, tracker: Tracker) -> None:
    ids = seed(Session)

    def app(environ: Any, start_response: Any) -> list[bytes]:
        user_id = int(environ["PATH_INFO"].strip("/"))
        me = Session.get(User, user_id)
        Session.info["me"] = user_id
        mine = User(name=f"pending-{user_id}")
        Session.add(mine)
        Session.flush()
        time.sleep(0.002)  # let the other threads run with their Sessions open
        pending = list(Session.scalars(select(User.name).where(PENDING)))
        body = report(Session(), [me, mine], pending)
        sessionmw.set_rollback()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(body).encode()]

    mw = sessionmw.WSGISessionMiddleware(app, Session, commit="on_success")
    with werkzeug_server(mw) as base, ThreadPoolExecutor(20) as pool:

        def get(n: int) -> tuple[int, Any]:
            user_id = ids[n % USERS]
            return user_id, httpx.get(f"{base}/{user_id}", timeout=30).json()

        results = list(pool.map(get, range(REQUESTS)))
    for user_id, body in results:
        assert body == expected(user_id)
    assert count_rows(engine, User) == USERS
    assert_clean(Session, engine, tracker)


@pytest.mark.anyio
async def test_asgi_async_requests_see_only_their_own(
    AsyncSession: Any, async_engine: Any, engine: Engine, tracker: Tracker
) -> None:
    async with sessionmw.request_scope(AsyncSession):
        users = [User(name=f"user{n}") for n in range(USERS)]
        AsyncSession.add_all(users)
        await AsyncSession.flush()
        ids = [u.id for u in users]  # before the commit expires them
        await AsyncSession.commit()

    async def endpoint(request: Request) -> Response:
        user_id = request.path_params["user_id"]
        db = request.state.db
        me = await db.get(User, user_id)
        db.info["me"] = user_id
        mine = User(name=f"pending-{user_id}")
        db.add(mine)
        await db.flush()
        await asyncio.sleep(0.002)
        pending = list(await db.scalars(select(User.name).where(PENDING)))
        sessionmw.set_rollback()
        return JSONResponse(report(db().sync_session, [me, mine], pending))

    app = Starlette(
        routes=[Route("/{user_id:int}", endpoint)],
        middleware=[
            Middleware(sessionmw.ASGISessionMiddleware, session=AsyncSession, commit="on_success")
        ],
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        sem = asyncio.Semaphore(14)  # below the pool's 15 connections: no pool timeouts

        async def get(n: int) -> tuple[int, Any]:
            async with sem:
                user_id = ids[n % USERS]
                return user_id, (await client.get(f"/{user_id}")).json()

        results = await asyncio.gather(*(get(n) for n in range(REQUESTS)))
    for user_id, body in results:
        assert body == expected(user_id)
    assert count_rows(engine, User) == USERS
    assert_clean(AsyncSession, async_engine.sync_engine, tracker)
