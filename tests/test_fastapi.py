"""The FastAPI recipe from the README: the middleware's session as an Annotated dependency."""

from __future__ import annotations

from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException, Request
from sqlalchemy import Engine, select
from sqlalchemy.ext.asyncio import AsyncSession as AsyncOrmSession
from sqlalchemy.orm import Session as OrmSession

import sessionmw
from tests.conftest import Tracker, assert_clean, user_names
from tests.models import User

pytestmark = pytest.mark.anyio


async def get_db(request: Request) -> OrmSession:
    """The request's Session: an ``async def`` dependency, so no thread hop to fetch it."""
    return request.state.db()  # type: ignore[no-any-return]


async def get_adb(request: Request) -> AsyncOrmSession:
    return request.state.adb()  # type: ignore[no-any-return]


DB = Annotated[OrmSession, Depends(get_db)]
AsyncDB = Annotated[AsyncOrmSession, Depends(get_adb)]


def build(Session: Any, AsyncSession: Any) -> tuple[FastAPI, list[Any]]:
    seen: list[Any] = []
    app = FastAPI()
    app.add_middleware(sessionmw.ASGISessionMiddleware, session=Session, commit="on_success")
    app.add_middleware(
        sessionmw.ASGISessionMiddleware,
        session=AsyncSession,
        commit="on_success",
        state_key="adb",
    )

    @app.post("/sync/{name}", status_code=201)
    def create_sync(name: str, db: DB) -> dict[str, str]:
        seen.append(("sync", db, Session()))
        db.add(User(name=name))
        db.flush()
        if name.startswith("taken"):
            raise HTTPException(409, "taken")
        return {"name": name}

    @app.post("/async/{name}", status_code=201)
    async def create_async(name: str, db: AsyncDB) -> dict[str, str]:
        seen.append(("async", db, AsyncSession()))
        db.add(User(name=name))
        await db.flush()
        if name.startswith("taken"):
            raise HTTPException(409, "taken")
        return {"name": name}

    @app.get("/users")
    async def users(db: AsyncDB) -> list[str]:
        return list(await db.scalars(select(User.name).order_by(User.name)))

    return app, seen


async def test_fastapi_dependencies_get_the_requests_sessions(
    Session: Any, AsyncSession: Any, engine: Engine, async_engine: Any, tracker: Tracker
) -> None:
    app, seen = build(Session, AsyncSession)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.post("/sync/ann")).status_code == 201
        assert (await client.post("/async/bob")).status_code == 201
        assert (await client.post("/sync/taken-1")).status_code == 409
        assert (await client.post("/async/taken-2")).status_code == 409
        assert (await client.get("/users")).json() == ["ann", "bob"]
    assert user_names(engine) == {"ann", "bob"}
    # The dependency and the global proxy are the same Session within a request ...
    assert all(dep is proxied for _, dep, proxied in seen)
    # ... and no two requests shared one.
    assert len({id(dep) for _, dep, _ in seen}) == 4
    assert_clean(Session, engine, tracker)
    assert_clean(AsyncSession, async_engine.sync_engine)
