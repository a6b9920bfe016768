"""The typed spellings the docs teach: they work at run time and pass ``mypy --strict``.

- ``request_scoped`` gives ``scoped_session[S]`` for a ``sessionmaker[S]`` and
  ``async_scoped_session[AS]`` for an ``async_sessionmaker[AS]``.
- A FastAPI dependency or a Starlette handler reaches the request's Session by calling the
  scoped_session, ``Session()``: typed as the factory's class, where ``request.state.db`` is
  ``Any`` (and returning it from a typed dependency fails ``no-any-return``).
- ``sessionmw.wrap_wsgi_app(app, Session, ...)`` wraps Flask's ``wsgi_app`` with the
  middleware's own, checked, arguments, where ``app.wsgi_app = ...`` fails
  ``method-assign``.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations, which
# name dependencies local to a test.
from pathlib import Path
from typing import Annotated

import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException, Request
from flask import Flask, abort
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncSession as AsyncOrmSession
from sqlalchemy.ext.asyncio import async_scoped_session
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import scoped_session

import sessionmw
from tests.conftest import Tracker, assert_clean, user_names
from tests.models import User
from tests.typecheck import mypy_strict


@pytest.mark.anyio
async def test_a_fastapi_dependency_returns_the_requests_session_by_calling_the_proxy(
    Session: scoped_session[OrmSession],
    AsyncSession: async_scoped_session[AsyncOrmSession],
    engine: Engine,
    tracker: Tracker,
) -> None:
    seen: list[tuple[object, object, object]] = []

    async def get_db() -> OrmSession:
        return Session()

    async def get_adb() -> AsyncOrmSession:
        return AsyncSession()

    app = FastAPI()
    app.add_middleware(sessionmw.ASGISessionMiddleware, session=Session, commit="on_success")
    app.add_middleware(
        sessionmw.ASGISessionMiddleware, session=AsyncSession, commit="on_success", state_key="adb"
    )

    @app.post("/sync/{name}", status_code=201)
    def create_sync(
        name: str, request: Request, db: Annotated[OrmSession, Depends(get_db)]
    ) -> dict[str, str]:  # in the thread pool
        seen.append((db, request.state.db(), Session()))
        db.add(User(name=name))
        db.flush()
        if name.startswith("taken"):
            raise HTTPException(409, "taken")
        return {"name": name}

    @app.post("/async/{name}", status_code=201)
    async def create_async(
        name: str, request: Request, db: Annotated[AsyncOrmSession, Depends(get_adb)]
    ) -> dict[str, str]:
        seen.append((db, request.state.adb(), AsyncSession()))
        db.add(User(name=name))
        await db.flush()
        if name.startswith("taken"):
            raise HTTPException(409, "taken")
        return {"name": name}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.post("/sync/ann")).status_code == 201
        assert (await client.post("/sync/taken-1")).status_code == 409
        assert (await client.post("/async/bob")).status_code == 201
        assert (await client.post("/async/taken-2")).status_code == 409

    # the dependency's Session is the one request.state holds and the middleware settles
    assert all(dep is state is proxy for dep, state, proxy in seen)
    assert len({id(dep) for dep, _, _ in seen}) == 4  # one per request
    assert user_names(engine) == {"ann", "bob"}  # committed on 201, rolled back on 409
    assert_clean(Session, engine, tracker)
    assert AsyncSession.registry.registry == {}


def test_wrap_wsgi_app_puts_flask_behind_the_middleware(
    Session: scoped_session[OrmSession], engine: Engine, tracker: Tracker
) -> None:
    app = Flask(__name__)
    original = app.wsgi_app
    middleware = sessionmw.wrap_wsgi_app(app, Session, commit="on_success")

    @app.post("/users/<name>")
    def create(name: str) -> tuple[str, int]:
        Session.add(User(name=name))
        Session.flush()
        if name.startswith("taken"):
            abort(409)
        return name, 201

    assert app.wsgi_app is middleware
    assert middleware.app == original
    assert isinstance(middleware, sessionmw.WSGISessionMiddleware)
    client = app.test_client()  # Flask's own client goes through the middleware
    assert client.post("/users/ann", buffered=True).status_code == 201
    assert client.post("/users/taken", buffered=True).status_code == 409
    assert user_names(engine) == {"ann"}
    assert len(tracker.created) == 2
    assert_clean(Session, engine, tracker)


def test_wrap_wsgi_app_takes_only_the_middlewares_arguments(
    Session: scoped_session[OrmSession],
) -> None:
    app = Flask(__name__)
    original = app.wsgi_app
    with pytest.raises(TypeError, match="comit"):
        sessionmw.wrap_wsgi_app(app, Session, comit="on_success")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="scope"):  # the middleware's own start-up checks
        sessionmw.wrap_wsgi_app(app, scoped_session(Session.session_factory))
    assert app.wsgi_app == original  # left as it was


#: What users write, after the docs; its ``reveal_type`` lines must show ``REVEALED``.
DOCUMENTED = """\
from typing import Annotated

import httpx
import sessionmw
from fastapi import Depends, FastAPI
from flask import Flask
from litestar import Litestar
from litestar.middleware import DefineMiddleware
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse

DbSession = sessionmw.request_scoped(sessionmaker(bind=create_engine("sqlite://")))
AsyncDbSession = sessionmw.request_scoped(
    async_sessionmaker(create_async_engine("sqlite+aiosqlite://"))
)
reveal_type(DbSession)
reveal_type(AsyncDbSession)
Routed = sessionmw.request_scoped(
    sessionmaker(bind=create_engine("sqlite://")), replicas=[create_engine("sqlite://")]
)
AsyncRouted = sessionmw.request_scoped(
    async_sessionmaker(create_async_engine("sqlite+aiosqlite://")),
    replicas=(create_async_engine("sqlite+aiosqlite://"),),
    max_replica_lag=2.0,
)
reveal_type(Routed)
reveal_type(AsyncRouted)


class MySession(Session):
    pass


Mine = sessionmw.request_scoped(sessionmaker(class_=MySession))
reveal_type(Mine())


async def get_db() -> Session:
    return DbSession()


async def get_adb() -> AsyncSession:
    return AsyncDbSession()


DB = Annotated[Session, Depends(get_db)]
AsyncDB = Annotated[AsyncSession, Depends(get_adb)]

api = FastAPI()
api.add_middleware(sessionmw.ASGISessionMiddleware, session=DbSession, commit="on_success")


@api.get("/names")
def names(db: DB) -> list[str]:
    reveal_type(db)
    return []


async def count(request: Request) -> JSONResponse:
    db = DbSession()
    reveal_type(db)
    return JSONResponse({"path": request.url.path})


class Base(DeclarativeBase):
    pass


class Pet(Base):
    __tablename__ = "pets"
    id: Mapped[int] = mapped_column(primary_key=True)


@api.get("/pets/{pet_id}")
def pet(pet_id: int) -> None:  # the proxy in an endpoint, no dependency
    reveal_type(DbSession.get(Pet, pet_id))


async def async_pet(pet_id: int) -> None:
    reveal_type(await AsyncDbSession.get(Pet, pet_id))


app = Flask(__name__)
middleware = sessionmw.wrap_wsgi_app(app, DbSession, commit="on_success", retries=2)
reveal_type(middleware)
application = sessionmw.WSGISessionMiddleware(Flask(__name__), DbSession)  # for gunicorn only

# The ASGI middleware fits every framework's idea of an ASGI app, both ways round.
wrapped = sessionmw.ASGISessionMiddleware(Litestar(route_handlers=[]), DbSession)
wrapped = sessionmw.ASGISessionMiddleware(Starlette(), session=DbSession)
transport = httpx.ASGITransport(app=wrapped)
defined = DefineMiddleware(sessionmw.ASGISessionMiddleware, session=DbSession)
listed = Middleware(sessionmw.ASGISessionMiddleware, session=DbSession, state_key="db")
"""

REVEALED = [
    "sqlalchemy.orm.scoping.scoped_session[sqlalchemy.orm.session.Session]",
    "sqlalchemy.ext.asyncio.scoping.async_scoped_session["
    "sqlalchemy.ext.asyncio.session.AsyncSession]",
    "sqlalchemy.orm.scoping.scoped_session[sqlalchemy.orm.session.Session]",  # replicas=
    "sqlalchemy.ext.asyncio.scoping.async_scoped_session["
    "sqlalchemy.ext.asyncio.session.AsyncSession]",
    "docs_typed.MySession",
    "sqlalchemy.orm.session.Session",  # a FastAPI dependency's parameter
    "sqlalchemy.orm.session.Session",  # Session() in a Starlette handler
    "docs_typed.Pet | None",  # the proxy's get() in a sync endpoint
    "docs_typed.Pet | None",  # the async proxy's get()
    "sessionmw.wsgi.WSGISessionMiddleware",
]

#: What ``mypy --strict`` refuses, each line with its error code: the spellings the docs
#: replace, and a mistake the overloads catch.
REFUSED = """\
import sessionmw
from flask import Flask
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker
from starlette.requests import Request

DbSession = sessionmw.request_scoped(sessionmaker(bind=create_engine("sqlite://")))


async def get_db(request: Request) -> Session:
    return request.state.db()  # no-any-return


app = Flask(__name__)
app.wsgi_app = sessionmw.WSGISessionMiddleware(app.wsgi_app, DbSession)  # method-assign
sessionmw.wrap_wsgi_app(app, DbSession, comit="on_success")  # call-arg
sessionmw.request_scoped(async_sessionmaker(), replicas=[create_engine("sqlite://")])  # list-item
"""


def test_the_documented_spellings_pass_mypy_strict_and_the_refused_ones_fail(
    tmp_path: Path,
) -> None:
    documented = tmp_path / "docs_typed.py"
    documented.write_text(DOCUMENTED)
    refused = tmp_path / "docs_refused.py"
    refused.write_text(REFUSED)
    report = mypy_strict([documented, refused], tmp_path)

    revealed = report.revealed(documented.name)
    assert list(revealed.values()) == REVEALED, report.output
    errors = [(m.path.name, m.line, m.text) for m in report.errors()]
    expected_errors = [
        ("docs_refused.py", n, line.split("# ")[-1])
        for n, line in enumerate(REFUSED.splitlines(), 1)
        if line.endswith(("# no-any-return", "# method-assign", "# call-arg", "# list-item"))
    ]
    assert [(path, line) for path, line, _ in errors] == [
        (path, line) for path, line, _ in expected_errors
    ], report.output
    for (_, _, text), (_, _, code) in zip(errors, expected_errors, strict=True):
        assert text.endswith(f"[{code}]"), text
