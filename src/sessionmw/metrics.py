"""What a request did to the database: how many statements, how long, and who is told.

A request is *metered* when a middleware asks for it (``server_timing=True``,
``max_statements=N``, ``tracing=True``) or when ``sessionmw`` logs at DEBUG when it
opens; an unmetered request allocates nothing here and no statement of it costs more
than a context-variable lookup (none at all before the first metered request).

Counting uses SQLAlchemy's engine events, installed lazily and once per engine: the first
metered request of a middleware listens for its factory's ``after_begin``, which names
each engine a Session of that factory begins a transaction on (a replica too), and that
engine gets ``before_cursor_execute`` / ``after_cursor_execute`` listeners.  A statement
belongs to the request whose token is in the context it runs in: the request's own, a
child ``request_scope``'s (counted to its request), a worker thread's (anyio copies the
context) or an async driver's greenlet (SQLAlchemy runs it in the caller's context).  So
every session of the request, on every database, adds to one count.

- **statements** are cursor executions: each ``execute``/``executemany`` the driver runs,
  including a flush's INSERTs and each batch of a bulk insert.  COMMIT and ROLLBACK are
  DBAPI calls, not cursor executions, and are not counted;
- **time** is the wall time spent in the driver for those statements, plus the
  middleware's settle (flush and COMMIT, a round trip) as a whole.  A COMMIT the app
  issues itself (``commit="manual"``) is not timed.

Two threads of one request counting at the very same moment may lose a count: the figures
are for reading, not for billing.
"""

from __future__ import annotations

import logging
import threading
import weakref
from time import perf_counter
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, event

from .policy import describe, session_events_target
from .scope import RequestScope, ScopedSession, _current

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, ExceptionContext
    from sqlalchemy.orm import Session, SessionTransaction

    from .tracing import Tracing

__all__ = ["Observe", "RequestMetrics", "instrument", "metered", "observe"]

log = logging.getLogger("sessionmw")

#: Where a statement's start time waits for its end, on SQLAlchemy's execution context.
_STARTED = "_sessionmw_started"

_FIX = 'tracing=True needs OpenTelemetry: pip install "sessionmw[opentelemetry]"'


class Observe:
    """What one middleware asks to be told of its requests (its metering keywords)."""

    __slots__ = ("max_statements", "server_timing", "tracing", "warned")

    def __init__(
        self, server_timing: bool, max_statements: int | None, tracing: Tracing | None
    ) -> None:
        self.server_timing = server_timing
        self.max_statements = max_statements
        self.tracing = tracing
        #: Stacked inside a middleware without ``tracing``: said once, not per request.
        self.warned = False


def observe(server_timing: bool, max_statements: int | None, tracing: Any) -> Observe | None:
    """Check the middleware's metering keywords; ``None`` when all are off."""
    if max_statements is not None and (
        isinstance(max_statements, bool)
        or not isinstance(max_statements, int)
        or max_statements < 0
    ):
        raise ValueError(
            f"max_statements= takes a number of statements (an int >= 0) or None, "
            f"not {max_statements!r}; for example max_statements=20."
        )
    if not (server_timing or max_statements is not None or tracing):
        return None
    tracer = None
    if tracing:
        try:
            from .tracing import Tracing
        except ImportError as exc:
            raise ImportError(_FIX) from exc
        tracer = Tracing(None if tracing is True else tracing)
    return Observe(bool(server_timing), max_statements, tracer)


class RequestMetrics:
    """One request's statements and database time, its span, and what it asked for."""

    __slots__ = (
        "db_time",
        "max_statements",
        "outcome",
        "server_timing",
        "span",
        "statements",
        "tracing",
    )

    def __init__(self, request: RequestScope, options: Observe | None) -> None:
        """Meter the request the middleware that opens it serves (``options``: its
        keywords, ``None`` when only DEBUG logging asks)."""
        self.statements = 0
        #: Seconds in the driver, and in the settle.
        self.db_time = 0.0
        #: "committed", "rolled back" or "failed"; "none" when the middleware settled
        #: nothing (``commit="manual"``, or no transaction was open).
        self.outcome = "none"
        self.server_timing = False
        self.max_statements: int | None = None
        self.tracing: Tracing | None = None
        self.span: Any = None
        if options is not None:
            if options.tracing is not None:
                self.tracing = options.tracing
                self.span = options.tracing.start(request)
            self.include(options)

    def include(self, options: Observe) -> None:
        """Add what a middleware asks for.  One stacked inside the middleware that opened
        the request adds its ``server_timing`` and ``max_statements`` (the lower wins);
        its ``tracing`` cannot count, as the span must be current before the app runs."""
        self.server_timing = self.server_timing or options.server_timing
        limit = options.max_statements
        if limit is not None and (self.max_statements is None or limit < self.max_statements):
            self.max_statements = limit
        if options.tracing is not None and self.tracing is None and not options.warned:
            options.warned = True
            log.warning(
                "tracing= is set on a middleware stacked inside one that opens the "
                "request's scope without it: set it on the outermost one, which starts "
                "the span"
            )

    # -- the settle -----------------------------------------------------------------

    def settle_began(self) -> tuple[float, float]:
        return perf_counter(), self.db_time

    def settle_ended(self, mark: tuple[float, float]) -> None:
        """The settle's wall time replaces the driver time of its own statements."""
        began, before = mark
        self.db_time = before + (perf_counter() - began)

    def note(self, what: str) -> None:
        """The middleware committed or rolled back the request's sessions."""
        self.outcome = "committed" if what == "commit" else "rolled back"
        if self.span is not None:
            self.span.add_event(what)

    # -- what is reported -------------------------------------------------------------

    def server_timing_header(self) -> tuple[str, str]:
        count = self.statements
        plural = "" if count == 1 else "s"
        return (
            "server-timing",
            f'db;dur={self.db_time * 1000:.1f};desc="{count} statement{plural}"',
        )

    def finish(self, request: RequestScope, failed: bool) -> None:
        """The request's sessions are removed: warn if it ran too many statements, and
        end its span."""
        if failed:
            self.outcome = "failed"
        limit = self.max_statements
        if limit is not None and self.statements > limit:
            log.warning(
                "%s ran %d statements, more than max_statements=%d: a query in a loop "
                "(N+1)? Load the related rows up front (selectinload, joinedload)",
                describe(request),
                self.statements,
                limit,
            )
        if self.span is not None:
            span, self.span = self.span, None
            assert self.tracing is not None
            self.tracing.finish(span, self.outcome, self.statements, self.db_time)


def metered() -> RequestMetrics | None:
    """The metrics of the request the running code belongs to, if it is metered."""
    scope = _current.get()
    while scope is not None:
        unit = scope.unit
        if unit is not None:
            return unit.metrics  # type: ignore[no-any-return]
        scope = scope.parent  # a child scope counts to its request
    return None


# -- the engine listeners ------------------------------------------------------------

# Weak sets, not event.contains(): SQLAlchemy keys that by id(), which a new factory or
# engine may reuse from a collected one, and then it would never be listened to.
_lock = threading.Lock()
_factories: weakref.WeakSet[Any] = weakref.WeakSet()
_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def instrument(session: ScopedSession) -> None:
    """Meter the engines ``session``'s factory begins transactions on; once per factory."""
    target = session_events_target(session)
    with _lock:
        if target not in _factories:
            event.listen(target, "after_begin", _on_begin)
            _factories.add(target)


def _on_begin(session: Session, transaction: SessionTransaction, connection: Connection) -> None:
    engine = connection.engine
    if engine not in _engines:
        _instrument_engine(engine)


def _instrument_engine(engine: Engine) -> None:
    with _lock:
        if engine in _engines:
            return
        event.listen(engine, "before_cursor_execute", _before_cursor, retval=True)
        event.listen(engine, "after_cursor_execute", _after_cursor)
        event.listen(engine, "handle_error", _failed)
        _engines.add(engine)


def _before_cursor(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> tuple[str, Any]:
    metrics = metered()
    if metrics is not None:
        metrics.statements += 1
        if context is not None:
            setattr(context, _STARTED, perf_counter())
    return statement, parameters


def _after_cursor(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> None:
    _stop(context)


def _failed(exception_context: ExceptionContext) -> None:
    _stop(exception_context.execution_context)


def _stop(context: Any) -> None:
    started = getattr(context, _STARTED, None)
    if started is None:
        return
    setattr(context, _STARTED, None)
    metrics = metered()
    if metrics is not None:
        metrics.db_time += perf_counter() - started
