"""Request-scoped SQLAlchemy sessions for ASGI applications.

``ASGISessionMiddleware`` is a pure ASGI middleware (no ``BaseHTTPMiddleware``,
no Starlette import): for each ``http`` and ``websocket`` scope it opens a
request scope, puts the ``scoped_session`` at ``scope["state"][state_key]`` (so
``request.state.db`` works in Starlette and FastAPI) and removes the request's
Session exactly once, when the application call returns.  That is after a
streamed body and after background tasks, so both still use the session.
``lifespan`` and other scope types pass through untouched.

With ``commit="on_success"`` (or a callable) the commit runs before
``http.response.start`` is forwarded: a commit that fails raises into the
application's ``send`` call, so the error handlers (Starlette's
``ServerErrorMiddleware``, or the server) answer 500 and never a 2xx.

Where the blocking work of a sync ``scoped_session`` runs, measured on a 2-core
machine: an untouched request does none.  ``close()`` of a session that holds a
connection took 15 µs (median) on a SQLite file, and a PostgreSQL rollback is
one round trip on a local socket; a hop to a worker thread took 72 µs, so the
close runs inline.  A commit that writes waits for the disk: 545 µs median on
the same SQLite file (``fsync``), milliseconds on a busy PostgreSQL, so it runs
in a worker thread of this module's own pool.  Not on anyio's shared 40-token
limiter: there the commits of finished requests would queue behind endpoints
that wait for the connections those very requests hold, a deadlock once more
than 40 + pool-size requests are in flight.  Commits and closes are shielded
from cancellation: a client that goes away still gets its connection returned.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
from anyio.lowlevel import RunVar

from .policy import (
    Commit,
    CommitPolicy,
    commit_async,
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
    ScopedSession,
    _current,
    check_request_scoped,
    discard_async,
    discard_sync,
    is_async,
    run_shielded,
    session_of,
    wait_out,
)

if TYPE_CHECKING:
    from asgiref.typing import (
        ASGI3Application,
        ASGIReceiveCallable,
        ASGISendCallable,
        ASGISendEvent,
        Scope,
    )
    from sqlalchemy.orm import Session

__all__ = ["ASGISessionMiddleware"]

#: Worker threads that may commit sync sessions at once, apart from anyio's default limiter.
COMMIT_THREADS = 16

_commit_limiter: RunVar[anyio.CapacityLimiter] = RunVar("sessionmw_commit_limiter")


def _limiter() -> anyio.CapacityLimiter:
    try:
        return _commit_limiter.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(COMMIT_THREADS)
        _commit_limiter.set(limiter)
        return limiter


async def _commit_in_thread(session: Session, request: RequestScope) -> None:
    """Commit in a worker thread and wait until the thread has finished, cancelled or not.

    Under asyncio the wait is on a future the thread itself resolves: a plain
    ``Task.cancel()`` of every task (as ``asyncio.run`` does at shutdown) ends
    anyio's wait early, and the session must not be closed while the thread is
    still committing it.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not asyncio: anyio's shield holds
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(commit_sync, session, request, limiter=_limiter())
        return
    finished: asyncio.Future[None] = loop.create_future()
    started = threading.Event()

    def commit_and_report() -> None:
        started.set()
        try:
            commit_sync(session, request)
        except BaseException as exc:
            loop.call_soon_threadsafe(_settle_future, finished, exc)
        else:
            loop.call_soon_threadsafe(_settle_future, finished, None)

    with anyio.CancelScope(shield=True):
        runner = asyncio.ensure_future(
            anyio.to_thread.run_sync(commit_and_report, limiter=_limiter())
        )

        def never_ran(task: asyncio.Future[None]) -> None:
            # Cancelled while still waiting for a worker thread: nothing will report.
            if task.cancelled() and not started.is_set() and not finished.done():
                finished.cancel()

        runner.add_done_callback(never_ran)
        try:
            await wait_out(finished)
        finally:
            await asyncio.gather(runner, return_exceptions=True)


def _settle_future(future: asyncio.Future[None], exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(None)
    else:
        future.set_exception(exc)


class ASGISessionMiddleware:
    """Give every ASGI request its own Session from ``session`` and remove it after.

    :param app: the ASGI application to wrap.
    :param session: a ``scoped_session`` or ``async_scoped_session`` keyed by
        :func:`sessionmw.current_request`.
    :param commit: ``"manual"`` (the app commits), ``"on_success"`` (commit when
        the status is below 400, no exception escaped and
        :func:`sessionmw.set_rollback` was not called) or ``(status) -> bool``.
    :param state_key: the name under ``scope["state"]``, i.e. ``request.state.db``.
    :param scope_types: the ASGI scope types that get a request scope.
    """

    def __init__(
        self,
        app: ASGI3Application,
        session: ScopedSession,
        *,
        commit: Commit = "manual",
        state_key: str = "db",
        scope_types: Iterable[str] = ("http", "websocket"),
    ) -> None:
        self.app = app
        self.session = check_request_scoped(session, "ASGISessionMiddleware")
        self.is_async = is_async(session)
        self.policy = CommitPolicy(commit)
        if self.policy.manual:
            track_unsaved_writes(session)
        self.state_key = state_key
        self.scope_types = frozenset(scope_types)
        unknown = self.scope_types - {"http", "websocket"}
        if unknown:
            raise ValueError(
                f"scope_types may hold 'http' and 'websocket', not {sorted(unknown)}; "
                "other scope types always pass through."
            )

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] not in self.scope_types:
            await self.app(scope, receive, send)
            return
        request: RequestScope
        outer = _current.get()
        if outer is not None and scope.get(TOKEN_KEY) is outer:
            request, token = outer, None  # stacked middlewares share one token
        else:
            request = RequestScope(scope["type"], scope)  # type: ignore[arg-type]
            token = _current.set(request)
            scope[TOKEN_KEY] = request  # type: ignore[literal-required]
        state: dict[str, Any] | None = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state[self.state_key] = self.session
        cycle = _Cycle(self, request, send)
        try:
            await self.app(scope, receive, cycle.send)
        except BaseException:
            cycle.failed = True
            raise
        finally:
            try:
                if session_of(self.session, request) is not None:
                    await cycle.end()
            finally:
                if token is not None:
                    _current.reset(token)
                    scope.pop(TOKEN_KEY, None)  # type: ignore[misc]  # no cycle scope <-> token


class _Cycle:
    """One request's passage through the middleware: status seen, decision taken."""

    __slots__ = ("_send", "failed", "middleware", "request", "started", "status")

    def __init__(
        self, middleware: ASGISessionMiddleware, request: RequestScope, send: ASGISendCallable
    ) -> None:
        self.middleware = middleware
        self.request = request
        self._send = send
        self.status = 0
        self.failed = False
        self.started = log_open(request)

    async def send(self, message: ASGISendEvent) -> None:
        kind = message["type"]
        if kind == "http.response.start" or kind == "websocket.http.response.start":
            status: int = message["status"]  # type: ignore[typeddict-item]
            if self.failed and status < 400:
                raise RuntimeError(
                    f"refusing to start a {status} response: this request's commit failed"
                )
            if not self.status:
                self.status = status
                if not self.middleware.policy.manual:
                    await self._settle()
        elif kind == "websocket.accept":
            self.status = 101
        await self._send(message)

    async def _settle(self) -> None:
        """Commit or roll back before the response starts; a failed commit raises here."""
        current = session_of(self.middleware.session, self.request)
        if current is None:
            return
        policy = self.middleware.policy
        if policy.should_commit(self.status, self.request):
            try:
                if self.middleware.is_async:
                    await run_shielded(commit_async, current, self.request)
                else:
                    await _commit_in_thread(current, self.request)
            except BaseException:
                self.failed = True
                raise
        else:
            if self.middleware.is_async:
                await run_shielded(current.rollback)
            else:
                current.rollback()
            log.debug("rollback %s (status %d)", describe(self.request), self.status)

    async def end(self) -> None:
        """Settle a websocket, warn about unsaved work, and remove the session."""
        middleware = self.middleware
        try:
            if self.request.kind == "websocket" and not self.failed:
                await self._settle_websocket()
            if middleware.policy.manual and not self.failed and 0 < self.status < 400:
                current = session_of(middleware.session, self.request)
                warn_if_unsaved(
                    current.sync_session if middleware.is_async else current, self.request
                )
        finally:
            if middleware.is_async:
                await discard_async(middleware.session, self.request)  # type: ignore[arg-type]
            else:
                discard_sync(middleware.session, self.request)  # type: ignore[arg-type]
            log_removed(self.request, self.status, self.started)

    async def _settle_websocket(self) -> None:
        """A websocket is decided when it ends: 101 if it was accepted, else 403."""
        if not self.status:
            self.status = 403
            return
        if self.status == 101 and not self.middleware.policy.manual:
            await self._settle()
