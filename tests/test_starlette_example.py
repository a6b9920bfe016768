"""The Starlette example in process: sync and async routes, streaming, background, websocket."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from starlette.applications import Starlette

from examples.starlette_app import AsyncSession, Session, create_app
from examples.starlette_app.models import Event, Message, Note
from tests.asgi_helpers import open_websocket

pytestmark = pytest.mark.anyio


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[Starlette]:
    app = create_app(f"sqlite:///{tmp_path / 'starlette.db'}")
    yield app
    await app.state.async_engine.dispose()
    app.state.engine.dispose()


@pytest.fixture
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


def rows(app: Starlette, column: Any) -> list[Any]:
    with app.state.engine.connect() as conn:
        return list(conn.scalars(select(column).order_by(column)))


def assert_clean(app: Starlette) -> None:
    assert Session.registry.registry == {}
    assert AsyncSession.registry.registry == {}
    assert app.state.engine.pool.checkedout() == 0
    assert app.state.async_engine.sync_engine.pool.checkedout() == 0


async def test_crud_on_async_and_sync_routes(app: Starlette, client: httpx.AsyncClient) -> None:
    created = await client.post("/notes", json={"title": "First", "body": "hello"})
    assert created.status_code == 201
    note_id = created.json()["id"]
    assert (await client.post("/notes", json={"title": "FIRST"})).status_code == 409
    assert (await client.post("/notes", content=b"{")).status_code == 400
    assert (await client.get(f"/notes/{note_id}")).json()["body"] == "hello"  # sync route
    assert (await client.get("/notes/999")).status_code == 404
    assert [n["title"] for n in (await client.get("/notes")).json()] == ["First"]
    assert (await client.delete(f"/notes/{note_id}")).status_code == 204  # sync route
    assert rows(app, Note.title) == []
    assert_clean(app)


async def test_streamed_listing(app: Starlette, client: httpx.AsyncClient) -> None:
    for n in range(30):
        await client.post("/notes", json={"title": f"note {n:02}"})
    response = await client.get("/notes/stream")
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert [line["title"] for line in lines] == [f"note {n:02}" for n in range(30)]
    assert_clean(app)


async def test_background_task_writes_after_the_response(
    app: Starlette, client: httpx.AsyncClient
) -> None:
    note_id = (await client.post("/notes", json={"title": "seen"})).json()["id"]
    assert (await client.post(f"/notes/{note_id}/view")).status_code == 200
    assert rows(app, Event.kind) == ["viewed"]
    assert_clean(app)


async def test_failure_after_writing_keeps_nothing(
    app: Starlette, client: httpx.AsyncClient
) -> None:
    assert (await client.post("/fail")).status_code == 500
    assert rows(app, Note.title) == []
    assert_clean(app)


async def test_websocket_echo_stores_each_message(app: Starlette) -> None:
    comm = await open_websocket(app)
    for text in ("hi", "there"):
        await comm.send_input({"type": "websocket.receive", "text": text})
        assert (await comm.receive_output(5)) == {"type": "websocket.send", "text": text}
    await comm.send_input({"type": "websocket.disconnect", "code": 1000})
    await comm.wait(5)
    assert rows(app, Message.text) == ["hi", "there"]
    assert_clean(app)
