"""The Starlette example: async routes on an ``AsyncSession``, sync routes on a ``Session``.

Two ``ASGISessionMiddleware`` are stacked, one per ``scoped_session``, both over
the same SQLite file: ``AsyncSession()`` is the request's ``AsyncSession`` (aiosqlite)
and ``Session()`` its ``Session`` (sqlite3), which Starlette's thread pool uses for the
plain ``def`` endpoints.  Calling the scoped_session gives the request's session with its
type; ``request.state.adb`` and ``request.state.db`` hold the same scoped_sessions, typed
``Any``.  Both commit when the response is a success, so the failing routes leave
nothing behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import create_engine, func, select
from sqlalchemy.ext.asyncio import AsyncSession as AsyncOrmSession
from sqlalchemy.ext.asyncio import async_scoped_session, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import scoped_session, sessionmaker
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

import sessionmw

from .models import Base, Event, Message, Note

DEFAULT_DATABASE_URL = "sqlite:///starlette_example.db"

Session: scoped_session[OrmSession] = sessionmw.request_scoped(sessionmaker())
AsyncSession: async_scoped_session[AsyncOrmSession] = sessionmw.request_scoped(
    async_sessionmaker(expire_on_commit=False)
)


async def list_notes(request: Request) -> Response:
    db: async_scoped_session[AsyncOrmSession] = request.state.adb  # the same as AsyncSession
    notes = await db.scalars(select(Note).order_by(Note.id))
    return JSONResponse([n.to_json() for n in notes])


async def create_note(request: Request) -> Response:
    data = await _json(request)
    title = _field(data, "title")
    note = Note(title=title, body=str(data.get("body", "")))
    db = AsyncSession()  # this request's AsyncSession
    db.add(note)
    await db.flush()
    same = await db.scalar(
        select(func.count()).select_from(Note).where(func.lower(Note.title) == title.lower())
    )
    if same and same > 1:  # returned after writing: the middleware rolls the insert back
        return JSONResponse({"error": f"a note titled {title!r} exists"}, status_code=409)
    return JSONResponse(note.to_json(), status_code=201)


@sessionmw.ends_in_thread
def get_note(request: Request) -> Response:
    """A sync endpoint: Starlette runs it in its thread pool, on the request's Session,
    which it also ends there (``ends_in_thread``): no round trip is left for after."""
    return JSONResponse(_note(Session(), request.path_params["note_id"]).to_json())


@sessionmw.ends_in_thread
def delete_note(request: Request) -> Response:
    db = Session()  # this request's Session
    db.delete(_note(db, request.path_params["note_id"]))
    return Response(status_code=204)


async def stream_notes(request: Request) -> Response:
    """One JSON line per note, read from the session while the body streams."""
    db = AsyncSession()

    async def lines() -> AsyncIterator[str]:
        async for note in await db.stream_scalars(select(Note).order_by(Note.id)):
            yield json.dumps(note.to_json()) + "\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def record_view(note_id: int) -> None:
    """A background task: runs after the response, still on the request's Session."""
    Session.add(Event(note_id=note_id, kind="viewed"))
    Session.commit()  # the response is sent already, so the task commits its own work


def view_note(request: Request) -> Response:
    note = _note(Session(), request.path_params["note_id"])
    return JSONResponse(note.to_json(), background=BackgroundTask(record_view, note.id))


async def fail_after_writing(request: Request) -> Response:
    """Writes a note, then crashes: the client gets a 500 and the note is not kept."""
    AsyncSession.add(Note(title="never saved"))
    await AsyncSession.flush()
    raise RuntimeError("failed after writing")


async def echo(websocket: WebSocket) -> None:
    """Stores and echoes each message; each message gets a Session of its own (a child scope)."""
    await websocket.accept()
    try:
        while True:
            text = await websocket.receive_text()
            async with sessionmw.request_scope(AsyncSession):
                AsyncSession.add(Message(text=text))
                await AsyncSession.commit()
            await websocket.send_text(text)
    except WebSocketDisconnect:
        pass


async def _json(request: Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise HTTPException(400, "send a JSON object")
    return data


def _field(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value.strip():
        raise HTTPException(400, f"send a non-empty string {name!r}")
    return value.strip()


def _note(db: OrmSession, note_id: int) -> Note:
    note = db.get(Note, note_id)
    if note is None:
        raise HTTPException(404, f"no note {note_id}")
    return note


def create_app(database_url: str | None = None, **engine_options: Any) -> Starlette:
    """Build the app on ``database_url`` (default: ``$DATABASE_URL`` or a SQLite file)."""
    url = database_url or os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL)
    engine = create_engine(url, **engine_options)
    async_url = url.replace("sqlite://", "sqlite+aiosqlite://", 1)
    async_engine = create_async_engine(async_url, **engine_options)
    Base.metadata.create_all(engine)
    Session.session_factory.configure(bind=engine)
    AsyncSession.session_factory.configure(bind=async_engine)

    app = Starlette(
        routes=[
            Route("/notes", list_notes, methods=["GET"]),
            Route("/notes", create_note, methods=["POST"]),
            Route("/notes/stream", stream_notes, methods=["GET"]),
            Route("/notes/{note_id:int}", get_note, methods=["GET"]),
            Route("/notes/{note_id:int}", delete_note, methods=["DELETE"]),
            Route("/notes/{note_id:int}/view", view_note, methods=["POST"]),
            Route("/fail", fail_after_writing, methods=["POST"]),
            WebSocketRoute("/ws", echo),
        ],
        middleware=[
            Middleware(sessionmw.ASGISessionMiddleware, session=Session, commit="on_success"),
            Middleware(
                sessionmw.ASGISessionMiddleware,
                session=AsyncSession,
                commit="on_success",
                state_key="adb",
            ),
        ],
    )
    app.state.engine = engine
    app.state.async_engine = async_engine
    return app
