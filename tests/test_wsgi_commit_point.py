"""WSGI: the commit waits until the response can really start (PEP 3333).

``start_response`` only records the status; the headers leave with the first non-empty
chunk.  So the request is settled then, with the status in force then: when the app
returns a list, before the first non-empty chunk, at the first ``write()``, or when the
body ends without a chunk.  Anything that fails before that point rolls back.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from typing import Any
from wsgiref.util import FileWrapper

import pytest
from sqlalchemy import Engine

import sessionmw
from tests.conftest import Tracker, assert_clean, count_rows, user_names
from tests.models import Note, User
from tests.wsgi_helpers import Server


def on_success(app: Any, Session: Any) -> sessionmw.WSGISessionMiddleware:
    return sessionmw.WSGISessionMiddleware(app, Session, commit="on_success")


def write_user(Session: Any, name: str) -> None:
    Session.add(User(name=name))
    Session.flush()


def test_app_raising_after_start_response_rolls_back(Session: Any, engine: Engine) -> None:
    def app(environ: Any, start_response: Any) -> list[bytes]:
        write_user(Session, "raised after start_response")
        start_response("200 OK", [])
        raise RuntimeError("after start_response")

    with pytest.raises(RuntimeError, match="after start_response"):
        Server().call(on_success(app, Session))
    assert count_rows(engine, User) == 0
    assert_clean(Session, engine)


def test_generator_failing_before_its_first_chunk_rolls_back(
    Session: Any, engine: Engine, tracker: Tracker
) -> None:
    """A Flask streamed Response whose generator raises first thing."""

    def app(environ: Any, start_response: Any) -> Iterator[bytes]:
        write_user(Session, "streamed, then failed")
        start_response("200 OK", [])
        return fail_first()

    def fail_first() -> Iterator[bytes]:
        raise RuntimeError("before the first chunk")
        yield b"never"

    server = Server()
    with pytest.raises(RuntimeError, match="before the first chunk"):
        server.get(on_success(app, Session))
    assert count_rows(engine, User) == 0
    assert_clean(Session, engine, tracker)


def test_empty_chunks_do_not_start_the_response(Session: Any, engine: Engine) -> None:
    def app(environ: Any, start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])
        write_user(Session, "after empty chunks")
        yield b""
        yield b""
        raise RuntimeError("failed before any byte left")

    with pytest.raises(RuntimeError):
        Server().get(on_success(app, Session))
    assert count_rows(engine, User) == 0
    assert_clean(Session, engine)


def test_commit_happens_before_the_first_chunk_reaches_the_server(
    Session: Any, engine: Engine
) -> None:
    rows_when_chunk_left: list[int] = []

    def app(environ: Any, start_response: Any) -> Iterator[bytes]:
        start_response("201 Created", [])
        write_user(Session, "streamed")
        yield b"first"
        yield b"second"

    body = Server().call(on_success(app, Session))
    chunks = iter(body)
    assert next(chunks) == b"first"
    rows_when_chunk_left.append(count_rows(engine, User))
    assert list(chunks) == [b"second"]
    body.close()  # type: ignore[attr-defined]
    assert rows_when_chunk_left == [1]
    assert_clean(Session, engine)


def test_commit_failure_before_the_first_chunk_raises_from_the_body(
    Session: Any, engine: Engine, tracker: Tracker
) -> None:
    def app(environ: Any, start_response: Any) -> Iterator[bytes]:
        start_response("201 Created", [])
        write_user(Session, "with a bad note")
        Session.add(Note(user_id=999, body="dangling: fails at COMMIT"))
        Session.flush()
        yield b"created"

    server = Server()
    with pytest.raises(Exception, match=r"(?i)foreign key"):
        server.call(on_success(app, Session))
    assert server.statuses == []  # the 201 never reached the server
    assert count_rows(engine, User) == count_rows(engine, Note) == 0
    assert_clean(Session, engine, tracker)


def test_body_ending_without_a_chunk_settles_with_the_status_in_force(
    Session: Any, engine: Engine
) -> None:
    def app(environ: Any, start_response: Any) -> Iterator[bytes]:
        start_response("204 No Content", [])
        write_user(Session, "no content")
        yield from ()

    status, body = Server().get(on_success(app, Session))
    assert (status, body) == ("204 No Content", b"")
    assert user_names(engine) == {"no content"}
    assert_clean(Session, engine)


def test_a_status_replaced_with_exc_info_before_the_first_chunk_rolls_back(
    Session: Any, engine: Engine
) -> None:
    """A streamed body whose generator fails and whose error handling answers 500."""

    def app(environ: Any, start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])
        write_user(Session, "replaced by a 500")
        try:
            raise ValueError("handled")
        except ValueError:
            start_response("500 Internal Server Error", [], sys.exc_info())
        yield b"error page"

    status, body = Server().get(on_success(app, Session))
    assert (status, body) == ("500 Internal Server Error", b"error page")
    assert count_rows(engine, User) == 0
    assert_clean(Session, engine)


def test_write_callable_settles_before_its_first_write(Session: Any, engine: Engine) -> None:
    rows_at_write: list[int] = []

    def app(environ: Any, start_response: Any) -> list[bytes]:
        write = start_response("200 OK", [])
        write_user(Session, "via write()")
        write(b"legacy")
        rows_at_write.append(count_rows(engine, User))
        return []

    status, _ = Server().get(on_success(app, Session))
    assert status == "200 OK"
    assert rows_at_write == [1]
    assert_clean(Session, engine)


def test_list_body_is_settled_and_removed_before_the_server_gets_it(
    Session: Any, engine: Engine, tracker: Tracker
) -> None:
    app_body = [b"done"]

    def app(environ: Any, start_response: Any) -> list[bytes]:
        write_user(Session, "list body")
        start_response("201 Created", [])
        return app_body

    body = Server().call(on_success(app, Session))
    assert body is app_body  # nothing of the app runs any more: no wrapper needed
    assert user_names(engine) == {"list body"}
    assert_clean(Session, engine, tracker)


def test_file_wrapper_reaches_the_server_unwrapped(Session: Any, engine: Engine) -> None:
    """A server's ``wsgi.file_wrapper`` must come back as is, or its sendfile is lost."""
    wrappers: list[Any] = []

    def app(environ: Any, start_response: Any) -> Any:
        write_user(Session, "sent a file")
        start_response("200 OK", [])
        wrapper = environ["wsgi.file_wrapper"](io.BytesIO(b"file body"))
        wrappers.append(wrapper)
        return wrapper

    body = Server().call(
        on_success(app, Session), environ_overrides={"wsgi.file_wrapper": FileWrapper}
    )
    assert body is wrappers[0]
    assert user_names(engine) == {"sent a file"}
    assert_clean(Session, engine)


def test_file_wrapper_whose_commit_fails_is_closed_and_raises(Session: Any, engine: Engine) -> None:
    files: list[io.BytesIO] = []

    def app(environ: Any, start_response: Any) -> Any:
        Session.add(Note(user_id=999, body="dangling"))
        Session.flush()
        start_response("200 OK", [])
        files.append(io.BytesIO(b"never sent"))
        return environ["wsgi.file_wrapper"](files[0])

    with pytest.raises(Exception, match=r"(?i)foreign key"):
        Server().call(
            on_success(app, Session), environ_overrides={"wsgi.file_wrapper": FileWrapper}
        )
    assert files[0].closed
    assert count_rows(engine, Note) == 0
    assert_clean(Session, engine)
