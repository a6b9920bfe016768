"""sessionmw.testing: a test's writes roll back, even the app's own commits, and leaks fail.

Each case runs a small pytest session of its own (pytester) against a real database.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine

from tests.conftest import user_names

pytestmark = pytest.mark.usefixtures("engine")  # creates the tables in db_url

ROOT = Path(__file__).resolve().parent.parent

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


# -- sessions that overlap: production's outcome, or a refusal that names the fix ------------

SCENARIO_CONFTEST = """
import os
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import NullPool

import sessionmw
from tests.models import User

URL = os.environ["SESSIONMW_TEST_URL"]
#: "production": no fixture, the sessions use the engine as the app would in production.
ISOLATED = os.environ["SCENARIO_MODE"] != "production"
engine = create_engine(URL)
Session = sessionmw.request_scoped(sessionmaker(bind=engine))
Inner = sessionmw.request_scoped(sessionmaker(bind=engine))  # a second one, same engine
async_url = URL.replace("sqlite://", "sqlite+aiosqlite://").replace("+psycopg", "+asyncpg")
AsyncSession = sessionmw.request_scoped(
    async_sessionmaker(create_async_engine(async_url, poolclass=NullPool))
)

def names():
    with engine.connect() as conn:
        return sorted(conn.scalars(select(User.name)))

@pytest.fixture
def sessionmw_sessions():
    return [Session, Inner]

@pytest.fixture
def anyio_backend():
    return "asyncio"

def pytest_collection_modifyitems(items):
    mark = os.environ.get("SCENARIO_MARK")
    for item in items if mark else ():
        item.add_marker(pytest.mark.sessionmw_isolation(mark))
"""

GATHER_SCENARIO = """
import asyncio
import httpx
import pytest
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.routing import Route
import sessionmw
from conftest import ISOLATED, AsyncSession

pytestmark = [pytest.mark.anyio]
if ISOLATED:
    pytestmark.append(pytest.mark.usefixtures("async_sessionmw_transaction"))

@pytest.fixture
def sessionmw_sessions():
    return [AsyncSession]

async def child(n):
    async with sessionmw.request_scope(AsyncSession):  # the recipe of docs/child-scopes.md
        return await AsyncSession.scalar(text(f"select {n}")), id(AsyncSession())

async def gathered(request):
    results = await asyncio.gather(*(child(n) for n in range(3)))
    values, sessions = zip(*results)
    return JSONResponse({"values": list(values), "sessions": len(set(sessions))})

app = Starlette(routes=[Route("/gather", gathered)], middleware=[
    Middleware(sessionmw.ASGISessionMiddleware, session=AsyncSession, commit="on_success")])

async def test_gather_child_scopes():
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/gather")
    assert response.status_code == 200
    assert response.json() == {"values": [0, 1, 2], "sessions": 3}
    assert AsyncSession.registry.registry == {}
"""

WSGI_SCENARIOS = """
import pytest
from flask import Flask, abort
from sqlalchemy import func, select
import sessionmw
from conftest import ISOLATED, Inner, Session, names
from tests.models import User

if ISOLATED:
    pytestmark = pytest.mark.usefixtures("sessionmw_transaction")

stacked = Flask("stacked")

@stacked.post("/")
def stacked_view():
    Inner.add(User(name="stacked"))
    Inner.flush()  # the inner middleware's session starts first
    seen = Session.scalar(select(func.count()).select_from(User).where(User.name == "stacked"))
    return str(seen)  # production: the outer session cannot see the inner one's write yet

stacked.wsgi_app = sessionmw.WSGISessionMiddleware(
    sessionmw.WSGISessionMiddleware(
        stacked.wsgi_app, Inner, commit="on_success", environ_key="inner"),
    Session, commit="on_success")

audited = Flask("audited")

@audited.post("/")
def audited_view():
    Session.scalar(select(func.count()).select_from(User))  # the request's transaction begins
    with sessionmw.request_scope(Session):  # a child scope commits its audit row
        Session.add(User(name="audit"))
        Session.commit()
    abort(500)  # then the request fails, and its own transaction rolls back

audited.wsgi_app = sessionmw.WSGISessionMiddleware(audited.wsgi_app, Session, commit="on_success")

def test_stacked_sessions_on_one_engine():
    response = stacked.test_client().post("/", buffered=True)
    assert (response.status_code, response.text) == (200, "0")
    assert "stacked" in names()

def test_child_scope_commits_before_the_request_fails():
    assert audited.test_client().post("/", buffered=True).status_code == 500
    assert "audit" in names()
"""


@pytest.fixture
def run_scenarios(
    pytester: pytest.Pytester, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., pytest.RunResult]:
    monkeypatch.setenv("SESSIONMW_TEST_URL", db_url)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(pytester.path), str(ROOT)]))
    pytester.makeconftest(SCENARIO_CONFTEST)
    pytester.makepyfile(test_gather=GATHER_SCENARIO, test_wsgi=WSGI_SCENARIOS)

    def run(mode: str, *args: str) -> pytest.RunResult:
        monkeypatch.setenv("SCENARIO_MODE", mode)
        monkeypatch.setenv("COLUMNS", "300")  # short summary lines that end with the error
        return pytester.runpytest_subprocess("-p", "anyio", "-q", "-p", "no:cacheprovider", *args)

    return run


def test_overlapping_sessions_in_production(
    run_scenarios: Callable[..., pytest.RunResult], engine: Engine
) -> None:
    """The reference: the three scenarios without the plugin; their commits stay."""
    run_scenarios("production").assert_outcomes(passed=3)
    assert user_names(engine) == {"stacked", "audit"}


def test_truncate_isolation_gives_productions_outcome_and_cleans_up(
    run_scenarios: Callable[..., pytest.RunResult], engine: Engine
) -> None:
    result = run_scenarios("isolated", "-o", "sessionmw_isolation=truncate")
    result.assert_outcomes(passed=3)
    assert user_names(engine) == set()


def test_truncate_isolation_per_test_with_the_marker(
    run_scenarios: Callable[..., pytest.RunResult], engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCENARIO_MARK", "truncate")  # the ini option stays "savepoint"
    run_scenarios("isolated").assert_outcomes(passed=3)
    assert user_names(engine) == set()


def test_savepoint_isolation_refuses_overlapping_sessions_with_the_fix(
    run_scenarios: Callable[..., pytest.RunResult], engine: Engine
) -> None:
    """One shared connection cannot give these production's outcome: each test fails, and
    says why and what to do, instead of "no such savepoint" or a silently lost commit."""
    result = run_scenarios("isolated")
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) == 0
    assert outcomes["failed"] == 3
    for test in (
        "test_gather.py::test_gather_child_scopes",
        "test_wsgi.py::test_stacked_sessions_on_one_engine",
        "test_wsgi.py::test_child_scope_commits_before_the_request_fails",
    ):  # what fails each test is the refusal, not what the database would have said
        result.stdout.fnmatch_lines([f"FAILED {test} - *OverlappingSessionsError*"])
    output = result.stdout.str()
    assert output.count("began after it on the test's connection were still open") >= 2
    assert "the rollback would undo that commit" in output
    result.stdout.fnmatch_lines(['*@pytest.mark.sessionmw_isolation("truncate")*'])
    assert user_names(engine) == set()
