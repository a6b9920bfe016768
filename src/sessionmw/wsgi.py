"""Request-scoped SQLAlchemy sessions for WSGI applications.

``WSGISessionMiddleware`` opens a request scope for each call, puts the
``scoped_session`` at ``environ["sessionmw.session"]`` and removes the request's
Session exactly once, when the response iterable is closed: after the body has
streamed, when the server abandons it, or at once when the application raises.
Until then the body may still use the session.

With ``commit="on_success"`` (or a callable) the commit happens inside
``start_response``, before the status reaches the server, so a commit that
fails propagates as an exception and the server answers 500.  Writes made while
the body streams come after that decision and must be committed by the app.

Stack one middleware per database; they share the request's token.  The
middleware does not wrap ``async_scoped_session``: WSGI has no event loop to
close it on, so serve such apps through ``ASGISessionMiddleware``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from contextvars import Context, copy_context
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy.orm import scoped_session

from .policy import (
    Commit,
    CommitPolicy,
    commit_sync,
    describe,
    log,
    log_open,
    log_removed,
    track_unsaved_writes,
    warn_if_unsaved,
)
from .scope import (
    TOKEN_KEY,
    RequestScope,
    _current,
    check_request_scoped,
    discard_sync,
    is_async,
    session_of,
)

if TYPE_CHECKING:
    from _typeshed import OptExcInfo
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["WSGISessionMiddleware"]


class WSGISessionMiddleware:
    """Give every WSGI request its own Session from ``session`` and remove it after.

    :param app: the WSGI application to wrap.
    :param session: a ``scoped_session`` keyed by :func:`sessionmw.current_request`.
    :param commit: ``"manual"`` (the app commits), ``"on_success"`` (commit when
        the status is below 400 and :func:`sessionmw.set_rollback` was not
        called) or a callable ``(status) -> bool``.
    :param environ_key: where the ``scoped_session`` is put in the environ.
    """

    def __init__(
        self,
        app: WSGIApplication,
        session: scoped_session[Any],
        *,
        commit: Commit = "manual",
        environ_key: str = "sessionmw.session",
    ) -> None:
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

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        # The request runs in a context of its own: the server's context never holds
        # the token, so nothing can leak into the next request of this thread.
        context = copy_context()
        outer = context.get(_current)
        request: RequestScope
        if outer is not None and outer is environ.get(TOKEN_KEY):
            request, owner = cast(RequestScope, outer), False  # stacked: share the token
        else:
            request, owner = RequestScope("wsgi", environ), True
            context.run(_current.set, request)
            environ[TOKEN_KEY] = request
        environ[self.environ_key] = self.session
        response = _Response(self, request, context, owner, start_response)
        try:
            response.body = context.run(self.app, environ, response.start_response)
        except BaseException:
            response.failed = True
            response.close()
            raise
        return response


def _status_code(status: str) -> int:
    try:
        return int(status[:3])
    except ValueError:
        raise ValueError(
            f"start_response() got the status {status!r}; a WSGI status is a string like '200 OK'."
        ) from None


class _Response:
    """The app's response iterable: each chunk is made in the request's context; close ends it.

    A server (or a test client) that never closes the iterable leaves no token
    behind, since the token only ever lives in the request's own context; the
    Session is then removed when the iterable is collected.
    """

    __slots__ = (
        "_chunks",
        "_context",
        "_owner",
        "_start_response",
        "body",
        "closed",
        "failed",
        "middleware",
        "request",
        "started",
        "status",
    )

    def __init__(
        self,
        middleware: WSGISessionMiddleware,
        request: RequestScope,
        context: Context,
        owner: bool,
        start_response: StartResponse,
    ) -> None:
        self.middleware = middleware
        self.request = request
        self._context = context
        self._owner = owner
        self._start_response = start_response
        self.body: Iterable[bytes] = ()
        self._chunks: Iterator[bytes] | None = None
        self.status = 0
        self.failed = False
        self.closed = False
        self.started = log_open(request)

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None
    ) -> Callable[[bytes], object]:
        code = _status_code(status)
        if exc_info is not None:
            self.failed = True
            self.status = code
        elif self.failed and code < 400:
            raise RuntimeError(f"refusing to send {status!r}: this request's commit failed")
        elif not self.status:
            self.status = code
            if not self.middleware.policy.manual:
                self._settle()
        return self._start_response(status, headers, exc_info)

    def _settle(self) -> None:
        """Commit or roll back, now that the status is known and before the server sees it."""
        session = session_of(self.middleware.session, self.request)
        if session is None:
            return
        if self.middleware.policy.should_commit(self.status, self.request):
            try:
                commit_sync(session, self.request)
            except BaseException:
                self.failed = True
                raise
        else:
            session.rollback()
            log.debug("rollback %s (status %d)", describe(self.request), self.status)

    def __iter__(self) -> Iterator[bytes]:
        if isinstance(self.body, (list, tuple)):
            return iter(self.body)  # no app code runs while it is read: no context needed
        if self._chunks is None:
            self._chunks = iter(self.body)
        return self

    def __next__(self) -> bytes:
        return self._context.run(next, self._chunks)  # type: ignore[arg-type]

    def close(self) -> None:
        """Close the app's iterable, then remove the session; once, however often called."""
        if self.closed:
            return
        self.closed = True
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                self._context.run(close)
        finally:
            self._end()

    def _end(self) -> None:
        if self._owner:
            environ = self.request.raw
            if environ.get(TOKEN_KEY) is self.request:
                del environ[TOKEN_KEY]  # no cycle between the environ and its token
        session = session_of(self.middleware.session, self.request)
        if session is None:
            return
        if self.middleware.policy.manual and not self.failed and 0 < self.status < 400:
            warn_if_unsaved(session, self.request)
        discard_sync(self.middleware.session, self.request)
        log_removed(self.request, self.status, self.started)

    def __del__(self) -> None:
        if not self.closed and warnings is not None:  # not at interpreter shutdown
            try:
                self.close()
            finally:
                warnings.warn(
                    f"the response to {describe(self.request)} was never closed; its session "
                    "was removed when it was collected. WSGI servers call close(); with a "
                    "test client, close the response or pass buffered=True.",
                    ResourceWarning,
                    stacklevel=1,
                )
