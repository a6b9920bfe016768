"""WSGISessionMiddleware against docs/lifecycle.md: lazy, one per request, removed once always."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator
from typing import Any
from wsgiref.validate import validator

import pytest
from sqlalchemy import Engine, create_engine, insert, select, text
from sqlalchemy.orm import sessionmaker
from werkzeug.middleware.lint import LintMiddleware
from werkzeug.test import Client

import sessionmw
from tests.conftest import Tracker, assert_clean, count_rows, user_names
from tests.models import Base, Note, User
from tests.wsgi_helpers import Server


def text_response(start_response: Any, status: str = "200 OK") -> None:
    start_response(status, [("Content-Type", "text/plain")])


def test_untouched_request_creates_no_session_and_no_connection(
    Session: Any, engine: Engine, tracker: Tracker
) -> None:
    def app(environ: Any, start_response: Any) -> list[bytes]:
        assert environ["sessionmw.session"] is Session
        assert engine.pool.checkedout() == 0
        text_response(start_response)
        return [b"ok"]

    mw = sessionmw.WSGISessionMiddleware(app, Session, commit="on_success")
    assert Server().get(mw) == ("200 OK", b"ok")
    assert tracker.created == []
    assert_clean(Session, engine, tracker)


def test_each_request_gets_its_own_session_and_all_accesses_share_it(
    Session: Any, engine: Engine, tracker: Tracker
) -> None:
    seen: list[tuple[Any, ...]] = []

    def app(environ: Any, start_response: Any) -> Iterator[bytes]:
        via_environ = environ["sessionmw.session"]()
        via_proxy = Session()
        via_proxy.execute(text("select 1"))
        text_response(start_response)
        yield b"a"
        seen.append((via_environ, via_proxy, Session(), sessionmw.current_request()))
        yield b"b"

    mw = sessionmw.WSGISessionMiddleware(app, Session)
    server = Server()
    for _ in range(3):
        assert server.get(mw) == ("200 OK", b"ab")
    assert all(a is b is c for a, b, c, _ in seen)
    assert len({id(s[0]) for s in seen}) == 3
    assert len({id(s[3]) for s in seen}) == 3
    assert all(s[3].kind == "wsgi" for s in seen)
    assert len(tracker.created) == 3
    assert_clean(Session, engine, tracker)


def test_removed_once_when_the_app_raises(Session: Any, engine: Engine, tracker: Tracker) -> None:
    def app(environ: Any, start_response: Any) -> list[bytes]:
        Session.add(User(name="lost"))
        Session.flush()
        raise RuntimeError("boom")

    mw = sessionmw.WSGISessionMiddleware(app, Session, commit="on_success")
    with pytest.raises(RuntimeError, match="boom"):
        Server().call(mw)
    assert count_rows(engine, User) == 0
    assert len(tracker.created) == 1
    assert_clean(Session, engine, tracker)


def test_streamed_body_uses_the_session_until_the_server_closes_it(
    Session: Any, engine: Engine, tracker: Tracker
) -> None:
    with sessionmw.request_scope(Session):
        Session.add_all([User(name=f"u{i}") for i in range(5)])
        Session.commit()
    tracker.created.clear()
    tracker.closes.clear()

    seen: list[Any] = []

    def app(environ: Any, start_response: Any) -> Iterator[bytes]:
        text_response(start_response)
        for n in range(5):
            # the commit before the first chunk ends the transaction, not the session
            user = Session.scalars(select(User).order_by(User.id).offset(n).limit(1)).one()
            seen.append(Session())
            yield f"{user.name}\n".encode()

    mw = sessionmw.WSGISessionMiddleware(app, Session, commit="on_success")
    body = Server().call(mw)
    # the first chunk was made before the server got the status, and committed
    assert len(Session.registry.registry) == 1
    chunks = iter(body)
    assert next(chunks) == b"u0\n"
    assert len(Session.registry.registry) == 1
    assert b"".join(chunks) == b"u1\nu2\nu3\nu4\n"
    assert len(Session.registry.registry) == 1  # still open: not closed by the server yet
    assert len(seen) == 5
    assert all(s is seen[0] for s in seen)
    body.close()  # type: ignore[attr-defined]
    assert_clean(Session, engine, tracker)


def test_iterable_closed_before_it_was_iterated(
    Session: Any, engine: Engine, tracker: Tracker
) -> None:
    class Body:
        def __init__(self) -> None:
            self.closed = 0

        def __iter__(self) -> Iterator[bytes]:
            yield b"x"

        def close(self) -> None:
            self.closed += 1

    app_body = Body()

    def app(environ: Any, start_response: Any) -> Body:
        Session.add(User(name="never sent"))
        Session.flush()
        text_response(start_response)
        return app_body

    mw = sessionmw.WSGISessionMiddleware(app, Session)
    body = Server().call(mw)
    assert engine.pool.checkedout() == 1
    body.close()  # type: ignore[attr-defined]
    body.close()  # type: ignore[attr-defined]  # idempotent
    assert app_body.closed == 1
    assert count_rows(engine, User) == 0  # never committed: closing rolled it back
    assert_clean(Session, engine, tracker)


def test_generator_raising_mid_stream(Session: Any, engine: Engine, tracker: Tracker) -> None:
    closed: list[bool] = []

    def app(environ: Any, start_response: Any) -> Iterator[bytes]:
        text_response(start_response)
        try:
            Session.execute(text("select 1"))
            yield b"first"
            raise ValueError("mid-stream")
        finally:
            closed.append(True)

    mw = sessionmw.WSGISessionMiddleware(app, Session)
    body = Server().call(mw)
    chunks = iter(body)
    assert next(chunks) == b"first"
    with pytest.raises(ValueError, match="mid-stream"):
        next(chunks)
    body.close()  # type: ignore[attr-defined]
    assert closed == [True]
    assert_clean(Session, engine, tracker)


def test_start_response_raising(Session: Any, engine: Engine, tracker: Tracker) -> None:
    def app(environ: Any, start_response: Any) -> list[bytes]:
        Session.add(User(name="x"))
        text_response(start_response)
        return [b"x"]

    mw = sessionmw.WSGISessionMiddleware(app, Session, commit="on_success")
    with pytest.raises(ConnectionResetError):
        Server(fail_start=True).call(mw)
    assert len(tracker.created) == 1
    assert_clean(Session, engine, tracker)


def test_app_closing_its_own_iterable_is_forwarded(Session: Any, engine: Engine) -> None:
    class Body:
        closed = 0

        def __iter__(self) -> Iterator[bytes]:
            yield b"x"

        def close(self) -> None:
            Body.closed += 1

    def app(environ: Any, start_response: Any) -> Body:
        text_response(start_response)
        return Body()

    mw = sessionmw.WSGISessionMiddleware(app, Session)
    Server().get(mw)
    assert Body.closed == 1
    assert_clean(Session, engine)


# -- commit policies ---------------------------------------------------------------


def writing_app(Session: Any, status: str = "200 OK", veto: bool = False) -> Any:
    def app(environ: Any, start_response: Any) -> list[bytes]:
        Session.add(User(name=environ["PATH_INFO"].strip("/")))
        if veto:
            sessionmw.set_rollback()
        text_response(start_response, status)
        return [b"done"]

    return app


@pytest.mark.parametrize(
    ("commit", "status", "veto", "kept"),
    [
        ("manual", "200 OK", False, False),
        ("on_success", "200 OK", False, True),
        ("on_success", "201 Created", False, True),
        ("on_success", "302 Found", False, True),
        ("on_success", "200 OK", True, False),
        ("on_success", "404 Not Found", False, False),
        ("on_success", "409 Conflict", False, False),
        ("on_success", "500 Internal Server Error", False, False),
        (lambda status: status == 200, "200 OK", False, True),
        (lambda status: status == 200, "201 Created", False, False),
        (lambda status: status < 500, "409 Conflict", False, True),
        (lambda status: status < 500, "409 Conflict", True, False),
    ],
)
def test_commit_policy(
    Session: Any,
    engine: Engine,
    tracker: Tracker,
    commit: Any,
    status: str,
    veto: bool,
    kept: bool,
) -> None:
    mw = sessionmw.WSGISessionMiddleware(writing_app(Session, status, veto), Session, commit=commit)
    assert Server().get(mw, "/alice")[0] == status
    assert user_names(engine) == ({"alice"} if kept else set())
    assert_clean(Session, engine, tracker)


def test_on_success_commits_raw_sql_writes(Session: Any, engine: Engine) -> None:
    def app(environ: Any, start_response: Any) -> list[bytes]:
        Session.execute(insert(User).values(name="raw"))
        text_response(start_response)
        return [b""]

    Server().get(sessionmw.WSGISessionMiddleware(app, Session, commit="on_success"))
    assert user_names(engine) == {"raw"}
    assert_clean(Session, engine)


def test_manual_keeps_what_the_app_committed(
    Session: Any, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    def app(environ: Any, start_response: Any) -> list[bytes]:
        Session.add(User(name="saved"))
        Session.commit()
        text_response(start_response)
        return [b""]

    with caplog.at_level(logging.WARNING, "sessionmw"):
        Server().get(sessionmw.WSGISessionMiddleware(app, Session))
    assert user_names(engine) == {"saved"}
    assert caplog.records == []
    assert_clean(Session, engine)


@pytest.mark.parametrize("flush", [False, True])
def test_manual_warns_about_uncommitted_writes_of_a_successful_request(
    Session: Any, engine: Engine, caplog: pytest.LogCaptureFixture, flush: bool
) -> None:
    def app(environ: Any, start_response: Any) -> list[bytes]:
        Session.add(User(name="forgotten"))
        if flush:
            Session.flush()
        text_response(start_response)
        return [b""]

    with caplog.at_level(logging.WARNING, "sessionmw"):
        Server().get(sessionmw.WSGISessionMiddleware(app, Session), "/forgot")
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "GET /forgot" in caplog.records[0].getMessage()
    assert count_rows(engine, User) == 0
    assert_clean(Session, engine)


@pytest.mark.parametrize("end", ["commit", "rollback"])
def test_manual_forgets_flushed_writes_once_their_transaction_ended(
    Session: Any, engine: Engine, caplog: pytest.LogCaptureFixture, end: str
) -> None:
    """The warning is about the transaction the response leaves open: writes flushed in
    one the app then committed or rolled back are not unsaved, even once a later read
    has begun another."""

    def app(environ: Any, start_response: Any) -> list[bytes]:
        Session.add(User(name="settled by the app"))
        Session.flush()
        getattr(Session, end)()
        Session.execute(select(User.id)).all()  # a new transaction, with nothing to save
        text_response(start_response)
        return [b""]

    with caplog.at_level(logging.WARNING, "sessionmw"):
        Server().get(sessionmw.WSGISessionMiddleware(app, Session))
    assert caplog.records == []
    assert count_rows(engine, User) == (1 if end == "commit" else 0)
    assert_clean(Session, engine)


def test_commit_failure_never_reaches_the_server_as_a_success(
    Session: Any, engine: Engine, tracker: Tracker, caplog: pytest.LogCaptureFixture
) -> None:
    def app(environ: Any, start_response: Any) -> list[bytes]:
        Session.add(User(name="with a bad note"))
        Session.add(Note(user_id=999, body="dangling: the deferred foreign key fails at COMMIT"))
        Session.flush()
        text_response(start_response, "201 Created")
        return [b"created"]

    server = Server()
    mw = sessionmw.WSGISessionMiddleware(app, Session, commit="on_success")
    with (
        caplog.at_level(logging.ERROR, "sessionmw"),
        pytest.raises(Exception, match=r"(?i)foreign key"),
    ):
        server.call(mw)
    assert server.statuses == []  # the 201 never reached the server
    assert [r.levelname for r in caplog.records] == ["ERROR"]
    assert count_rows(engine, User) == count_rows(engine, Note) == 0
    assert_clean(Session, engine, tracker)


def test_error_handler_replacing_the_status_with_exc_info_rolls_back(
    Session: Any, engine: Engine
) -> None:
    """start_response only records the status; an error handler that calls it again
    with exc_info (as Flask's and Django's do) decides the outcome: roll back."""

    def app(environ: Any, start_response: Any) -> list[bytes]:
        Session.add(User(name="written, then the handler failed"))
        Session.flush()
        text_response(start_response, "200 OK")
        try:
            raise RuntimeError("the handler fails after start_response")
        except RuntimeError:
            start_response("500 Internal Server Error", [], sys.exc_info())
            return [b"error"]

    server = Server()
    status, body = server.get(sessionmw.WSGISessionMiddleware(app, Session, commit="on_success"))
    assert (status, body) == ("500 Internal Server Error", b"error")
    assert count_rows(engine, User) == 0
    assert_clean(Session, engine)


def test_bad_commit_argument_names_the_choices(Session: Any) -> None:
    with pytest.raises(ValueError, match="'manual', 'on_success' or a callable"):
        sessionmw.WSGISessionMiddleware(lambda e, s: [], Session, commit="always")  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_wsgi_refuses_an_async_session(AsyncSession: Any) -> None:
    with pytest.raises(TypeError, match="ASGISessionMiddleware"):
        sessionmw.WSGISessionMiddleware(lambda e, s: [], AsyncSession)


# -- several databases -------------------------------------------------------------


def test_stacked_middlewares_share_one_token_and_remove_both(
    Session: Any, engine: Engine, tracker: Tracker, tmp_path: Any
) -> None:
    other_engine = create_engine(f"sqlite:///{tmp_path / 'other.db'}")
    Base.metadata.create_all(other_engine)
    Other = sessionmw.request_scoped(sessionmaker(bind=other_engine))
    seen: list[Any] = []

    def app(environ: Any, start_response: Any) -> list[bytes]:
        Session.add(User(name="main"))
        Other.add(User(name="other"))
        seen.append(set(Session.registry.registry) | set(Other.registry.registry))
        text_response(start_response)
        return [b""]

    inner = sessionmw.WSGISessionMiddleware(app, Other, commit="on_success", environ_key="other")
    outer = sessionmw.WSGISessionMiddleware(inner, Session, commit="on_success")
    Server().get(outer)
    assert len(seen[0]) == 1  # one token keys both registries
    assert user_names(engine) == {"main"}
    assert user_names(other_engine) == {"other"}
    assert_clean(Session, engine, tracker)
    assert_clean(Other, other_engine)
    other_engine.dispose()


# -- conformance ---------------------------------------------------------------------


@pytest.mark.parametrize("checker", [validator, LintMiddleware])
@pytest.mark.parametrize("streamed", [False, True])
def test_passes_wsgiref_validator_and_werkzeug_lint(
    Session: Any, engine: Engine, streamed: bool, checker: Any
) -> None:
    def app(environ: Any, start_response: Any) -> Any:
        Session.execute(text("select 1"))
        text_response(start_response)
        return iter([b"a", b"b"]) if streamed else [b"ab"]

    wrapped = checker(sessionmw.WSGISessionMiddleware(checker(app), Session))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        response = Client(wrapped).get("/")
        assert response.get_data() == b"ab"
        response.close()
    assert_clean(Session, engine)


def test_debug_log_has_open_commit_and_remove_with_method_path_and_duration(
    Session: Any, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    mw = sessionmw.WSGISessionMiddleware(
        writing_app(Session, "201 Created"), Session, commit="on_success"
    )
    with caplog.at_level(logging.DEBUG, "sessionmw"):
        Server().get(mw, "/logged")
    messages = [r.getMessage() for r in caplog.records]
    assert messages[:2] == ["open GET /logged", "commit GET /logged"]
    assert messages[2].startswith("remove GET /logged (status 201) after ")
    assert messages[2].endswith(" ms")


def test_iterating_the_response_twice_does_not_restart_the_body(
    Session: Any, engine: Engine
) -> None:
    """Werkzeug's test client calls iter() on the response more than once."""

    class Body:
        def __init__(self) -> None:
            self.chunks = [b"a", b"b"]

        def __iter__(self) -> Iterator[bytes]:
            return iter(self.chunks)

    def app(environ: Any, start_response: Any) -> Body:
        text_response(start_response)
        return Body()

    body = Server().call(sessionmw.WSGISessionMiddleware(app, Session))
    first = next(iter(body))
    rest = list(iter(body))
    body.close()  # type: ignore[attr-defined]
    assert [first, *rest] == [b"a", b"b"]
    assert_clean(Session, engine)
