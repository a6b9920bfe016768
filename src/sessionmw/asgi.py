"""Request-scoped SQLAlchemy sessions for ASGI applications.

``ASGISessionMiddleware`` is a pure ASGI middleware (no ``BaseHTTPMiddleware``, no
Starlette import): for each ``http`` and ``websocket`` scope it opens a request scope,
puts the ``scoped_session`` at ``scope["state"][state_key]`` (so ``request.state.db``
works in Starlette and FastAPI) and removes the request's Session exactly once, when
the application call returns.  That is after a streamed body and after background
tasks, so both still use the session.  ``lifespan`` and other scope types pass through
untouched.

With ``commit="on_success"`` (or a callable) the request's sessions are settled before
``http.response.start`` is forwarded: a commit that fails raises into the
application's ``send`` call, so the error handlers (Starlette's
``ServerErrorMiddleware``, or the server) answer 500 and never a 2xx.  A websocket is
settled when it ends: committed only if it was accepted and ended normally.

No blocking database I/O runs on the event loop: the commit, rollback and close of a
sync Session that holds a connection run in one hop to a worker thread of our own
(:mod:`sessionmw.offload`), shielded from cancellation.  A request that never touched
the database stays on the loop, and so does a rollback or close on SQLite, which costs
less than the hop.

Usage::

    from sessionmw import ASGISessionMiddleware, request_scoped

    Session = request_scoped(sessionmaker(bind=engine))
    app.add_middleware(ASGISessionMiddleware, session=Session, commit="on_success")
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import anyio

from .metrics import observe
from .policy import Commit, CommitPolicy, track_unsaved_writes
from .retry import Evidence, RecordingReceive, RetryPolicy
from .routing import marker_for, routes
from .scope import TOKEN_KEY, RequestScope, ScopedSession, _current, check_request_scoped
from .unit import Binding, UnitOfWork

if TYPE_CHECKING:
    from asgiref.typing import (
        ASGIReceiveCallable,
        ASGISendCallable,
        ASGISendEvent,
        Scope,
    )
    from opentelemetry.trace import TracerProvider

#: Any ASGI application, as frameworks type it: Starlette, FastAPI, httpx and uvicorn type
#: the scope and messages as MutableMappings, Litestar and asgiref as TypedDicts, and a
#: signature typed after one is refused by mypy where the other is expected.
AnyASGIApp = Callable[[Any, Any, Any], Awaitable[None]]

__all__ = ["ASGISessionMiddleware"]


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
    :param retries: how often an HTTP request that failed with a transient database
        error (:func:`sessionmw.is_transient`) is replayed, when that is safe.
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
        app: AnyASGIApp,
        session: ScopedSession,
        *,
        commit: Commit = "manual",
        state_key: str = "db",
        scope_types: Iterable[str] = ("http", "websocket"),
        retries: int = 0,
        retry_on: Callable[[BaseException], bool] | None = None,
        retry_body_limit: int = 1_048_576,
        read_your_writes: float = 5.0,
        read_your_writes_cookie: str = "sessionmw_primary",
        server_timing: bool = False,
        max_statements: int | None = None,
        tracing: bool | TracerProvider = False,
    ) -> None:
        _refuse_wsgi_app(app)
        self.app = app
        self.session = check_request_scoped(session, "ASGISessionMiddleware")
        self.policy = CommitPolicy(commit)
        if self.policy.manual:
            track_unsaved_writes(session)
        self.state_key = state_key
        marker = marker_for(session, read_your_writes, read_your_writes_cookie)
        options = observe(server_timing, max_statements, tracing)
        self.binding = Binding(self.session, self.policy, state_key, marker, options)
        self.retry = RetryPolicy(retries, retry_on, retry_body_limit, routes(session))
        self.scope_types = frozenset(scope_types)
        unknown = self.scope_types - {"http", "websocket"}
        if unknown:
            raise ValueError(
                f"scope_types may hold 'http' and 'websocket', not {sorted(unknown)}; "
                "other scope types always pass through."
            )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:  # see AnyASGIApp
        if scope["type"] not in self.scope_types:
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] | None = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state[self.state_key] = self.session
        outer = _current.get()
        if outer is not None and outer.unit is not None and scope.get(TOKEN_KEY) is outer:
            outer.unit.add(self.binding)  # stacked: the outermost middleware settles all
            await self.app(scope, receive, send)
            return
        if (
            self.retry.replays
            and scope["type"] == "http"
            and self.retry.may_replay(scope["method"])
        ):
            await self._serve_with_replays(scope, receive, send)
            return
        responder = _Responder(UnitOfWork(RequestScope(scope["type"], scope), self.binding), send)
        await self._attempt(scope, receive, responder)

    async def _attempt(
        self, scope: Scope, receive: ASGIReceiveCallable, responder: _Responder
    ) -> None:
        """Serve the request once, in a scope of its own, and end that scope."""
        unit = responder.unit
        request = unit.request
        if request.kind == "http":
            responder.remember_server_context()
        token = _current.set(request)
        traced = unit.activate() if unit.metrics is not None else None
        scope[TOKEN_KEY] = request  # type: ignore[literal-required]
        try:
            await self.app(scope, receive, responder.send)
        except BaseException as exc:
            unit.failed = True
            if isinstance(exc, asyncio.CancelledError):
                unit.cancelled = True
            raise
        finally:
            try:
                if unit.holds_sessions():
                    await responder.end()
                else:  # nothing to settle or remove: no coroutine to await but callbacks
                    unit.end_empty()
                    if unit.callbacks:
                        await unit.run_callbacks()
            finally:
                if traced is not None:
                    unit.deactivate(traced)
                if request.unit is unit:  # unit.release(), inline: once per request
                    request.unit = None
                _current.reset(token)
                scope.pop(TOKEN_KEY, None)  # type: ignore[misc]  # no cycle scope <-> token

    async def _serve_with_replays(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        """Serve the request, replaying it on a transient database failure while safe:
        no response started, nothing committed, the body kept whole or never read."""
        retry = self.retry
        body = RecordingReceive(receive, retry.body_limit)
        attempt_receive = body.receive
        # Each attempt runs on the server's own scope, as it was: what the app sets there
        # (state, route) is seen by the middleware around this one.
        attempt_scope: Any = scope
        original = dict(attempt_scope)
        state: dict[str, Any] = attempt_scope.setdefault("state", {})
        original_state = dict(state)
        evidence: Evidence | None = None
        for attempt in range(retry.replays + 1):
            if attempt:
                attempt_scope.clear()
                attempt_scope.update(original)
                state.clear()
                state.update(original_state)
            unit = UnitOfWork(RequestScope("http", attempt_scope), self.binding)
            unit.evidence = evidence = retry.evidence(evidence)
            replay = retry if evidence.replayable or evidence.failover_left else None
            responder = _Responder(unit, send, replay, body)
            try:
                await self._attempt(attempt_scope, attempt_receive, responder)
            except Exception as exc:
                error = responder.withheld or retry.failure(unit.evidence, exc)
                if replay is None or error is None or not responder.may_replay():
                    raise
            else:
                error = responder.withheld
                if error is None:
                    return
                if not responder.may_replay():  # a commit came after the 5xx was held
                    await responder.send_withheld()
                    return
            retry.log_replay(unit.request, attempt + 1, retry.replays, error)
            await anyio.sleep(retry.backoff(attempt + 1))
            attempt_receive = body.replay()


class _Responder:
    """One request's ``send``: sees the status, settles the unit of work before the
    response starts, and ends it when the application call returns.

    With a retry policy it holds back a 5xx caused by a transient database error (and
    the body after it), so that the request can be replayed instead.
    """

    __slots__ = (
        "_body",
        "_held",
        "_replay",
        "_send",
        "_server_context",
        "_server_task",
        "started",
        "unit",
        "withheld",
    )

    def __init__(
        self,
        unit: UnitOfWork,
        send: ASGISendCallable,
        replay: RetryPolicy | None = None,
        body: RecordingReceive | None = None,
    ) -> None:
        self.unit = unit
        self._send = send
        self._replay = replay
        self._body = body
        self._held: list[ASGISendEvent] = []
        self._server_context: contextvars.Context | None = None
        self._server_task: asyncio.Task[Any] | None = None
        #: The response start went to the server: no replay from then on.
        self.started = False
        #: The transient failure behind a 5xx held back for a replay.
        self.withheld: BaseException | None = None

    def may_replay(self) -> bool:
        evidence = self.unit.evidence
        return (
            not self.started
            and evidence is not None
            and not evidence.committed
            and self._body is not None
            and self._body.replayable()
        )

    async def send_withheld(self) -> None:
        """Send the 5xx that was held back for a replay that cannot happen after all."""
        held, self._held = self._held, []
        self.withheld = None
        for message in held:
            await self.send(message)

    def remember_server_context(self) -> None:
        """The server's context, before the request's token enters it (asyncio only)."""
        try:
            self._server_task = asyncio.current_task()
        except RuntimeError:  # not asyncio
            return
        self._server_context = contextvars.copy_context()

    async def _send_last_from_elsewhere(self, message: ASGISendEvent) -> None:
        """Send the body's last message, which the app sent from a task other than the
        server's, in the server's context, not the caller's.

        uvicorn starts the next request of a kept-alive connection from inside this very
        call, and that request's task inherits whatever context the call runs in.  Called
        from another task (asgiref's ``WsgiToAsgi`` sends from one of its own), that
        context points at this request's executor, which is shut down by then: the next
        request failed with "CurrentThreadExecutor already quit or is broken".
        """
        assert self._server_context is not None
        loop = asyncio.get_running_loop()
        await self._server_context.run(loop.create_task, _forward(self._send, message))

    async def send(self, message: ASGISendEvent) -> None:
        if self.withheld is not None:
            self._held.append(message)
            return
        kind = message["type"]
        if (
            kind == "http.response.body"
            and self._server_context is not None
            and not message.get("more_body", False)
        ):
            self.started = True
            if asyncio.current_task() is self._server_task:
                await self._send(message)
            else:
                await self._send_last_from_elsewhere(message)
            return
        if kind == "http.response.start" or kind == "websocket.http.response.start":
            unit = self.unit
            status: int = message["status"]  # type: ignore[typeddict-item]
            if unit.failed and status < 400:
                raise RuntimeError(
                    f"refusing to start a {status} response: this request's commit failed"
                )
            if not unit.status:
                unit.status = status
                if unit.decides and unit.holds_sessions():  # else no coroutine to await
                    await unit.settle()
                if unit.request.wrote or unit.metrics is not None:  # else it adds none
                    extra = unit.response_headers()
                    if extra:
                        message = _with_headers(message, extra)
            if status >= 500 and self._replay is not None and unit.evidence is not None:
                error = self._replay.failure(unit.evidence, None)
                if error is not None and self.may_replay():
                    self.withheld = error
                    self._held.append(message)
                    return
            self.started = True
        elif kind == "websocket.accept":
            self.unit.status = 101
        elif kind == "websocket.close":
            self.unit.close_code = message.get("code") or 1000  # type: ignore[assignment]
        await self._send(message)

    async def end(self) -> None:
        """Settle a websocket, remove every session of the request (it holds one), then
        run its on_commit callbacks."""
        unit = self.unit
        try:
            try:
                if unit.request.kind == "websocket" and not unit.failed:
                    unit.decide_websocket()
                    await unit.settle()
            finally:
                await unit.end()
        finally:
            if unit.callbacks:
                await unit.run_callbacks()


def _with_headers(message: Any, extra: Sequence[tuple[str, str]]) -> Any:
    """A copy of a response start with ``extra`` headers added (the app's stays as sent)."""
    added = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in extra]
    return {**message, "headers": [*message.get("headers", ()), *added]}


async def _forward(send: ASGISendCallable, message: ASGISendEvent) -> None:
    await send(message)


def _refuse_wsgi_app(app: object) -> None:
    """A WSGI app here would fail on its first request with an unrelated TypeError."""
    call = getattr(app, "__call__", None)  # noqa: B004 - the method itself is inspected
    if inspect.iscoroutinefunction(app) or inspect.iscoroutinefunction(call):
        return
    try:
        parameters = inspect.signature(app).parameters  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return
    if list(parameters)[:2] == ["environ", "start_response"] or len(parameters) == 2:
        raise TypeError(
            f"ASGISessionMiddleware got {app!r}, which looks like a WSGI application "
            "(it takes environ and start_response). Wrap it with "
            "sessionmw.WSGISessionMiddleware instead, or serve it through "
            "asgiref.wsgi.WsgiToAsgi first and wrap that."
        )
