"""Request-scoped SQLAlchemy sessions for WSGI applications.

``WSGISessionMiddleware`` opens a request scope for each call, puts the
``scoped_session`` at ``environ["sessionmw.session"]`` and removes the request's
Session exactly once: when the response iterable is closed (after the body has
streamed, or when the server abandons it), at once when the application raises, and
as soon as the app has returned when its body is a list or a ``wsgi.file_wrapper``
(no app code runs after that; the wrapper goes to the server untouched, so its
``sendfile`` still works).  Until then the body may still use the session.

With ``commit="on_success"`` (or a callable) the request's sessions are settled at the
last moment before the headers may leave (PEP 3333: with the first non-empty chunk),
with the status in force then: when the app returns a list, once the first non-empty
chunk of an iterable is made (or it ended without one), or at the first ``write()``.
The server's ``start_response`` gets the status only after that, so an app that raises
after calling ``start_response``, a generator that fails before its first chunk, or an
error handler that calls ``start_response("500 ...", headers, exc_info)`` rolls back,
and a commit that fails raises before the server has seen any status: it answers 500.
Writes made while the rest of the body streams come after that decision and must be
committed by the app.

Stack one middleware per database; they share the request's token, and the outermost
settles every session of the request in one place.  The middleware does not wrap
``async_scoped_session``: WSGI has no event loop to close it on, so serve such apps
through ``ASGISessionMiddleware``.

Usage::

    from sessionmw import WSGISessionMiddleware, request_scoped

    Session = request_scoped(sessionmaker(bind=engine))
    app.wsgi_app = WSGISessionMiddleware(app.wsgi_app, Session, commit="on_success")
"""

from __future__ import annotations

import inspect
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextvars import Context, copy_context
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import scoped_session

from .metrics import observe
from .policy import Commit, CommitPolicy, describe, log, track_unsaved_writes
from .retry import Evidence, RecordingInput, RetryPolicy
from .routing import marker_for, routes
from .scope import TOKEN_KEY, RequestScope, _current, check_request_scoped, is_async
from .unit import Binding, UnitOfWork

if TYPE_CHECKING:
    from _typeshed import OptExcInfo
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
    from opentelemetry.trace import TracerProvider

__all__ = ["WSGISessionMiddleware"]


class WSGISessionMiddleware:
    """Give every WSGI request its own Session from ``session`` and remove it after.

    :param app: the WSGI application to wrap.
    :param session: a ``scoped_session`` keyed by :func:`sessionmw.current_request`.
    :param commit: ``"manual"`` (the app commits), ``"on_success"`` (commit when
        the status is below 400 and :func:`sessionmw.set_rollback` was not
        called) or a callable ``(status) -> bool``.
    :param environ_key: where the ``scoped_session`` is put in the environ.
    :param retries: how often a request that failed with a transient database error
        (:func:`sessionmw.is_transient`) is replayed, when that is safe.
    :param retry_on: ``(exc) -> bool`` in place of :func:`sessionmw.is_transient`.
    :param retry_body_limit: the largest request body, in bytes, kept for a replay.
    :param read_your_writes: with replicas, how many seconds a client that wrote reads
        from the primary (a cookie; 0 turns it off).
    :param read_your_writes_cookie: that cookie's name.
    :param server_timing: add a ``Server-Timing`` header to HTTP responses: the request's
        statements and database time up to and including its settle.
    :param max_statements: log a WARNING when a request runs more statements than this
        (a query in a loop: N+1).
    :param tracing: ``True`` (the global tracer provider) or a ``TracerProvider``: an
        OpenTelemetry span per request, current while the app runs; needs
        ``pip install "sessionmw[opentelemetry]"``.
    """

    def __init__(
        self,
        app: WSGIApplication,
        session: scoped_session[Any],
        *,
        commit: Commit = "manual",
        environ_key: str = "sessionmw.session",
        retries: int = 0,
        retry_on: Callable[[BaseException], bool] | None = None,
        retry_body_limit: int = 1_048_576,
        read_your_writes: float = 5.0,
        read_your_writes_cookie: str = "sessionmw_primary",
        server_timing: bool = False,
        max_statements: int | None = None,
        tracing: bool | TracerProvider = False,
    ) -> None:
        _refuse_asgi_app(app)
        check_request_scoped(session, "WSGISessionMiddleware")
        if is_async(session):
            raise TypeError(
                "WSGISessionMiddleware got an async_scoped_session, which needs an event "
                "loop to close; use a scoped_session over a sessionmaker for WSGI, or "
                "serve the app with sessionmw.ASGISessionMiddleware."
            )
        self.app = app
        self.session = session
        self.policy = CommitPolicy(commit)
        if self.policy.manual:
            track_unsaved_writes(session)
        self.environ_key = environ_key
        marker = marker_for(session, read_your_writes, read_your_writes_cookie)
        options = observe(server_timing, max_statements, tracing)
        self.binding = Binding(session, self.policy, environ_key, marker, options)
        self.retry = RetryPolicy(retries, retry_on, retry_body_limit, routes(session))

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        environ[self.environ_key] = self.session
        outer = _current.get()
        unit = outer.unit if outer is not None else None
        if unit is not None and environ.get(TOKEN_KEY) is outer:
            unit.add(self.binding)  # stacked: the outermost middleware settles all
            return self.app(environ, start_response)
        if _orphans:
            _close_orphans()
        if self.retry.replays and self.retry.may_replay(environ.get("REQUEST_METHOD", "")):
            return self._serve_with_replays(environ, start_response)
        response = self._open(environ, start_response)
        try:
            response.context.run(response.serve, self.app)
        except BaseException:
            response.unit.failed = True
            response.close()
            raise
        return response.hand_over()

    def _open(self, environ: WSGIEnvironment, start_response: StartResponse) -> _Response:
        """A scope of its own for one attempt at the request: the request runs in a
        context of its own, so the server's context never holds the token and nothing
        can leak into the next request of this thread."""
        request = RequestScope("wsgi", environ)
        unit = UnitOfWork(request, self.binding)
        context = copy_context()
        context.run(_current.set, request)
        if unit.metrics is not None:
            context.run(unit.activate)  # the span stays current in the request's context
        environ[TOKEN_KEY] = request
        return _Response(unit, context, start_response)

    def _serve_with_replays(
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> Iterable[bytes]:
        """Serve the request, replaying it on a transient database failure while safe:
        the server sees the status only once the attempt is settled, so a failed
        attempt can still be dropped unseen."""
        retry = self.retry
        length = environ.get("CONTENT_LENGTH")
        body_input = RecordingInput(
            environ["wsgi.input"], retry.body_limit, int(length) if length else None
        )
        original = dict(environ)  # each attempt runs on the server's own environ, as it was
        evidence: Evidence | None = None
        for attempt in range(retry.replays + 1):
            if attempt:
                environ.clear()
                environ.update(original)
            environ["wsgi.input"] = body_input
            response = self._open(environ, start_response)
            unit = response.unit
            unit.evidence = evidence = retry.evidence(evidence)
            escaped: Exception | None = None
            try:
                response.run(self.app)
            except Exception as exc:
                unit.failed = True
                escaped = exc
            except BaseException:
                unit.failed = True
                response.close()
                raise
            error = retry.failure(unit.evidence, escaped)
            if escaped is None and unit.status < 500:
                error = None
            replayable = (
                not response.started and not unit.evidence.committed and body_input.replayable()
            )
            if attempt == retry.replays or error is None or not replayable:
                if escaped is not None:
                    response.close()
                    raise escaped
                return response.hand_over()
            response.close()
            retry.log_replay(unit.request, attempt + 1, retry.replays, error)
            time.sleep(retry.backoff(attempt + 1))
            body_input = RecordingInput(body_input.replay(), retry.body_limit, body_input.length)
        raise AssertionError("unreachable")  # pragma: no cover


#: Per thread, the ends of responses collected in another thread that could not close
#: there: the owning thread runs them before its next request.
_orphans: dict[int, list[Callable[[], None]]] = {}


def _close_orphans() -> None:
    for end in _orphans.pop(threading.get_ident(), ()):
        try:
            end()
        except Exception:
            log.error("closing the session of a collected response failed", exc_info=True)


def _status_code(status: str) -> int:
    try:
        return int(status[:3])
    except ValueError:
        raise ValueError(
            f"start_response() got the status {status!r}; a WSGI status is a string like '200 OK'."
        ) from None


class _Response:
    """One attempt at a request's response.

    The app's status reaches the server only once the request's sessions are settled:
    after the app returned a list or a file wrapper, after the body's first non-empty
    chunk was made (or its end was reached), or at the app's first ``write()``.  That is
    PEP 3333's own rule for when the headers may go out, kept here even for servers that
    send them earlier; and it lets a failed commit, or an attempt to be replayed, never
    reach the client.  Each chunk is made in the request's context; close ends the
    request.  A server (or a test client) that never closes the iterable leaves no token
    behind, since the token only ever lives in the request's own context; the Session is
    then removed when the iterable is collected.
    """

    __slots__ = (
        "_chunks",
        "_done",
        "_first",
        "_pending_start",
        "_server_write",
        "_start_response",
        "_thread",
        "body",
        "closed",
        "context",
        "ended",
        "kind",
        "started",
        "unit",
    )

    def __init__(self, unit: UnitOfWork, context: Context, start_response: StartResponse) -> None:
        self.unit = unit
        self.context = context
        self._start_response = start_response
        self._server_write: Callable[[bytes], object] | None = None
        self._pending_start: tuple[str, list[tuple[str, str]], OptExcInfo | None] | None = None
        self._thread = threading.get_ident()
        self.body: Iterable[bytes] = ()
        self._chunks: Iterator[bytes] | None = None
        self._first = b""
        self._done = False
        #: "iterable", "list" or "file": what the app returned.
        self.kind = "iterable"
        #: Something went to the server through ``write()``: no replay from then on.
        self.started = False
        self.closed = False
        self.ended = False

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None
    ) -> Callable[[bytes], object]:
        """Record the status; it reaches the server once the response can really start."""
        try:
            code = int(status[:3])
        except ValueError:
            code = _status_code(status)
        unit = self.unit
        if exc_info is not None:
            unit.failed = True  # an error response replaces what was started
            unit.status = code
        elif not unit.status:
            unit.status = code
        self._pending_start = (status, headers, exc_info)
        return self.write

    def write(self, data: bytes) -> object:
        """The legacy ``write()`` callable: the headers go out with it, so settle first."""
        self.settle()
        self.forward_start()
        self.started = True
        assert self._server_write is not None
        return self._server_write(data)

    def forward_start(self) -> None:
        """Give the server the status the app gave last."""
        pending, self._pending_start = self._pending_start, None
        if pending is not None:
            status, headers, exc_info = pending
            unit = self.unit
            if self._server_write is None and (unit.request.wrote or unit.metrics is not None):
                extra = unit.response_headers()
                if extra:  # once: not again for an error status that replaces a started one
                    headers = [*headers, *extra]
            self._server_write = self._start_response(status, headers, exc_info)

    def run(self, app: WSGIApplication) -> None:
        """Call the app, make the body's first chunk (unless the body is a list or a file
        wrapper, where no app code runs any more), and settle: all in the request's
        context, entered once."""
        self.context.run(self.serve, app)

    def serve(self, app: WSGIApplication) -> None:
        """:meth:`run`, in the request's context already."""
        environ = self.unit.request.raw
        body: Iterable[bytes] = app(environ, self.start_response)
        self.body = body
        if isinstance(body, (list, tuple)):
            self.kind = "list"
        else:
            file_wrapper = environ.get("wsgi.file_wrapper")
            if isinstance(file_wrapper, type) and isinstance(body, file_wrapper):
                self.kind = "file"
            else:
                self._chunks = chunks = iter(body)
                for chunk in chunks:
                    if chunk:
                        self._first = chunk
                        break
                else:
                    self._done = True
        unit = self.unit
        if not unit.settled:
            if unit.decides and unit.holds_sessions():
                unit.settle_sync()
            else:  # nothing to decide: every policy is manual, or no Session
                unit.settled = True

    def hand_over(self) -> Iterable[bytes]:
        """Give the server the status, and the body to send.  A list or a file wrapper
        goes as it is (the wrapper keeps its sendfile), its sessions removed at once."""
        self.forward_start()
        if self.kind == "iterable":
            return self
        self.end()
        if self.kind == "list" and self.unit.callbacks:
            return self  # on_commit callbacks wait until the server closes it
        self.closed = True
        self.finish()
        return self.body

    def settle(self) -> None:
        unit = self.unit
        if unit.settled:
            return
        if not unit.holds_sessions():
            unit.settled = True
        elif _current.get() is unit.request:  # write() called by the app, in its context
            unit.settle_sync()
        else:
            self.context.run(unit.settle_sync)

    def __iter__(self) -> Iterator[bytes]:
        if self._chunks is None:
            self._chunks = iter(self.body)  # a list: no app code runs
        return self

    def __next__(self) -> bytes:
        if self._first:
            chunk, self._first = self._first, b""
            return chunk
        if self._done:
            raise StopIteration
        return self.context.run(next, self._chunks)  # type: ignore[arg-type]

    def close(self) -> None:
        """Close the app's iterable, remove the sessions, then run the request's
        on_commit callbacks; once, however often called."""
        if self.closed:
            return
        self.closed = True
        try:
            close = getattr(self.body, "close", None)
            if close is not None and not isinstance(self.body, (list, tuple)):
                self.context.run(close)
        finally:
            self.finish()

    def finish(self) -> None:
        try:
            self.end()
        finally:
            try:
                if self.unit.callbacks:
                    self.unit.run_callbacks_sync()
            finally:
                self.unit.release()

    def end(self) -> None:
        """Remove the request's sessions and end its scope; once."""
        if self.ended:
            return
        self.ended = True
        unit = self.unit
        request = unit.request
        environ = request.raw
        if environ.get(TOKEN_KEY) is request:
            del environ[TOKEN_KEY]  # no cycle between the environ and its token
        if unit.holds_sessions():
            self.context.run(unit.end_sync)
        else:
            unit.end_empty()

    def __del__(self) -> None:
        if self.closed or warnings is None:  # closed, or at interpreter shutdown
            return
        self.closed = True
        if threading.get_ident() == self._thread or not self.unit.thread_bound():
            self.finish()
        else:
            # The collector runs in another thread, which may not use a connection of
            # SQLite's SingletonThreadPool: the owning thread closes the sessions when it
            # next serves a request, and no Session is opened for this one meanwhile.
            self.unit.request.ended = True
            _orphans.setdefault(self._thread, []).append(self.finish)
        warnings.warn(
            f"the response to {describe(self.unit.request)} was never closed; its session "
            "was removed when it was collected. WSGI servers call close(); with a "
            "test client, close the response or pass buffered=True.",
            ResourceWarning,
            stacklevel=1,
        )


def _refuse_asgi_app(app: object) -> None:
    """An ASGI app here would fail on its first request with an unrelated TypeError."""
    call = getattr(app, "__call__", None)  # noqa: B004 - the method itself is inspected
    asgi = inspect.iscoroutinefunction(app) or inspect.iscoroutinefunction(call)
    if not asgi:
        try:
            asgi = len(inspect.signature(app).parameters) == 3  # type: ignore[arg-type]
        except (TypeError, ValueError):
            asgi = False
    if asgi:
        raise TypeError(
            f"WSGISessionMiddleware got {app!r}, which looks like an ASGI application "
            "(it takes scope, receive and send). Wrap it with "
            "sessionmw.ASGISessionMiddleware instead."
        )
