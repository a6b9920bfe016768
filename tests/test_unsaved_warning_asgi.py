"""Under ``"manual"`` an ASGI request that succeeds with flushed but uncommitted writes is
warned about, for a sync and for an async Session, and its writes are rolled back."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import sessionmw
from tests.models import Base, User

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("flavor", ["sync", "async"])
async def test_manual_warns_about_flushed_writes_and_rolls_them_back(
    flavor: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "app.db"
    engine = create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(engine)
    if flavor == "sync":
        Session = sessionmw.request_scoped(sessionmaker(bind=engine))

        async def endpoint(request: Request) -> Response:
            Session.add(User(name="ada"))
            Session.flush()
            return PlainTextResponse("ok")

        pool = engine.pool
    else:
        remote = create_async_engine(f"sqlite+aiosqlite:///{path}")
        Session = sessionmw.request_scoped(async_sessionmaker(bind=remote))

        async def endpoint(request: Request) -> Response:
            Session.add(User(name="ada"))
            await Session.flush()
            return PlainTextResponse("ok")

        pool = remote.sync_engine.pool
    app = sessionmw.ASGISessionMiddleware(
        Starlette(routes=[Route("/", endpoint, methods=["POST"])]), session=Session
    )
    transport = httpx.ASGITransport(app=app)
    with caplog.at_level(logging.WARNING, "sessionmw"):
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.post("/")).status_code == 200
    assert [r.levelno for r in caplog.records if "uncommitted changes" in r.getMessage()] == [
        logging.WARNING
    ]
    with engine.connect() as conn:
        assert conn.scalars(select(User.name)).all() == []
    assert len(Session.registry.registry) == 0
    assert pool.checkedout() == 0
    if flavor == "async":
        await remote.dispose()
    engine.dispose()
