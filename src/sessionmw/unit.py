"""The request's unit of work: its sessions, their outcome, and their removal.

One request may use several ``scoped_session`` objects, one middleware each (several
databases).  The middleware that opened the request's scope owns its
:class:`UnitOfWork`; the ones stacked inside it only add their :class:`Binding`.  At the
last moment before the response can start, the owner settles every session of the
request in one place, by two-phase commit when every factory involved has
``twophase=True``; when the response is over it removes them all and ends the scope.
The WSGI and ASGI adapters call this module and carry no such logic of their own.

The settling itself is written once, as a sequence of steps (prepare, commit, roll
back a Session); a sync driver runs them in place (WSGI, or a worker thread under
ASGI) and an async one awaits them, so both protocols share one algorithm.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
from collections.abc import Callable, Generator, Sequence
from contextvars import Token
from types import TracebackType
from typing import Any, Literal

from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncSession, async_scoped_session
from sqlalchemy.orm import Session
from sqlalchemy.pool import SingletonThreadPool

from .lingering import referents, wait_until_unused
from .metrics import Observe, RequestMetrics, instrument
from .offload import run_in_worker, run_shielded
from .oncommit import Callback, run_callback
from .policy import CommitPolicy, describe, log_open, log_removed, warn_if_unsaved
from .retry import Evidence, is_transient
from .routing import ReadYourWrites
from .scope import RequestScope, ScopedSession, _current, check_request_scoped, is_async

__all__ = ["Binding", "UnitOfWork", "request_scope"]

log = logging.getLogger("sessionmw")

#: One step of settling: an operation on a sync Session, and the Session (sync or async)
#: it applies to.
Step = tuple[Any, Callable[[Session], None]]

#: Close codes that end a websocket normally: only then may ``"on_success"`` commit it.
NORMAL_CLOSE = frozenset({1000, 1001})


class Binding:
    """One middleware's ``scoped_session``, its commit policy and its name in logs."""

    __slots__ = (
        "instrumented",
        "is_async",
        "marker",
        "name",
        "observe",
        "policy",
        "session",
        "sessions",
    )

    def __init__(
        self,
        session: ScopedSession,
        policy: CommitPolicy,
        name: str,
        marker: ReadYourWrites | None = None,
        observe: Observe | None = None,
    ) -> None:
        self.session = session
        #: The proxy's registry: each request's Session, by token (looked up on every
        #: request, so kept at hand; :func:`~sessionmw.scope.guard_registry` set it once).
        self.sessions: dict[RequestScope, Any] = session.registry.registry
        self.policy = policy
        self.name = name
        self.is_async = is_async(session)
        #: With replicas: the cookie that sends a client's reads to the primary after
        #: it wrote (``None``: no replicas, or ``read_your_writes=0``).
        self.marker = marker
        #: What the middleware's requests report (``None``: only DEBUG logs ask).
        self.observe = observe
        self.instrumented = False

    def meter(self) -> None:
        """Count the statements of this factory's sessions from now on (once)."""
        if not self.instrumented:
            instrument(self.session)
            self.instrumented = True

    def current(self, request: RequestScope) -> Any:
        """The Session ``request`` holds here, or ``None``; creates nothing."""
        return self.sessions.get(request)

    def thread_bound(self) -> bool:
        return _thread_bound(self.session)


def _thread_bound(proxy: ScopedSession) -> bool:
    """Whether the factory's connections belong to one thread each (SQLite memory
    databases' SingletonThreadPool): they must be closed in the thread that uses them."""
    return _bound_to_thread(proxy.session_factory.kw.get("bind"))


def _bound_to_thread(bind: object) -> bool:
    return isinstance(bind, Engine) and isinstance(bind.pool, SingletonThreadPool)


def _local_bind(bind: object) -> bool:
    """Whether ``bind`` is a SQLite database, where a rollback or a close costs
    microseconds: less than a hop to a worker thread (measured: 15 µs vs 72 µs).
    Anything else may sit across a network, a round trip away."""
    return isinstance(bind, Engine) and bind.dialect.name == "sqlite"


def _closes_in_worker(session: Session, cancelled: bool) -> bool:
    """Whether a sync Session is closed in a worker thread under ASGI: when its close is
    a round trip across a network, and after a cancellation (a thread may be inside).
    Told by the Session's own bind (``None`` with ``binds=``: across a network)."""
    if cancelled:
        return not _bound_to_thread(session.bind)
    return session.in_transaction() and not _local_bind(session.bind)


def _reset(session: Session) -> None:
    """End the transaction and leave the Session usable, as the middleware finds it:
    ``reset()`` (SQLAlchemy 2.0.22+) whatever ``close_resets_only`` says, ``close()``
    before it, which always reset."""
    reset = getattr(session, "reset", None)
    (reset or session.close)()


def _sync(session: Any) -> Session:
    return session.sync_session if isinstance(session, AsyncSession) else session


def _prepare(session: Session) -> None:
    session.prepare()


def _commit(session: Session) -> None:
    session.commit()


def _rollback(session: Session) -> None:
    session.rollback()


def _rollback_quietly(session: Session) -> None:
    """Roll back after another failure, which is the one to report."""
    try:
        session.rollback()
    except Exception:
        log.error("rolling back after a failed commit failed too", exc_info=True)


def _prepared_xids(session: Session) -> list[tuple[Engine, Any]]:
    """The engine and xid of each prepared transaction of ``session``, for recovery."""
    transaction = session.get_transaction()
    connections = getattr(transaction, "_connections", {})
    return [
        (conn.engine, trans.xid)
        for conn, trans, *_ in set(connections.values())
        if getattr(trans, "xid", None) is not None
    ]


def _finish_prepared(xids: list[tuple[Engine, Any]], session: Session) -> None:
    """Commit the prepared transactions of a session whose COMMIT PREPARED failed (its
    connection was lost, say) on fresh connections; raise if any stays in doubt.

    A transaction no longer prepared was committed by that COMMIT PREPARED: the
    connection was lost only after the database had done it.
    """
    session.invalidate()
    for engine, xid in xids:
        with engine.connect() as conn:
            if xid not in conn.recover_twophase():
                log.warning("the prepared transaction %r was committed already", xid)
                continue
            conn.commit_prepared(xid, recover=True)
        log.warning("committed the prepared transaction %r on a fresh connection", xid)


class UnitOfWork:
    """What one request does to its sessions: settle them all, then remove them all."""

    __slots__ = (
        "bindings",
        "callbacks",
        "cancelled",
        "close_code",
        "decides",
        "evidence",
        "failed",
        "metrics",
        "request",
        "settled",
        "started",
        "status",
    )

    def __init__(self, request: RequestScope, binding: Binding) -> None:
        self.request = request
        self.bindings = [binding]
        #: The response status once known (0 before; 101 for an accepted websocket).
        self.status = 0
        #: An exception escaped the app, or a commit failed: never commit after that.
        self.failed = False
        #: The app was cancelled: a thread it started may still be inside a Session.
        self.cancelled = False
        #: The close code the app sent on a websocket (``None``: it sent none).
        self.close_code: int | None = None
        self.settled = False
        #: A session's policy commits or rolls back at the response (not ``"manual"``):
        #: else settling has nothing to do, and the request skips it.
        self.decides = not binding.policy.manual
        #: on_commit callbacks whose transaction committed: they run after the response.
        self.callbacks: list[Callback] = []
        #: What bears on replaying the request (with ``retries=``), else ``None``.
        self.evidence: Evidence | None = None
        self.started = started = log_open(request)
        #: Statements, database time, span: only for a metered request (else ``None``).
        self.metrics: RequestMetrics | None = None
        if started or binding.observe is not None:
            binding.meter()
            self.metrics = RequestMetrics(request, binding.observe)
        request.unit = self

    def response_headers(self) -> Sequence[tuple[str, str]]:
        """Headers the request's outcome adds to its response, once it is settled: the
        read-your-writes cookie after a committed write (with replicas); ``Server-Timing``
        (with ``server_timing=True``, on HTTP).  Never any unless ``request.wrote`` or the
        request is metered: the adapters skip the call otherwise, once per request."""
        request = self.request
        headers: Sequence[tuple[str, str]] = ()
        if request.wrote:
            for binding in self.bindings:
                if binding.marker is not None:
                    headers = [("set-cookie", binding.marker.set_cookie(request))]
                    break
        metrics = self.metrics
        if metrics is not None and metrics.server_timing and request.kind != "websocket":
            headers = [*headers, metrics.server_timing_header()]
        return headers

    def add(self, binding: Binding) -> None:
        """A middleware stacked inside the owner joins the request."""
        if binding not in self.bindings:
            self.bindings.append(binding)
            self.decides = self.decides or not binding.policy.manual
            options = binding.observe
            metrics = self.metrics
            if metrics is None and options is not None:
                metrics = self.metrics = RequestMetrics(self.request, None)
            if metrics is not None:
                binding.meter()
                if options is not None:
                    metrics.include(options)

    def activate(self) -> object | None:
        """Make the request's span current in this context (with ``tracing``); the token
        for :meth:`deactivate`, or ``None``."""
        metrics = self.metrics
        if metrics is None or metrics.span is None:
            return None
        assert metrics.tracing is not None
        return metrics.tracing.activate(metrics.span)

    def deactivate(self, token: object) -> None:
        metrics = self.metrics
        if metrics is not None and metrics.tracing is not None:
            metrics.tracing.deactivate(token)

    def holds_sessions(self) -> bool:
        request = self.request
        for binding in self.bindings:  # noqa: SIM110 - a plain loop, not any(): per request
            if request in binding.sessions:
                return True
        return False

    # -- settling --------------------------------------------------------------

    def _decide(self, status: int) -> tuple[list[Any], list[Any]]:
        """Which Sessions to commit and which to roll back for a response of ``status``:
        innermost middleware first, the order in which stacked middlewares committed one
        by one before."""
        commits: list[Any] = []
        rollbacks: list[Any] = []
        request = self.request
        for binding in reversed(self.bindings):
            if binding.policy.manual:
                continue
            session = binding.current(request)
            if session is None or not _sync(session).in_transaction():
                continue
            if not self.failed and status and binding.policy.should_commit(status, request):
                commits.append(session)
            else:
                rollbacks.append(session)
        return commits, rollbacks

    def _steps(self, commits: list[Any], rollbacks: list[Any]) -> Generator[Step, None, None]:
        """Settle: roll back what the policy refuses, then commit the rest, all or none
        by two-phase commit when every Session to commit is ``twophase``."""
        for session in rollbacks:
            yield session, _rollback
        if rollbacks:
            log.debug("rollback %s (status %d)", describe(self.request), self.status)
            if self.metrics is not None:
                self.metrics.note("rollback")
        if len(commits) > 1 and all(_sync(s).twophase for s in commits):
            yield from self._two_phase(commits)
        elif commits:
            yield from self._one_by_one(commits)
        if commits:
            log.debug("commit %s", describe(self.request))
            if self.metrics is not None:
                self.metrics.note("commit")

    def _label(self, session: Any) -> str:
        """The middleware's key and the database's URL, to say which database did what."""
        name = next(
            (b.name for b in self.bindings if b.current(self.request) is session), "session"
        )
        try:
            url = _sync(session).get_bind().engine.url.render_as_string(hide_password=True)
        except Exception:  # several binds, or none
            return name
        return f"{name} ({url})"

    def _one_by_one(self, commits: list[Any]) -> Generator[Step, None, None]:
        for index, session in enumerate(commits):
            try:
                yield session, _commit
            except Exception as exc:
                kept = ", ".join(self._label(s) for s in commits[:index])
                log.log(
                    self._failure_level(exc),
                    "commit failed for %s in %s; answering with an error%s",
                    describe(self.request),
                    self._label(session),
                    f". The writes committed before it in {kept} stay: use twophase=True "
                    "factories to commit several databases all or none"
                    if kept
                    else "",
                    exc_info=True,
                )
                for rest in commits[index:]:
                    yield rest, _rollback_quietly
                raise

    def _failure_level(self, exc: BaseException) -> int:
        """ERROR, unless the request will be replayed after this transient failure."""
        evidence = self.evidence
        if evidence is not None and evidence.replayable and is_transient(exc):
            return logging.WARNING
        return logging.ERROR

    def _two_phase(self, commits: list[Any]) -> Generator[Step, None, None]:
        for index, session in enumerate(commits):
            try:
                yield session, _prepare
            except Exception:
                log.error(
                    "prepare of %s failed for %s; rolling back every database of the request",
                    self._label(session),
                    describe(self.request),
                    exc_info=True,
                )
                for other in commits[:index] + commits[index + 1 :]:
                    yield other, _rollback_quietly
                raise
        failure: Exception | None = None
        for session in commits:
            xids = _prepared_xids(_sync(session))
            try:
                yield session, _commit
            except Exception as exc:
                log.error(
                    "COMMIT PREPARED of %s failed for %s; finishing it on a new connection",
                    self._label(session),
                    describe(self.request),
                    exc_info=True,
                )
                try:
                    yield session, functools.partial(_finish_prepared, xids)
                except Exception:
                    log.error("a prepared transaction stays in doubt", exc_info=True)
                    failure = failure or exc
        if failure is not None:
            raise failure

    def settle_sync(self) -> None:
        """Commit or roll back every Session of the request, in this thread."""
        if self.settled:
            return
        self.settled = True
        if not self.decides:
            return
        commits, rollbacks = self._decide(self.status)
        if commits or rollbacks:
            self._run(self._drive_sync, self._steps(commits, rollbacks))

    async def settle(self) -> None:
        """:meth:`settle_sync` for ASGI: no blocking database I/O on the event loop.

        Sync Sessions settle in one hop to a worker thread (inline when it is only a
        rollback on SQLite); async ones are awaited.  Shielded from cancellation either
        way: a request cancelled between prepare and commit still finishes both.
        """
        if self.settled:
            return
        self.settled = True
        if not self.decides:
            return
        commits, rollbacks = self._decide(self.status)
        if not (commits or rollbacks):
            return
        steps = self._steps(commits, rollbacks)
        if any(isinstance(s, AsyncSession) for s in commits + rollbacks):
            await self._arun(run_shielded, self._drive_async, steps)
        elif commits or not all(self._local(s) for s in rollbacks):
            await self._arun(run_in_worker, self._drive_sync, steps)
        else:
            self._run(self._drive_sync, steps)

    def end_in_thread(self, status: int) -> None:
        """Settle and reset the request's sync Sessions in the calling thread, a ``def``
        endpoint's, for the response of ``status`` it returned.

        Across a network this spares the event loop's turn and the worker-thread hop that
        ending them after the endpoint would take, while the connection stays checked
        out.  The reset Sessions stay registered: the middleware removes them as usual,
        inline, since they no longer hold a connection.  Async Sessions are left to the
        middleware, and so is all of it when any Session of the request is async.
        """
        request = self.request
        sessions = [binding.current(request) for binding in self.bindings]
        if request.ended or any(isinstance(s, AsyncSession) for s in sessions):
            return
        if not self.settled:
            self.settled = True
            commits, rollbacks = self._decide(status)
            if commits or rollbacks:
                self._run(self._drive_sync, self._steps(commits, rollbacks))
        for binding, session in zip(self.bindings, sessions, strict=True):
            if session is None or not session.in_transaction():
                continue
            if binding.policy.manual and status < 400:
                warn_if_unsaved(session, request)
            try:
                _reset(session)
            except Exception:  # the response stands; the middleware closes it again
                log.error("resetting the session of %s failed", describe(request), exc_info=True)

    @staticmethod
    def _local(session: Any) -> bool:
        return _local_bind(_sync(session).bind)

    def _run(self, driver: Callable[[Any], None], steps: Any) -> None:
        metrics = self.metrics
        mark = metrics.settle_began() if metrics is not None else None
        try:
            driver(steps)
        except BaseException:
            self.failed = True
            raise
        finally:
            if metrics is not None and mark is not None:
                metrics.settle_ended(mark)

    async def _arun(self, runner: Any, driver: Any, steps: Any) -> None:
        metrics = self.metrics
        mark = metrics.settle_began() if metrics is not None else None
        try:
            await runner(driver, steps)
        except BaseException:
            self.failed = True
            raise
        finally:
            if metrics is not None and mark is not None:
                metrics.settle_ended(mark)

    @staticmethod
    def _drive_sync(steps: Generator[Step, None, None]) -> None:
        try:
            step = next(steps)
            while True:
                session, operation = step
                try:
                    operation(session)
                except Exception as exc:
                    step = steps.throw(exc)
                else:
                    step = steps.send(None)
        except StopIteration:
            pass

    @staticmethod
    async def _drive_async(steps: Generator[Step, None, None]) -> None:
        try:
            step = next(steps)
            while True:
                session, operation = step
                try:
                    if isinstance(session, AsyncSession):
                        await session.run_sync(operation)
                    else:
                        await run_in_worker(operation, session)
                except Exception as exc:
                    step = steps.throw(exc)
                else:
                    step = steps.send(None)
        except StopIteration:
            pass

    # -- websockets -------------------------------------------------------------

    def decide_websocket(self) -> None:
        """A websocket is settled when it ends: it may commit only if it was accepted
        and neither raised nor was closed by the app with an error code."""
        if not self.status:
            self.status = 403  # never accepted
        elif self.close_code is not None and self.close_code not in NORMAL_CLOSE:
            self.failed = True

    # -- removal ----------------------------------------------------------------

    def _begin_end(self) -> None:
        request = self.request
        if not self.failed and 0 < self.status < 400:
            for binding in self.bindings:
                if binding.policy.manual:
                    session = binding.sessions.get(request)
                    if session is not None:
                        sync = session.sync_session if binding.is_async else session
                        warn_if_unsaved(sync, request)
        request.ended = True

    def _removed(self) -> None:
        """Log the removal at DEBUG with what the request did to the database, and
        report it (``max_statements``, the span)."""
        metrics = self.metrics
        if metrics is not None:
            request = self.request
            log_removed(request, self.status, self.started, metrics.statements, metrics.db_time)
            metrics.finish(request, self.failed)

    def end_empty(self) -> None:
        """End the scope of a request that holds no Session: nothing to remove or log,
        but a metered one still reports (its child scopes may have run statements)."""
        self.request.ended = True
        if self.metrics is not None:
            self.metrics.finish(self.request, self.failed)

    def end_sync(self) -> None:
        """Remove every Session of the request (closing rolls back what was not
        committed) and end its scope; each is removed even if another fails.

        A close that fails is logged, never raised: it comes after the request's outcome
        was decided and cannot change it (the database drops an open transaction with its
        connection), while raising it would fail the response or, once that is out, make
        the server drop the kept-alive connection and the client's next request on it.
        """
        self._begin_end()
        request = self.request
        interrupted: BaseException | None = None
        for binding in self.bindings:
            session = binding.sessions.get(request)
            if session is None:
                continue
            try:
                _close_and_forget(binding.sessions, session, request)
            except BaseException as exc:  # an interrupt: the others are still removed
                interrupted = interrupted or exc
        self._removed()
        if interrupted is not None:
            raise interrupted

    async def end(self) -> None:
        """:meth:`end_sync` for ASGI: sync Sessions that hold a connection across a
        network close in one worker-thread hop, async ones are awaited, shielded; a close
        that fails is logged, not raised.  After a cancellation the sync ones close in
        that hop once no thread the app started is still inside them
        (:mod:`sessionmw.lingering`)."""
        self._begin_end()
        request = self.request
        interrupted: BaseException | None = None
        blocking = []
        for binding in self.bindings:
            session = binding.sessions.get(request)
            if session is None:
                continue
            try:
                if binding.is_async:
                    await discard_async(binding.session, request, reraise=False)  # type: ignore[arg-type]
                elif _closes_in_worker(session, self.cancelled):
                    blocking.append(binding.session)
                else:
                    _close_and_forget(binding.sessions, session, request)
            except BaseException as exc:  # a cancellation: the others are still removed
                interrupted = interrupted or exc
        if blocking:
            try:
                await run_in_worker(_closer(self.cancelled, reraise=False), blocking, request)
            except Exception:
                # No worker thread took the closes (its executor is shut down, as at
                # interpreter exit): better a round trip on the loop than a leak.
                log.error("removing the sessions of %s failed", describe(request), exc_info=True)
                _discard_sync_all(blocking, request, reraise=False)
            except BaseException as exc:
                interrupted = interrupted or exc
        self._removed()
        if interrupted is not None:
            raise interrupted

    # -- after the response ---------------------------------------------------

    def run_callbacks_sync(self) -> None:
        """Run the on_commit callbacks of the request, in order, in this thread."""
        callbacks, self.callbacks = self.callbacks, []
        _run_batch(callbacks, describe(self.request))

    async def run_callbacks(self) -> None:
        """:meth:`run_callbacks_sync` for ASGI: sync callbacks in a worker thread,
        coroutine functions awaited, in order; shielded, so a request cancelled after
        its commit still runs them."""
        callbacks, self.callbacks = self.callbacks, []
        await run_shielded(_run_all, callbacks, describe(self.request))

    def release(self) -> None:
        """Let go of the request once it is over: its token no longer points at this
        unit, so the two form no cycle, and reference counting frees them and all they
        reach (the ASGI scope, the WSGI environ) at once instead of the cycle collector,
        which at a cycle per request ran often over a large heap."""
        if self.request.unit is self:
            self.request.unit = None

    def thread_bound(self) -> bool:
        """Whether a Session of the request draws from a pool whose connections belong to
        one thread (SQLite memory databases' SingletonThreadPool)."""
        return any(b.thread_bound() for b in self.bindings)


async def _run_all(callbacks: list[Callback], where: str) -> None:
    batch: list[Callback] = []
    for callback in callbacks:
        if not inspect.iscoroutinefunction(callback):
            batch.append(callback)
            continue
        if batch:
            await run_in_worker(_run_batch, batch, where)
            batch = []
        try:
            await callback()
        except Exception:
            log.error("an on_commit callback failed after %s", where, exc_info=True)
    if batch:
        await run_in_worker(_run_batch, batch, where)


def _run_batch(callbacks: list[Callback], where: str) -> None:
    for callback in callbacks:
        run_callback(callback, where)


def _discard_sync_all(
    proxies: Sequence[ScopedSession], request: RequestScope, reraise: bool = True
) -> None:
    """Remove the Session of ``request`` from each proxy, even when one fails; then
    re-raise the first failure (with ``reraise=False``, only an interrupt)."""
    failure: BaseException | None = None
    for proxy in proxies:
        try:
            discard_sync(proxy, request, reraise)
        except BaseException as exc:
            failure = failure or exc
    if failure is not None:
        raise failure


def _discard_sync_when_unused(
    proxies: Sequence[ScopedSession], request: RequestScope, loop_thread: int, reraise: bool
) -> None:
    """:func:`_discard_sync_all` after a cancellation: first wait until no thread but the
    event loop's is inside one of the Sessions (:mod:`sessionmw.lingering`)."""
    held: list[object] = []
    for proxy in proxies:
        session = proxy.registry.registry.get(request)
        if session is not None:
            held += referents(session)
    wait_until_unused(held, besides=[loop_thread])
    del held
    _discard_sync_all(proxies, request, reraise)


#: What the middleware's hop runs: a failed close is logged, only an interrupt raised.
_discard_sync_all_logged = functools.partial(_discard_sync_all, reraise=False)


def _closer(
    cancelled: bool, reraise: bool = True
) -> Callable[[Sequence[ScopedSession], RequestScope], None]:
    """How to remove sync Sessions in a worker thread, called on the event loop."""
    if cancelled:
        return functools.partial(
            _discard_sync_when_unused, loop_thread=threading.get_ident(), reraise=reraise
        )
    return _discard_sync_all if reraise else _discard_sync_all_logged


def discard_sync(proxy: Any, request: RequestScope, reraise: bool = True) -> None:
    """What ``Session.remove()`` does for ``request``: close its Session (rolling back what
    was not committed), then forget it; forgotten even if the close fails, which is
    logged, and raised unless ``reraise=False``."""
    registry = proxy.registry.registry
    session = registry.get(request)
    if session is None:
        return
    _close_and_forget(registry, session, request, reraise)


def _close_and_forget(
    registry: dict[RequestScope, Any],
    session: Session,
    request: RequestScope,
    reraise: bool = False,
) -> None:
    """:func:`discard_sync` for a Session already looked up."""
    try:
        session.close()
    except Exception:
        log.error("closing the session of %s failed", describe(request), exc_info=True)
        if reraise:
            raise
    finally:
        registry.pop(request, None)


async def discard_async(
    proxy: async_scoped_session[Any], request: RequestScope, reraise: bool = True
) -> None:
    """:func:`discard_sync` for an ``async_scoped_session``.

    A close that may do I/O is shielded from cancellation; one of a session that never
    began a transaction does none and is awaited as is.
    """
    registry = proxy.registry.registry
    session = registry.get(request)
    if session is None:
        return
    try:
        if session.sync_session.in_transaction():
            await run_shielded(session.close)
        else:
            await session.close()
    except Exception:
        log.error("closing the session of %s failed", describe(request), exc_info=True)
        if reraise:
            raise
    finally:
        registry.pop(request, None)


class request_scope:  # noqa: N801 - used like contextlib's lowercase managers
    """Open a request scope outside a web request, or a child scope inside one.

    ``with request_scope(Session): ...`` (``async with`` when any of the sessions is an
    ``async_scoped_session``) gives the block its own token, so the named sessions are
    fresh inside it and removed when it exits, whatever happens; what was not committed
    is rolled back.  Inside a request it opens a *child* scope: the way to give each
    task of an ``asyncio.gather`` its own Session, or a websocket one Session per
    message.  In work that outlived its request (a task still running after the
    response) it opens a fresh scope of its own.

    With ``request_scoped(..., replicas=)``, a scope opened outside a request reads from
    the primary; ``reads="replica"`` sends its reads to a replica (writes still go to the
    primary).  A child scope follows its request.
    """

    def __init__(
        self, *sessions: ScopedSession, reads: Literal["primary", "replica"] = "primary"
    ) -> None:
        self.sessions = tuple(check_request_scoped(s, "request_scope()") for s in sessions)
        if reads not in ("primary", "replica"):
            raise ValueError(f'request_scope(reads=) takes "primary" or "replica", not {reads!r}')
        #: Outside a request, with ``replicas=``: where reads go (writes: the primary).
        self.reads = reads
        self._token: Token[RequestScope | None] | None = None
        self._scope: RequestScope | None = None

    def _open(self) -> RequestScope:
        if self._token is not None:
            raise RuntimeError("This request_scope is already open; create one per block.")
        parent = _current.get()
        if parent is None or parent.ended:
            scope = RequestScope("script")
            scope.replica_reads = self.reads == "replica"
        else:
            scope = RequestScope(parent.kind, parent.raw, parent)
        self._scope = scope
        self._token = _current.set(scope)
        return scope

    def __enter__(self) -> RequestScope:
        if any(is_async(s) for s in self.sessions):
            raise TypeError("request_scope() got an async_scoped_session; use `async with`.")
        return self._open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._discard_sync_and_close(None)

    async def __aenter__(self) -> RequestScope:
        return self._open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        failure: BaseException | None = None
        scope = self._scope
        if scope is not None:
            scope.ended = True
        for session in self.sessions:
            if is_async(session):
                try:
                    await discard_async(session, scope)  # type: ignore[arg-type]
                except BaseException as error:
                    failure = failure or error
        cancelled = exc_type is not None and issubclass(exc_type, asyncio.CancelledError)
        if scope is not None:
            try:
                await self._discard_sync_in_worker(scope, cancelled)
            except BaseException as error:
                failure = failure or error
        self._discard_sync_and_close(failure)

    async def _discard_sync_in_worker(self, scope: RequestScope, cancelled: bool) -> None:
        """Close the sync Sessions whose close would block the loop (a round trip), or
        that a thread may still be inside (after a cancellation), in a worker thread."""
        offload = []
        for proxy in self.sessions:
            session = proxy.registry.registry.get(scope)
            if (
                session is not None
                and not is_async(proxy)
                and _closes_in_worker(session, cancelled)
            ):
                offload.append(proxy)
        if offload:
            await run_in_worker(_closer(cancelled), offload, scope)

    def _discard_sync_and_close(self, failure: BaseException | None) -> None:
        """Remove every sync session, even when one fails; then leave the scope and re-raise
        the first failure."""
        scope = self._scope
        if scope is not None:
            scope.ended = True
        for session in self.sessions:
            if not is_async(session):
                try:
                    discard_sync(session, scope)  # type: ignore[arg-type]
                except BaseException as error:
                    failure = failure or error
        token, self._token = self._token, None
        if token is not None:
            _current.reset(token)
        if failure is not None:
            raise failure
