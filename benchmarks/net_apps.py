"""The apps of the networked benchmark (``network.py``), one per server process.

uvicorn: ``uvicorn --factory net_apps:app``; gunicorn: ``gunicorn 'net_apps:app()'``. The
variant, the database URLs and the pool come from the environment (``BENCH_VARIANT``,
``BENCH_SYNC_URL``, ``BENCH_ASYNC_URL``, ``BENCH_POOL``), since both servers import the app
by name.

Unlike part 1's apps (``variants.py``, ``async def`` everywhere), these are written the way
production code is: a sync Session is used from **sync ``def`` endpoints**, which FastAPI
runs in its thread pool, and an ``AsyncSession`` from ``async def`` endpoints. Every app
serves ``/one`` (one primary-key SELECT through the variant's session) and ``/none``, an
``async def`` route (a plain ``def`` in Flask) that never touches the database and declares
no session dependency: its latency under load is the event loop's lag.

Peers are imported inside their builders, so this module also runs in fastapi-sqla's own
virtualenv, which has neither sessionmw nor the other peers.
"""

# No ``from __future__ import annotations``: FastAPI reads the ``Annotated[..., Depends(...)]``
# of the endpoints below at run time, which needs them evaluated.

import json
import os
from collections.abc import Callable, Iterator
from typing import Annotated, Any

from common import Item
from sqlalchemy import Engine, create_engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.ext.asyncio import create_async_engine as _create_async_engine
from sqlalchemy.orm import Session, sessionmaker


def _pool() -> dict[str, Any]:
    return dict(json.loads(os.environ.get("BENCH_POOL", "{}")))


def sync_engine() -> Engine:
    return create_engine(os.environ["BENCH_SYNC_URL"], **_pool())


def async_engine() -> AsyncEngine:
    return _create_async_engine(os.environ["BENCH_ASYNC_URL"], **_pool())


def _name(item: Item | None) -> str:
    assert item is not None
    return item.name


# --- FastAPI on uvicorn -----------------------------------------------------------------------


def _fastapi(one: Callable[..., Any], **kwargs: Any) -> Any:
    from fastapi import FastAPI
    from fastapi.responses import PlainTextResponse

    async def none() -> Any:
        return PlainTextResponse("ok")

    app = FastAPI(**kwargs)
    app.get("/none")(none)
    app.get("/one")(one)
    return app


def _text(body: str) -> Any:
    from fastapi.responses import PlainTextResponse

    return PlainTextResponse(body)


def fastapi_hand_sync() -> Any:
    """The reference: a Session opened and closed inside the endpoint's own thread."""
    local = sessionmaker(sync_engine())

    def one() -> Any:
        with local() as session:
            return _text(_name(session.get(Item, 1)))

    return _fastapi(one)


def fastapi_depends_def() -> Any:
    """FastAPI's tutorial ``get_db``: a ``def`` generator; FastAPI runs it in its thread pool."""
    from fastapi import Depends

    local = sessionmaker(sync_engine())

    def get_db() -> Iterator[Session]:
        db = local()
        try:
            yield db
        finally:
            db.close()

    def one(db: Annotated[Session, Depends(get_db)]) -> Any:
        return _text(_name(db.get(Item, 1)))

    return _fastapi(one)


def _sessionmw(
    factory: Any, commit: str, one_sync: bool, depends: bool = False, in_thread: bool = False
) -> Any:
    """The README's recipe: the middleware, and endpoints that call the scoped_session
    proxy (this request's Session); with ``depends``, an ``async def`` dependency that
    returns it instead (FastAPI's dependency resolution then runs on every request); with
    ``in_thread``, the ``def`` endpoint decorated with ``@sessionmw.ends_in_thread``."""
    from fastapi import Depends

    import sessionmw

    scoped = sessionmw.request_scoped(factory)

    async def get_db() -> Any:
        return scoped()

    if one_sync and depends:

        def one(db: Annotated[Session, Depends(get_db)]) -> Any:
            return _text(_name(db.get(Item, 1)))

    elif one_sync:

        def one() -> Any:
            return _text(_name(scoped.get(Item, 1)))

        if in_thread:
            one = sessionmw.ends_in_thread(one)

    elif depends:

        async def one(db: Annotated[AsyncSession, Depends(get_db)]) -> Any:
            return _text(_name(await db.get(Item, 1)))

    else:

        async def one() -> Any:
            return _text(_name(await scoped.get(Item, 1)))

    app = _fastapi(one)
    app.add_middleware(sessionmw.ASGISessionMiddleware, session=scoped, commit=commit)
    return app


def fastapi_sessionmw_sync_manual() -> Any:
    return _sessionmw(sessionmaker(sync_engine()), "manual", one_sync=True)


def fastapi_sessionmw_sync_on_success() -> Any:
    return _sessionmw(sessionmaker(sync_engine()), "on_success", one_sync=True)


def fastapi_sessionmw_sync_manual_in_thread() -> Any:
    return _sessionmw(sessionmaker(sync_engine()), "manual", one_sync=True, in_thread=True)


def fastapi_sessionmw_sync_on_success_in_thread() -> Any:
    return _sessionmw(sessionmaker(sync_engine()), "on_success", one_sync=True, in_thread=True)


def fastapi_sessionmw_sync_on_success_depends() -> Any:
    return _sessionmw(sessionmaker(sync_engine()), "on_success", one_sync=True, depends=True)


def fastapi_sessionmw_async_manual() -> Any:
    return _sessionmw(async_sessionmaker(async_engine()), "manual", one_sync=False)


def fastapi_sessionmw_async_on_success() -> Any:
    return _sessionmw(async_sessionmaker(async_engine()), "on_success", one_sync=False)


def fastapi_sessionmw_async_on_success_depends() -> Any:
    return _sessionmw(
        async_sessionmaker(async_engine()), "on_success", one_sync=False, depends=True
    )


def fastapi_advanced_alchemy_sync() -> Any:
    """advanced-alchemy's FastAPI extension and its ``provide_session()`` dependency."""
    from advanced_alchemy.extensions.fastapi import AdvancedAlchemy, SQLAlchemySyncConfig
    from fastapi import Depends, FastAPI

    app = FastAPI()
    alchemy = AdvancedAlchemy(SQLAlchemySyncConfig(engine_instance=sync_engine()), app=app)

    def one(db: Annotated[Session, Depends(alchemy.provide_session())]) -> Any:
        return _text(_name(db.get(Item, 1)))

    async def none() -> Any:
        return _text("ok")

    app.get("/none")(none)
    app.get("/one")(one)
    return app


def fastapi_advanced_alchemy_async() -> Any:
    from advanced_alchemy.extensions.fastapi import AdvancedAlchemy, SQLAlchemyAsyncConfig
    from fastapi import Depends, FastAPI

    app = FastAPI()
    alchemy = AdvancedAlchemy(SQLAlchemyAsyncConfig(engine_instance=async_engine()), app=app)

    async def one(db: Annotated[AsyncSession, Depends(alchemy.provide_session())]) -> Any:
        return _text(_name(await db.get(Item, 1)))

    async def none() -> Any:
        return _text("ok")

    app.get("/none")(none)
    app.get("/one")(one)
    return app


def fastapi_hand_async() -> Any:
    """The async reference: ``async with`` an AsyncSession inside the endpoint."""
    local = async_sessionmaker(async_engine())

    async def one() -> Any:
        async with local() as session:
            return _text(_name(await session.get(Item, 1)))

    return _fastapi(one)


def fastapi_sqla_sync() -> Any:
    """fastapi-sqla (in a virtualenv of its own): its middleware and ``fastapi_sqla.Session``.

    It reads its engine from ``sqlalchemy_*`` environment variables (the pool included) and
    opens its session factory at start-up, hence the lifespan.
    """
    from contextlib import asynccontextmanager

    for key, value in _pool().items():  # it lower-cases the names it reads
        os.environ[f"SQLALCHEMY_{key.upper()}"] = str(value)
    os.environ["SQLALCHEMY_URL"] = os.environ["BENCH_SYNC_URL"]
    import fastapi_sqla

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        await fastapi_sqla.startup()
        yield

    def one(session: fastapi_sqla.Session) -> Any:
        return _text(_name(session.get(Item, 1)))

    app = _fastapi(one, lifespan=lifespan)
    fastapi_sqla.setup_middlewares(app)
    return app


# --- Flask on gunicorn gthread --------------------------------------------------------------


def _flask(one: Callable[[], str]) -> Any:
    from flask import Flask

    app = Flask("bench")

    def none() -> str:
        return "ok"

    app.get("/none")(none)
    app.get("/one")(one)
    return app


def flask_hand() -> Any:
    local = sessionmaker(sync_engine())

    def one() -> str:
        with local() as session:
            return _name(session.get(Item, 1))

    return _flask(one)


def _flask_sessionmw(commit: str) -> Any:
    import sessionmw

    scoped = sessionmw.request_scoped(sessionmaker(sync_engine()))

    def one() -> str:
        return _name(scoped.get(Item, 1))

    app = _flask(one)
    app.wsgi_app = sessionmw.WSGISessionMiddleware(app.wsgi_app, scoped, commit=commit)
    return app


def flask_sessionmw_manual() -> Any:
    return _flask_sessionmw("manual")


def flask_sessionmw_on_success() -> Any:
    return _flask_sessionmw("on_success")


def flask_sqlalchemy() -> Any:
    from flask_sqlalchemy import SQLAlchemy

    ext = SQLAlchemy()

    def one() -> str:
        return _name(ext.session.get(Item, 1))

    app = _flask(one)
    app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["BENCH_SYNC_URL"]
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = _pool()
    ext.init_app(app)
    return app


def app() -> Any:
    """The factory both servers call: the builder named by ``BENCH_VARIANT``."""
    builder: Callable[[], Any] = globals()[os.environ["BENCH_VARIANT"]]
    return builder()
