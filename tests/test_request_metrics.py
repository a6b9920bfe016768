"""What a request did to the database: statements and time in the DEBUG removal line,
``server_timing``, ``max_statements`` and ``tracing``, on both middlewares."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from wsgiref.validate import validator

import httpx
import pytest
from asgiref.testing import ApplicationCommunicator
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import Engine, create_engine, event, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import scoped_session, sessionmaker
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from werkzeug.test import Client

import sessionmw
from sessionmw.metrics import _after_cursor, _before_cursor
from tests.asgi_helpers import Db, build_app
from tests.conftest import assert_clean, count_rows, sqlite_pragmas, user_names
from tests.models import Base, Note, User
from tests.wsgi_helpers import Server

REMOVED = re.compile(
    r"remove (?P<request>.+) \(status (?P<status>\d+)\) after [\d.]+ ms; "
    r"database: (?P<statements>\d+) statements?, (?P<ms>[\d.]+) ms$"
)
TIMING = re.compile(r'^db;dur=(?P<ms>\d+\.\d);desc="(?P<statements>\d+) statements?"$')

pytestmark = pytest.mark.anyio

sqlite_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def client(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def removals(caplog: pytest.LogCaptureFixture) -> list[re.Match[str]]:
    lines = [r.getMessage() for r in caplog.records if r.name == "sessionmw"]
    matches = [REMOVED.match(line) for line in lines if line.startswith("remove ")]
    assert all(matches), lines
    return matches  # type: ignore[return-value]


def timing(response: Any) -> int:
    """The statement count in the response's Server-Timing header."""
    match = TIMING.match(response.headers["server-timing"])
    assert match, response.headers["server-timing"]
    return int(match["statements"])


def listeners(engine: Engine, name: str, fn: Any) -> int:
    return sum(1 for listener in getattr(engine.dispatch, name) if listener is fn)


# -- a WSGI app: n SELECTs, maybe a write, maybe a commit that fails ------------------


def wsgi_app(Session: scoped_session[OrmSession], **options: Any) -> Any:
    def app(environ: Any, start_response: Any) -> list[bytes]:
        path = environ["PATH_INFO"]
        for _ in range(int(environ.get("QUERY_STRING") or 1)):
            Session.execute(text("select 1"))
        if path.startswith("/write/"):
            Session.add(User(name=path.removeprefix("/write/")))
            Session.flush()
        if path == "/commit-fails":
            Session.add(Note(user_id=10**6, body="dangling: fails at COMMIT"))
            Session.flush()
        start_response("201 Created", [("Content-Type", "text/plain")])
        return [b"done"]

    return sessionmw.WSGISessionMiddleware(app, Session, commit="on_success", **options)


# -- the DEBUG line ------------------------------------------------------------------


def test_wsgi_debug_line_counts_statements_and_their_time(
    Session: Any, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    http = Client(validator(wsgi_app(Session)))
    with caplog.at_level(logging.DEBUG, "sessionmw"):
        assert http.get("/write/ann", query_string="3", buffered=True).status_code == 201
        assert http.get("/read", query_string="2", buffered=True).status_code == 201
    first, second = removals(caplog)
    assert (first["request"], first["status"], first["statements"]) == (
        "GET /write/ann",
        "201",
        "4",
    )
    assert float(first["ms"]) > 0
    assert (second["request"], second["statements"]) == ("GET /read", "2")
    assert user_names(engine) == {"ann"}
    assert_clean(Session, engine)


async def test_asgi_debug_line_counts_statements_and_their_time(
    db: Db, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, "sessionmw"):
        async with client(build_app(db)) as c:
            assert (await c.get("/read")).status_code == 200
            assert (await c.post("/write/bob")).status_code == 201
    read, write = removals(caplog)
    assert (read["request"], read["statements"]) == ("GET /read", "1")
    assert (write["request"], write["status"], write["statements"]) == (
        "POST /write/bob",
        "201",
        "1",
    )
    assert float(write["ms"]) > 0  # the INSERT, and the settle's COMMIT
    assert user_names(db.engine) == {"bob"}
    assert_clean(db.session, db.pool_engine, db.tracker)


async def test_statements_of_child_scopes_count_to_their_request(
    db: Db, caplog: pytest.LogCaptureFixture
) -> None:
    """A websocket's messages each get a child scope: their INSERTs are the socket's."""
    app = build_app(db, max_statements=2)
    with caplog.at_level(logging.WARNING, "sessionmw"):
        comm = ApplicationCommunicator(app, {"type": "websocket", "path": "/ws", "headers": []})
        await comm.send_input({"type": "websocket.connect"})
        assert (await comm.receive_output(5))["type"] == "websocket.accept"
        for name in ("a", "b", "c"):
            await comm.send_input({"type": "websocket.receive", "text": name})
            assert (await comm.receive_output(5))["text"] == name
        await comm.send_input({"type": "websocket.disconnect", "code": 1000})
        await comm.wait(5)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("WEBSOCKET /ws ran 3 statements, more than max_statements=2")
    assert user_names(db.engine) == {"a", "b", "c"}
    assert_clean(db.session, db.pool_engine, db.tracker)


# -- Server-Timing --------------------------------------------------------------------


async def test_asgi_server_timing_counts_statements_up_to_the_settle(db: Db) -> None:
    async with client(build_app(db, server_timing=True)) as c:
        read = await c.get("/read")
        write = await c.post("/write/cy")
        untouched = await c.get("/untouched")
    assert (read.status_code, timing(read)) == (200, 1)
    assert (write.status_code, timing(write)) == (201, 1)  # the INSERT; COMMIT is no statement
    assert timing(untouched) == 0
    assert user_names(db.engine) == {"cy"}
    assert_clean(db.session, db.pool_engine, db.tracker)


def test_wsgi_server_timing_is_added_to_the_apps_headers(Session: Any, engine: Engine) -> None:
    http = Client(validator(wsgi_app(Session, server_timing=True)))
    response = http.get("/write/dee", query_string="2", buffered=True)
    assert response.status_code == 201
    assert response.headers["content-type"] == "text/plain"
    assert timing(response) == 3
    assert user_names(engine) == {"dee"}
    assert_clean(Session, engine)


@sqlite_only
async def test_no_header_and_no_listener_when_everything_is_off(
    db: Db, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, "sessionmw"):
        async with client(build_app(db)) as c:
            response = await c.post("/write/eve")
    assert response.status_code == 201
    assert "server-timing" not in response.headers
    assert listeners(db.pool_engine, "before_cursor_execute", _before_cursor) == 0
    assert user_names(db.engine) == {"eve"}


@sqlite_only
def test_wsgi_no_header_when_off(Session: Any, engine: Engine) -> None:
    response = Client(validator(wsgi_app(Session))).get("/read", buffered=True)
    assert response.status_code == 201
    assert "server-timing" not in response.headers
    assert listeners(engine, "before_cursor_execute", _before_cursor) == 0


@sqlite_only
async def test_no_server_timing_on_a_websocket(db: Db) -> None:
    comm = ApplicationCommunicator(
        build_app(db, server_timing=True), {"type": "websocket", "path": "/ws", "headers": []}
    )
    await comm.send_input({"type": "websocket.connect"})
    accept = await comm.receive_output(5)
    assert accept["type"] == "websocket.accept"
    assert all(name.lower() != b"server-timing" for name, _ in accept.get("headers", []))
    await comm.send_input({"type": "websocket.receive", "text": "fay"})
    assert (await comm.receive_output(5))["text"] == "fay"
    await comm.send_input({"type": "websocket.disconnect", "code": 1000})
    await comm.wait(5)
    assert user_names(db.engine) == {"fay"}
    assert_clean(db.session, db.pool_engine, db.tracker)


async def test_asgi_failed_commit_is_a_clean_500(db: Db) -> None:
    async with client(build_app(db, server_timing=True, max_statements=0)) as c:
        response = await c.post("/commit-fails/gus")
        after = await c.get("/read")
    assert response.status_code == 500
    assert "server-timing" not in response.headers  # the settle failed: no hook, no crash
    assert (after.status_code, timing(after)) == (200, 1)
    assert count_rows(db.engine, User) == 0
    assert_clean(db.session, db.pool_engine, db.tracker)


def test_wsgi_failed_commit_is_a_clean_500(Session: Any, engine: Engine) -> None:
    """The commit fails before the server saw a status: the server answers 500 itself."""
    app = wsgi_app(Session, server_timing=True, max_statements=0)
    server = Server()
    with pytest.raises(DBAPIError, match=r"(?i)foreign key"):
        server.call(app, "/commit-fails")
    assert server.statuses == []
    after = Client(app).get("/read", buffered=True)
    assert (after.status_code, timing(after)) == (201, 1)
    assert count_rows(engine, Note) == 0
    assert_clean(Session, engine)


# -- max_statements -------------------------------------------------------------------


@sqlite_only
async def test_asgi_max_statements_warns_once_with_the_count(
    db: Db, caplog: pytest.LogCaptureFixture
) -> None:
    async def loop(request: Request) -> Response:
        for _ in range(5):
            await db.execute(select(User).where(User.name == "nobody"))
        return PlainTextResponse("looped")

    app = Starlette(
        routes=[Route("/loop", loop)],
        middleware=[
            Middleware(sessionmw.ASGISessionMiddleware, session=db.session, max_statements=3)
        ],
    )
    with caplog.at_level(logging.WARNING, "sessionmw"):
        async with client(app) as c:
            assert (await c.get("/loop")).status_code == 200
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("GET /loop ran 5 statements, more than max_statements=3")
    assert_clean(db.session, db.pool_engine, db.tracker)


@sqlite_only
def test_wsgi_max_statements_warns_only_above_the_limit(
    Session: Any, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    http = Client(wsgi_app(Session, max_statements=4))
    with caplog.at_level(logging.WARNING, "sessionmw"):
        assert http.get("/read", query_string="4", buffered=True).status_code == 201
        assert http.get("/many", query_string="6", buffered=True).status_code == 201
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "GET /many ran 6 statements, more than max_statements=4: a query in a loop (N+1)? "
        "Load the related rows up front (selectinload, joinedload)"
    ]
    assert_clean(Session, engine)


@pytest.mark.parametrize("limit", [-1, 2.5, True, "10"])
def test_max_statements_must_be_a_count(Session: Any, limit: Any) -> None:
    with pytest.raises(ValueError, match="max_statements="):
        sessionmw.WSGISessionMiddleware(lambda e, s: [], Session, max_statements=limit)


# -- several databases, listeners once per engine -------------------------------------


@pytest.fixture
def two_files(tmp_path: Path) -> Iterator[tuple[Engine, Engine]]:
    engines = []
    for name in ("a", "b"):
        engine = create_engine(f"sqlite:///{tmp_path / name}.db")
        sqlite_pragmas(engine)
        Base.metadata.create_all(engine)
        engines.append(engine)
    yield engines[0], engines[1]
    for engine in engines:
        engine.dispose()


async def test_asgi_counts_every_database_of_the_request(
    two_files: tuple[Engine, Engine], caplog: pytest.LogCaptureFixture
) -> None:
    engine_a, engine_b = two_files
    A = sessionmw.request_scoped(sessionmaker(bind=engine_a))
    B = sessionmw.request_scoped(sessionmaker(bind=engine_b))

    def both(request: Request) -> Response:
        n = request.path_params["n"]
        A.add(User(name=f"a{n}"))  # flushed by the settle's commit: 1
        B.add(User(name=f"b{n}"))
        B.execute(text("select 1"))  # autoflush, then the SELECT: 2
        return PlainTextResponse("both", status_code=201)

    app = Starlette(
        routes=[Route("/both/{n}", both, methods=["POST"])],
        middleware=[
            # the outer one opens the request: its server_timing holds for both databases;
            # the inner one's max_statements joins in
            Middleware(
                sessionmw.ASGISessionMiddleware,
                session=A,
                commit="on_success",
                state_key="a",
                server_timing=True,
            ),
            Middleware(
                sessionmw.ASGISessionMiddleware,
                session=B,
                commit="on_success",
                state_key="b",
                max_statements=2,
            ),
        ],
    )
    with caplog.at_level(logging.DEBUG, "sessionmw"):
        async with client(app) as c:
            responses = [await c.post(f"/both/{n}") for n in range(3)]
    assert [timing(r) for r in responses] == [3, 3, 3]
    assert [m["statements"] for m in removals(caplog)] == ["3", "3", "3"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert all("ran 3 statements" in w for w in warnings)
    assert user_names(engine_a) == {"a0", "a1", "a2"}
    assert user_names(engine_b) == {"b0", "b1", "b2"}
    for engine in two_files:
        assert listeners(engine, "before_cursor_execute", _before_cursor) == 1
        assert listeners(engine, "after_cursor_execute", _after_cursor) == 1
        assert engine.pool.checkedout() == 0
    assert A.registry.registry == {}
    assert B.registry.registry == {}


def test_wsgi_counts_every_database_of_the_request(two_files: tuple[Engine, Engine]) -> None:
    engine_a, engine_b = two_files
    A = sessionmw.request_scoped(sessionmaker(bind=engine_a))
    B = sessionmw.request_scoped(sessionmaker(bind=engine_b))

    def app(environ: Any, start_response: Any) -> list[bytes]:
        A.execute(text("select 1"))
        B.add(User(name=environ["PATH_INFO"].strip("/")))
        start_response("201 Created", [("Content-Type", "text/plain")])
        return [b"ok"]

    inner = sessionmw.WSGISessionMiddleware(app, B, commit="on_success", environ_key="b")
    outer = sessionmw.WSGISessionMiddleware(
        inner, A, commit="on_success", environ_key="a", server_timing=True
    )
    http = Client(validator(outer))
    assert [timing(http.post(f"/n{n}", buffered=True)) for n in range(3)] == [2, 2, 2]
    assert user_names(engine_b) == {"n0", "n1", "n2"}
    for engine in two_files:
        assert listeners(engine, "before_cursor_execute", _before_cursor) == 1
        assert engine.pool.checkedout() == 0


# -- OpenTelemetry --------------------------------------------------------------------


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


@pytest.fixture
def instrumented(
    db: Db, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """The SQLAlchemy instrumentation's statement spans, for the engine the session uses."""
    provider, _ = spans
    # skip_dep_check: the instrumentation declares SQLAlchemy < 2.1, yet works with it
    SQLAlchemyInstrumentor().instrument(
        engine=db.pool_engine, tracer_provider=provider, skip_dep_check=True
    )
    yield spans
    SQLAlchemyInstrumentor().uninstrument()


def request_span(finished: tuple[ReadableSpan, ...]) -> ReadableSpan:
    ours = [s for s in finished if s.name == "sessionmw request"]
    assert len(ours) == 1, [s.name for s in finished]
    return ours[0]


def children(finished: tuple[ReadableSpan, ...], parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return [
        s for s in finished if s.parent is not None and s.parent.span_id == parent.context.span_id
    ]


@pytest.mark.parametrize(
    ("path", "outcome", "events"),
    [
        ("/write/hal", "committed", ["commit", "remove"]),
        ("/write/ida?status=400", "rolled back", ["rollback", "remove"]),
        ("/crash/jo", "failed", ["remove"]),  # removed (rolled back) as the error escapes
    ],
)
async def test_asgi_span_has_events_outcome_and_the_statement_spans_below(
    db: Db,
    instrumented: tuple[TracerProvider, InMemorySpanExporter],
    path: str,
    outcome: str,
    events: list[str],
) -> None:
    provider, exporter = instrumented
    async with client(build_app(db, tracing=provider)) as c:
        await c.post(path)
    finished = exporter.get_finished_spans()
    span = request_span(finished)
    assert [e.name for e in span.events] == events
    assert span.attributes is not None
    assert span.attributes["sessionmw.outcome"] == outcome
    assert span.attributes["sessionmw.statements"] == 1
    assert span.attributes["sessionmw.request"] == "POST " + path.split("?")[0]
    # the INSERT the handler flushed is a span of the instrumentation, under ours (so is
    # the pool's "connect" span, when the request opened a new connection)
    below = [s.name.split()[0] for s in children(finished, span)]
    assert [name for name in below if name != "connect"] == ["INSERT"]
    assert len(below) == len(finished) - 1  # no span of the request is outside ours
    assert_clean(db.session, db.pool_engine, db.tracker)


@sqlite_only
def test_wsgi_span_is_current_while_the_app_and_its_body_run(
    Session: Any, engine: Engine, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    tracer = provider.get_tracer("app")

    def app(environ: Any, start_response: Any) -> Iterator[bytes]:
        with tracer.start_as_current_span("handler"):
            Session.add(User(name="kim"))
            Session.flush()
        start_response("201 Created", [])

        def body() -> Iterator[bytes]:
            with tracer.start_as_current_span("body"):
                Session.execute(text("select 1"))
            yield b"streamed"

        return body()

    http = Client(
        sessionmw.WSGISessionMiddleware(app, Session, commit="on_success", tracing=provider)
    )
    assert http.post("/stream", buffered=True).status_code == 201
    finished = exporter.get_finished_spans()
    span = request_span(finished)
    assert sorted(s.name for s in children(finished, span)) == ["body", "handler"]
    assert [e.name for e in span.events] == ["commit", "remove"]
    assert span.attributes is not None
    assert span.attributes["sessionmw.statements"] == 2  # the INSERT, and the body's SELECT
    assert user_names(engine) == {"kim"}
    assert_clean(Session, engine)


@sqlite_only
def test_tracing_without_opentelemetry_names_the_fix(
    Session: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "sessionmw.tracing", raising=False)
    with pytest.raises(ImportError, match=re.escape('pip install "sessionmw[opentelemetry]"')):
        sessionmw.WSGISessionMiddleware(lambda e, s: [], Session, tracing=True)


def test_tracing_on_an_inner_middleware_alone_is_said_once(
    two_files: tuple[Engine, Engine],
    spans: tuple[TracerProvider, InMemorySpanExporter],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The span must be current before the app runs: only the outermost middleware can
    start it, and an inner one's tracing= is named as having no effect, once."""
    provider, exporter = spans
    A = sessionmw.request_scoped(sessionmaker(bind=two_files[0]))
    B = sessionmw.request_scoped(sessionmaker(bind=two_files[1]))

    def app(environ: Any, start_response: Any) -> list[bytes]:
        B.execute(text("select 1"))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    inner = sessionmw.WSGISessionMiddleware(app, B, environ_key="b", tracing=provider)
    http = Client(sessionmw.WSGISessionMiddleware(inner, A, environ_key="a"))
    with caplog.at_level(logging.WARNING, "sessionmw"):
        for _ in range(2):
            assert http.get("/", buffered=True).status_code == 200
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert warnings[0].startswith("tracing= is set on a middleware stacked inside one")
    assert exporter.get_finished_spans() == ()
    assert B.registry.registry == {}


@sqlite_only
def test_tracing_takes_true_or_a_tracer_provider(Session: Any) -> None:
    with pytest.raises(TypeError, match="TracerProvider"):
        sessionmw.WSGISessionMiddleware(lambda e, s: [], Session, tracing="yes")


def test_the_core_imports_no_opentelemetry_unless_tracing_is_on(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        from sqlalchemy import create_engine, text
        from sqlalchemy.orm import sessionmaker
        import sessionmw

        engine = create_engine("sqlite:///{tmp_path / "core.db"}")
        Session = sessionmw.request_scoped(sessionmaker(bind=engine))

        def app(environ, start_response):
            Session.execute(text("select 1"))
            start_response("200 OK", [])
            return [b"ok"]

        wrapped = sessionmw.WSGISessionMiddleware(app, Session, server_timing=True)
        body = wrapped({{"REQUEST_METHOD": "GET", "PATH_INFO": "/"}}, lambda *a: None)
        assert body == [b"ok"]  # a list goes back as it is, its session already removed
        print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


@sqlite_only
async def test_engine_events_run_in_the_requests_context(db: Db) -> None:
    """A sync session's statement runs in a worker thread that copied the request's
    context; an async driver's in a greenlet that SQLAlchemy gives the caller's context.
    Either way the request's token is there, and the statement is counted to it."""
    seen: list[Any] = []

    async def endpoint(request: Request) -> Response:
        await db.execute(text("select 1"))
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[Route("/", endpoint)],
        middleware=[
            Middleware(sessionmw.ASGISessionMiddleware, session=db.session, server_timing=True)
        ],
    )

    @event.listens_for(db.pool_engine, "before_cursor_execute")
    def remember(*args: Any) -> None:
        seen.append(sessionmw.current_request())

    async with client(app) as c:
        response = await c.get("/")
    assert timing(response) == 1
    assert len(seen) == 1
    assert seen[0].kind == "http"
