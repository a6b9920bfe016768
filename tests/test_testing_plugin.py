"""sessionmw.testing: a test's writes roll back, even the app's own commits, and leaks fail.

Each case runs a small pytest session of its own (pytester) against a real database.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("engine")  # creates the tables in db_url

CONFTEST = """
import os
import pytest
from flask import Flask
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import sessionmw
from tests.models import User

URL = os.environ["SESSIONMW_TEST_URL"]
engine = create_engine(URL)
Session = sessionmw.request_scoped(sessionmaker(bind=engine))

flask_app = Flask(__name__)
flask_app.wsgi_app = sessionmw.WSGISessionMiddleware(flask_app.wsgi_app, Session)

@flask_app.post("/users/<name>")
def create(name):
    Session.add(User(name=name))
    Session.commit()  # the app's own commit: only a savepoint under the fixture
    return "", 201

def count():
    with sessionmw.request_scope(Session):
        return Session.scalar(select(func.count()).select_from(User))

@pytest.fixture
def sessionmw_sessions():
    return [Session]

@pytest.fixture
def anyio_backend():
    return "asyncio"
"""

TESTS = """
import pytest
from conftest import Session, count, flask_app
from tests.models import User
import sessionmw

@pytest.mark.usefixtures("sessionmw_transaction", "sessionmw_no_leaks")
def test_a_writes():
    client = flask_app.test_client()
    for name in ("a1", "a2"):
        assert client.post(f"/users/{name}", buffered=True).status_code == 201
    with sessionmw.request_scope(Session):
        Session.add(User(name="a3"))
        Session.commit()
    assert count() == 3   # the test sees its own writes

@pytest.mark.usefixtures("sessionmw_transaction")
def test_b_sees_nothing_of_a():
    assert count() == 0

def test_c_outside_the_fixture_nothing_either():
    assert count() == 0
"""

ASYNC_TESTS = """
import os
import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route
import sessionmw
from tests.models import User

url = os.environ["SESSIONMW_TEST_URL"]
url = url.replace("sqlite://", "sqlite+aiosqlite://").replace("+psycopg", "+asyncpg")
# NullPool: each anyio test runs on a loop of its own, and asyncpg connections are loop-bound.
engine = create_async_engine(url, poolclass=NullPool)
AsyncSession = sessionmw.request_scoped(async_sessionmaker(engine))

async def create(request):
    AsyncSession.add(User(name=request.path_params["name"]))
    return PlainTextResponse("", status_code=201)  # committed by the middleware

app = Starlette(routes=[Route("/users/{name}", create, methods=["POST"])], middleware=[
    Middleware(sessionmw.ASGISessionMiddleware, session=AsyncSession, commit="on_success")])

async def count():
    async with sessionmw.request_scope(AsyncSession):
        return await AsyncSession.scalar(select(func.count()).select_from(User))

@pytest.fixture
def sessionmw_sessions():
    return [AsyncSession]

@pytest.mark.anyio
@pytest.mark.usefixtures("async_sessionmw_transaction")
async def test_a_writes_through_asgi():
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.post("/users/x")).status_code == 201
    assert await count() == 1

@pytest.mark.anyio
async def test_b_sees_nothing():
    assert await count() == 0
"""

LEAKY = """
import pytest
from conftest import Session
from sqlalchemy import text
import sessionmw

@pytest.mark.usefixtures("sessionmw_no_leaks")
def test_leaves_a_session_open():
    scope = sessionmw.request_scope(Session)
    scope.__enter__()
    Session.execute(text("select 1"))
"""


@pytest.fixture
def run(pytester: pytest.Pytester, db_url: str, monkeypatch: pytest.MonkeyPatch) -> object:
    monkeypatch.setenv("SESSIONMW_TEST_URL", db_url)
    pytester.makeconftest(CONFTEST)
    root = Path(__file__).resolve().parent.parent
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(pytester.path), str(root)]))

    def run(source: str) -> pytest.RunResult:
        pytester.makepyfile(test_inner=source)
        return pytester.runpytest_subprocess("-p", "anyio", "-q")

    return run


def test_writes_roll_back_between_tests(run: object) -> None:
    result = run(TESTS)  # type: ignore[operator]
    result.assert_outcomes(passed=3)


def test_async_writes_through_asgi_roll_back(run: object) -> None:
    result = run(ASYNC_TESTS)  # type: ignore[operator]
    result.assert_outcomes(passed=2)


def test_a_leak_fails_the_test(run: object) -> None:
    result = run(LEAKY)  # type: ignore[operator]
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*sessions were never removed*"])
