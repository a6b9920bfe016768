"""Every way of giving a request a Session that the benchmark compares, as ready apps.

Each variant serves the same two routes: ``/none`` (never touches the database: what the
session machinery costs by itself) and ``/one`` (one primary-key SELECT). Endpoints are
``async def`` everywhere, so no row pays a thread-pool hop that another does not; a sync
Session then runs its query inline, as the hand-written reference does.

Peers are imported inside their builders: a peer that is missing or broken makes its rows
"unavailable (reason)" instead of stopping the run. The middleware-only peers
(fastapi-sqlalchemy, fastapi-async-sqlalchemy, advanced-alchemy) sit on the same Starlette
app as the hand-written reference, so their rows differ from it only in session handling.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the ``Annotated[...,
# Depends(local_function)]`` of the endpoints below at run time, which needs them evaluated.

from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, cast

from common import ITEM_NAME, Item, async_url, sync_url
from sqlalchemy import Engine, create_engine
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_scoped_session,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, scoped_session, sessionmaker

import sessionmw


@dataclass
class Built:
    """A variant's app and what to ask it after the load: sessions and connections left."""

    app: Any
    engines: list[Engine | AsyncEngine] = field(default_factory=list)
    registries: list[Any] = field(default_factory=list)

    def leftovers(self) -> tuple[int, int]:
        """(Sessions still registered, connections still checked out); both must be 0."""
        sessions = sum(len(r.registry.registry) for r in self.registries)
        conns = 0
        for engine in self.engines:
            sync = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
            conns += sync.pool.checkedout()  # type: ignore[attr-defined]
        return sessions, conns

    async def dispose(self) -> None:
        for engine in self.engines:
            if isinstance(engine, AsyncEngine):
                await engine.dispose()
            else:
                engine.dispose()


@dataclass(frozen=True)
class Variant:
    key: str
    group: str  # "Starlette", "FastAPI" or "Flask": rows are compared within a group
    label: str
    flavor: str  # "sync", "async" or "" (no session at all)
    role: str  # "bare", "reference", "sessionmw" or "peer"
    build: Callable[[Path], Built]

    @property
    def kind(self) -> str:
        return "wsgi" if self.group == "Flask" else "asgi"

    @property
    def name(self) -> str:
        return f"{self.group} · {self.label}"


def _text(body: str) -> Any:
    from starlette.responses import PlainTextResponse

    return PlainTextResponse(body)


#: One pool size for every engine, larger than the 50 requests in flight of the concurrent
#: runs: a run measures session handling, not waiting for a connection. (With the default
#: 5 + 10, a sync Session held across an ``await`` with async endpoints blocks the event loop
#: in the pool's checkout once 15 requests hold one.) The short timeout makes such a stall
#: fail a cell in seconds instead of hanging the run.
POOL = {"pool_size": 20, "max_overflow": 40, "pool_timeout": 5}


def _sync_engine(db: Path) -> Engine:
    return create_engine(sync_url(db), **POOL)


def _async_engine(db: Path) -> AsyncEngine:
    return create_async_engine(async_url(db), **POOL)


# --- Starlette ------------------------------------------------------------------------------


def _starlette(one: Callable[[Any], Any], middleware: list[Any] | None = None) -> Any:
    from starlette.applications import Starlette
    from starlette.routing import Route

    async def none(request: Any) -> Any:
        return _text("ok")

    return Starlette(
        routes=[Route("/none", none), Route("/one", one)],
        middleware=middleware or [],
    )


def starlette_bare(db: Path) -> Built:
    async def one(request: Any) -> Any:
        return _text(ITEM_NAME)

    return Built(_starlette(one))


def starlette_handwritten_sync(db: Path) -> Built:
    engine = _sync_engine(db)
    local = sessionmaker(engine)

    async def one(request: Any) -> Any:
        with local() as session:
            item = session.get(Item, 1)
            assert item is not None
            return _text(item.name)

    return Built(_starlette(one), [engine])


def starlette_handwritten_async(db: Path) -> Built:
    engine = _async_engine(db)
    local = async_sessionmaker(engine)

    async def one(request: Any) -> Any:
        async with local() as session:
            item = await session.get(Item, 1)
            assert item is not None
            return _text(item.name)

    return Built(_starlette(one), [engine])


def starlette_sessionmw_sync(db: Path) -> Built:
    from starlette.middleware import Middleware

    engine = _sync_engine(db)
    scoped = cast("scoped_session[Session]", sessionmw.request_scoped(sessionmaker(engine)))

    async def one(request: Any) -> Any:
        item = request.state.db.get(Item, 1)
        return _text(item.name)

    mw = [Middleware(sessionmw.ASGISessionMiddleware, session=scoped)]
    return Built(_starlette(one, mw), [engine], [scoped])


def starlette_sessionmw_async(db: Path) -> Built:
    from starlette.middleware import Middleware

    engine = _async_engine(db)
    scoped = cast(
        "async_scoped_session[AsyncSession]", sessionmw.request_scoped(async_sessionmaker(engine))
    )

    async def one(request: Any) -> Any:
        item = await request.state.db.get(Item, 1)
        return _text(item.name)

    mw = [Middleware(sessionmw.ASGISessionMiddleware, session=scoped)]
    return Built(_starlette(one, mw), [engine], [scoped])


def starlette_fastapi_sqlalchemy(db: Path) -> Built:
    from fastapi_sqlalchemy import DBSessionMiddleware
    from fastapi_sqlalchemy import db as peer_db
    from starlette.middleware import Middleware

    engine = _sync_engine(db)

    async def one(request: Any) -> Any:
        item = peer_db.session.get(Item, 1)
        assert item is not None
        return _text(item.name)

    mw = [Middleware(DBSessionMiddleware, custom_engine=engine)]
    return Built(_starlette(one, mw), [engine])


def starlette_fastapi_async_sqlalchemy(db: Path) -> Built:
    from fastapi_async_sqlalchemy import SQLAlchemyMiddleware
    from fastapi_async_sqlalchemy import db as peer_db
    from starlette.middleware import Middleware

    engine = _async_engine(db)

    async def one(request: Any) -> Any:
        item = await peer_db.session.get(Item, 1)
        return _text(item.name)

    mw = [Middleware(SQLAlchemyMiddleware, custom_engine=engine)]
    return Built(_starlette(one, mw), [engine])


def starlette_advanced_alchemy_sync(db: Path) -> Built:
    from advanced_alchemy.extensions.starlette import AdvancedAlchemy, SQLAlchemySyncConfig

    engine = _sync_engine(db)
    alchemy: Any = None

    async def one(request: Any) -> Any:
        item = alchemy.get_sync_session(request).get(Item, 1)
        return _text(item.name)

    app = _starlette(one)
    alchemy = AdvancedAlchemy(SQLAlchemySyncConfig(engine_instance=engine), app=app)
    return Built(app, [engine])


def starlette_advanced_alchemy_async(db: Path) -> Built:
    from advanced_alchemy.extensions.starlette import AdvancedAlchemy, SQLAlchemyAsyncConfig

    engine = _async_engine(db)
    alchemy: Any = None

    async def one(request: Any) -> Any:
        item = await alchemy.get_async_session(request).get(Item, 1)
        return _text(item.name)

    app = _starlette(one)
    alchemy = AdvancedAlchemy(SQLAlchemyAsyncConfig(engine_instance=engine), app=app)
    return Built(app, [engine])


# --- FastAPI ------------------------------------------------------------------------------
# Here the no-DB route declares the variant's session dependency and ignores it: that is
# what a route of an app whose routers all depend on the session pays.


def _fastapi(dependency: Callable[..., Any] | None, one: Callable[..., Any]) -> Any:
    from fastapi import Depends, FastAPI

    async def none_plain() -> Any:
        return _text("ok")

    async def none_with_session(db: Annotated[Any, Depends(dependency)]) -> Any:
        return _text("ok")

    app = FastAPI()
    app.get("/none")(none_plain if dependency is None else none_with_session)
    app.get("/one")(one)
    return app


def fastapi_bare(db: Path) -> Built:
    async def one() -> Any:
        return _text(ITEM_NAME)

    return Built(_fastapi(None, one))


def fastapi_handwritten_sync(db: Path) -> Built:
    engine = _sync_engine(db)
    local = sessionmaker(engine)

    async def one() -> Any:
        with local() as session:
            item = session.get(Item, 1)
            assert item is not None
            return _text(item.name)

    return Built(_fastapi(None, one), [engine])


def fastapi_handwritten_async(db: Path) -> Built:
    engine = _async_engine(db)
    local = async_sessionmaker(engine)

    async def one() -> Any:
        async with local() as session:
            item = await session.get(Item, 1)
            assert item is not None
            return _text(item.name)

    return Built(_fastapi(None, one), [engine])


def fastapi_depends_def(db: Path) -> Built:
    """FastAPI's tutorial: a plain ``def`` generator, which FastAPI runs in its thread pool."""
    from fastapi import Depends

    engine = _sync_engine(db)
    local = sessionmaker(engine)

    def get_db() -> Iterator[Session]:
        with local() as session:
            yield session

    async def one(db: Annotated[Session, Depends(get_db)]) -> Any:
        item = db.get(Item, 1)
        assert item is not None
        return _text(item.name)

    return Built(_fastapi(get_db, one), [engine])


def fastapi_depends_async_def(db: Path) -> Built:
    """The same with an ``async def`` generator: no thread hop, the fast way to write it."""
    from fastapi import Depends

    engine = _sync_engine(db)
    local = sessionmaker(engine)

    async def get_db() -> AsyncIterator[Session]:
        with local() as session:
            yield session

    async def one(db: Annotated[Session, Depends(get_db)]) -> Any:
        item = db.get(Item, 1)
        assert item is not None
        return _text(item.name)

    return Built(_fastapi(get_db, one), [engine])


def fastapi_depends_async_session(db: Path) -> Built:
    from fastapi import Depends

    engine = _async_engine(db)
    local = async_sessionmaker(engine)

    async def get_db() -> AsyncIterator[AsyncSession]:
        async with local() as session:
            yield session

    async def one(db: Annotated[AsyncSession, Depends(get_db)]) -> Any:
        item = await db.get(Item, 1)
        assert item is not None
        return _text(item.name)

    return Built(_fastapi(get_db, one), [engine])


def _fastapi_sessionmw(scoped: Any, one_query: Callable[[Any], Any]) -> Any:
    """The README's recipe: an ``async def`` dependency returning ``request.state.db()``."""
    from fastapi import Depends, Request

    async def get_db(request: Request) -> Any:
        return request.state.db()

    async def one(db: Annotated[Any, Depends(get_db)]) -> Any:
        return _text((await one_query(db)).name)

    app = _fastapi(get_db, one)
    app.add_middleware(sessionmw.ASGISessionMiddleware, session=scoped)
    return app


def fastapi_sessionmw_sync(db: Path) -> Built:
    engine = _sync_engine(db)
    scoped = cast("scoped_session[Session]", sessionmw.request_scoped(sessionmaker(engine)))

    async def query(session: Session) -> Any:
        return session.get(Item, 1)

    return Built(_fastapi_sessionmw(scoped, query), [engine], [scoped])


def fastapi_sessionmw_async(db: Path) -> Built:
    engine = _async_engine(db)
    scoped = cast(
        "async_scoped_session[AsyncSession]", sessionmw.request_scoped(async_sessionmaker(engine))
    )

    async def query(session: AsyncSession) -> Any:
        return await session.get(Item, 1)

    return Built(_fastapi_sessionmw(scoped, query), [engine], [scoped])


# --- Flask (WSGI) ---------------------------------------------------------------------------


def _flask(one: Callable[[], str]) -> Any:
    from flask import Flask

    app = Flask("bench")

    def none() -> str:
        return "ok"

    app.get("/none")(none)
    app.get("/one")(one)
    return app


def flask_bare(db: Path) -> Built:
    def one() -> str:
        return ITEM_NAME

    return Built(_flask(one))


def flask_handwritten(db: Path) -> Built:
    engine = _sync_engine(db)
    local = sessionmaker(engine)

    def one() -> str:
        with local() as session:
            item = session.get(Item, 1)
            assert item is not None
            return item.name

    return Built(_flask(one), [engine])


def flask_sessionmw(db: Path) -> Built:
    engine = _sync_engine(db)
    scoped = cast("scoped_session[Session]", sessionmw.request_scoped(sessionmaker(engine)))

    def one() -> str:
        item = scoped.get(Item, 1)
        assert item is not None
        return item.name

    app = _flask(one)
    app.wsgi_app = sessionmw.WSGISessionMiddleware(app.wsgi_app, scoped)
    return Built(app, [engine], [scoped])


def flask_sqlalchemy(db: Path) -> Built:
    from flask_sqlalchemy import SQLAlchemy

    ext = SQLAlchemy()

    def one() -> str:
        item = ext.session.get(Item, 1)
        assert item is not None
        return item.name

    app = _flask(one)
    app.config["SQLALCHEMY_DATABASE_URI"] = sync_url(db)
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = dict(POOL)
    ext.init_app(app)
    with app.app_context():
        engine = ext.engine
    return Built(app, [engine], [ext.session])


VARIANTS: list[Variant] = [
    Variant("starlette-bare", "Starlette", "bare (no middleware)", "", "bare", starlette_bare),
    Variant(
        "starlette-hand-sync",
        "Starlette",
        "hand-written sync",
        "sync",
        "reference",
        starlette_handwritten_sync,
    ),
    Variant(
        "starlette-hand-async",
        "Starlette",
        "hand-written async",
        "async",
        "reference",
        starlette_handwritten_async,
    ),
    Variant(
        "starlette-sessionmw-sync",
        "Starlette",
        "sessionmw sync",
        "sync",
        "sessionmw",
        starlette_sessionmw_sync,
    ),
    Variant(
        "starlette-sessionmw-async",
        "Starlette",
        "sessionmw async",
        "async",
        "sessionmw",
        starlette_sessionmw_async,
    ),
    Variant(
        "starlette-fastapi-sqlalchemy",
        "Starlette",
        "fastapi-sqlalchemy",
        "sync",
        "peer",
        starlette_fastapi_sqlalchemy,
    ),
    Variant(
        "starlette-fastapi-async-sqlalchemy",
        "Starlette",
        "fastapi-async-sqlalchemy",
        "async",
        "peer",
        starlette_fastapi_async_sqlalchemy,
    ),
    Variant(
        "starlette-advanced-alchemy-sync",
        "Starlette",
        "advanced-alchemy sync",
        "sync",
        "peer",
        starlette_advanced_alchemy_sync,
    ),
    Variant(
        "starlette-advanced-alchemy-async",
        "Starlette",
        "advanced-alchemy async",
        "async",
        "peer",
        starlette_advanced_alchemy_async,
    ),
    Variant("fastapi-bare", "FastAPI", "bare (no session)", "", "bare", fastapi_bare),
    Variant(
        "fastapi-hand-sync",
        "FastAPI",
        "hand-written sync",
        "sync",
        "reference",
        fastapi_handwritten_sync,
    ),
    Variant(
        "fastapi-hand-async",
        "FastAPI",
        "hand-written async",
        "async",
        "reference",
        fastapi_handwritten_async,
    ),
    Variant(
        "fastapi-depends-def",
        "FastAPI",
        "Depends, def yield (sync)",
        "sync",
        "peer",
        fastapi_depends_def,
    ),
    Variant(
        "fastapi-depends-async-def",
        "FastAPI",
        "Depends, async def yield (sync)",
        "sync",
        "peer",
        fastapi_depends_async_def,
    ),
    Variant(
        "fastapi-depends-async",
        "FastAPI",
        "Depends, async def yield (async)",
        "async",
        "peer",
        fastapi_depends_async_session,
    ),
    Variant(
        "fastapi-sessionmw-sync",
        "FastAPI",
        "sessionmw sync",
        "sync",
        "sessionmw",
        fastapi_sessionmw_sync,
    ),
    Variant(
        "fastapi-sessionmw-async",
        "FastAPI",
        "sessionmw async",
        "async",
        "sessionmw",
        fastapi_sessionmw_async,
    ),
    Variant("flask-bare", "Flask", "bare (no session)", "", "bare", flask_bare),
    Variant("flask-hand", "Flask", "hand-written", "sync", "reference", flask_handwritten),
    Variant("flask-sessionmw", "Flask", "sessionmw", "sync", "sessionmw", flask_sessionmw),
    Variant("flask-sqlalchemy", "Flask", "Flask-SQLAlchemy", "sync", "peer", flask_sqlalchemy),
]


def reference_for(variant: Variant) -> Variant | None:
    """The hand-written row of the same group and flavor (the group's bare row if none)."""
    for other in VARIANTS:
        if other.group != variant.group:
            continue
        if other.role == "reference" and other.flavor == (variant.flavor or "sync"):
            return other
    return None


def bare_for(variant: Variant) -> Variant:
    return next(v for v in VARIANTS if v.group == variant.group and v.role == "bare")
