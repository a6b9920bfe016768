"""Steps and faults: where a request can be interrupted, and how.

A :class:`Probe` belongs to one run of one request.  Every step the request goes
through calls :meth:`Probe.hit`: the wrapped ``receive``, ``send`` and inner app, the
WSGI server's calls, and the database events wired by :func:`instrument`.  A step is
named by who took it (the request, or a child task), its kind, its name and how many
times that same step came before, so a replay finds it again even when child tasks or
worker threads interleave differently.  When the step is the probe's target, the
fault is injected there.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections import Counter
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import anyio.lowlevel
from sqlalchemy import Engine, event
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from sessionmw.scope import _current

#: Task.cancel() of the request's task (what a server does when the client leaves).
CANCEL = "cancel"
#: anyio's level cancellation: a cancel scope around the request is cancelled.
CANCEL_SCOPE = "cancel_scope"
#: An exception raised by the application at this step.
APP_ERROR = "app_error"
#: An OperationalError raised from the database event.
DB_ERROR = "db_error"
#: The connection is invalidated at this step (lost, as far as SQLAlchemy knows).
INVALIDATE = "invalidate"
#: The client goes away: ``http.disconnect`` from receive, OSError from send.
DISCONNECT = "disconnect"
#: The WSGI server closes the response iterable instead of asking for more.
EARLY_CLOSE = "early_close"

ALL_FAULTS = (CANCEL, CANCEL_SCOPE, APP_ERROR, DB_ERROR, INVALIDATE, DISCONNECT, EARLY_CLOSE)

#: Database steps that run on a Connection, where it can be invalidated.
_CONNECTION_STEPS = frozenset(
    {"begin", "execute", "commit", "rollback", "prepare", "commit_prepared", "rollback_prepared"}
)
#: Database steps where the database itself can fail.
_FAILING_STEPS = _CONNECTION_STEPS | {"connect", "checkout", "flush", "reset"}

#: A database fails to roll back only when the connection is gone: there the error comes
#: with the connection invalidated, as SQLAlchemy does for a driver's disconnect error.
#: (Raised alone from the event, outside the driver, SQLAlchemy's transaction close
#: leaves the Connection checked out until it is garbage collected.)
_LOSING_STEPS = frozenset({"rollback", "rollback_prepared"})

#: A COMMIT or PREPARE that fails ends the transaction in the database (PostgreSQL rolls
#: it back): the injected error does too, so SQLAlchemy's view (the transaction is over)
#: stays true.
_ABORTING_STEPS = frozenset({"commit", "prepare"})

#: Who takes the step: the request itself or a named child task.
actor: ContextVar[str] = ContextVar("fault_actor", default="request")
#: The probe of the request this code belongs to.
current_probe: ContextVar[Probe | None] = ContextVar("fault_probe", default=None)


class InjectedAppError(RuntimeError):
    """The application failed at an injected step."""


class InjectedDBAPIError(sqlite3.OperationalError):
    """The driver's error behind an injected OperationalError."""


@dataclass(frozen=True, order=True)
class Step:
    actor: str
    kind: str
    name: str
    occurrence: int

    def __str__(self) -> str:
        who = "" if self.actor == "request" else f"{self.actor}:"
        return f"{who}{self.kind}.{self.name}#{self.occurrence}"


def faults_at(step: Step, protocol: str) -> list[str]:
    """The fault kinds that make sense at ``step`` of a request served over ``protocol``."""
    cancels = [CANCEL, CANCEL_SCOPE] if protocol == "asgi" else []
    if step.kind == "asgi":
        asgi_faults = [*cancels, APP_ERROR]
        if step.name.startswith(("receive", "send")):
            asgi_faults.append(DISCONNECT)
        return asgi_faults
    if step.kind == "db":
        found = list(cancels)
        if step.name in _FAILING_STEPS:
            found.append(DB_ERROR)
        if step.name in _CONNECTION_STEPS:
            found.append(INVALIDATE)
        return found
    if step.kind == "app":
        return [APP_ERROR]
    if step.kind == "server":
        if step.name in ("start_response", "write"):
            return [DISCONNECT]
        if step.name == "next":
            return [EARLY_CLOSE]
    return []


@dataclass
class Probe:
    """Records the steps of one request and injects ``fault`` at ``target``."""

    protocol: str
    target: Step | None = None
    fault: str | None = None
    steps: list[Step] = field(default_factory=list)
    fired: Step | None = None
    loop: asyncio.AbstractEventLoop | None = None
    loop_thread: int | None = None
    task: asyncio.Task[Any] | None = None
    scope: anyio.CancelScope | None = None
    #: Set once the request is over: a Session created after that is a leak.
    ended: bool = False
    late_sessions: list[str] = field(default_factory=list)
    _counts: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    #: Instead of a target: inject at the ``nth`` step where the fault applies.
    nth: int | None = None

    def hit(self, kind: str, name: str) -> str | None:
        """Count the step; return the fault to inject here, if this is the target."""
        who = actor.get()
        with self._lock:
            self._counts[who, kind, name] += 1
            step = Step(who, kind, name, self._counts[who, kind, name])
            self.steps.append(step)
            if self.fired is not None or not self._is_target(step):
                return None
            self.fired = step
        return self.fault

    def _is_target(self, step: Step) -> bool:
        if self.nth is None:
            return step == self.target
        if self.fault not in faults_at(step, self.protocol):
            return False
        self.nth -= 1
        return self.nth < 0

    def bind_task(self, scope: anyio.CancelScope) -> None:
        """The task and cancel scope that a cancellation fault cancels."""
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()
        self.task = asyncio.current_task()
        self.scope = scope

    def interrupt(self, fault: str) -> None:
        """Cancel the request, from the loop's thread or from a worker thread."""
        assert self.task is not None
        assert self.scope is not None
        assert self.loop is not None
        cancel = self.task.cancel if fault == CANCEL else self.scope.cancel
        if threading.get_ident() == self.loop_thread:
            cancel()
        else:
            self.loop.call_soon_threadsafe(cancel)

    def raise_or_interrupt(self, fault: str | None, where: str) -> None:
        """Apply the faults that do not depend on the step's kind."""
        if fault in (CANCEL, CANCEL_SCOPE):
            self.interrupt(fault)
        elif fault == APP_ERROR:
            raise InjectedAppError(f"injected at {where}")
        elif fault == DB_ERROR:
            raise OperationalError(f"-- injected at {where}", {}, InjectedDBAPIError(where))

    async def ahit(self, name: str) -> str | None:
        """An ASGI step: a cancellation lands right here, at the await.  An app error
        is left to the caller when the step is a receive or a send: the app raises
        once the message has passed (the server's own calls do not fail that way)."""
        fault = self.hit("asgi", name)
        if fault != APP_ERROR or not name.startswith(("receive", "send")):
            self.raise_or_interrupt(fault, name)
        if fault in (CANCEL, CANCEL_SCOPE):
            await anyio.lowlevel.checkpoint()
        return fault


def step(kind: str, name: str, connection: Any = None) -> str | None:
    """A step of whichever request is running here (none outside a probed request)."""
    probe = current_probe.get()
    if probe is None:
        return None
    fault = probe.hit(kind, name)
    if fault == INVALIDATE or (fault == DB_ERROR and name in _LOSING_STEPS):
        if connection is not None:
            connection.invalidate()
        if fault == INVALIDATE:
            return fault
    if fault == DB_ERROR and name in _ABORTING_STEPS and connection is not None:
        connection.connection.dbapi_connection.rollback()
    probe.raise_or_interrupt(fault, f"{kind}.{name}")
    return fault


def instrument(engine: Engine) -> None:
    """Make every round trip of ``engine`` a step: connect, pool checkout and checkin,
    reset on return, BEGIN, each statement, PREPARE, COMMIT and ROLLBACK."""

    def on_connection(name: str) -> Any:
        def listener(conn: Any, *args: Any) -> None:
            step("db", name, conn)

        return listener

    def on_pool(name: str) -> Any:
        def listener(*args: Any) -> None:
            step("db", name)

        return listener

    event.listen(engine, "do_connect", on_pool("connect"))
    for name in ("checkout", "checkin", "reset"):
        event.listen(engine, name, on_pool(name))
    for event_name, name in (
        ("begin", "begin"),
        ("before_cursor_execute", "execute"),
        ("commit", "commit"),
        ("rollback", "rollback"),
        ("prepare_twophase", "prepare"),
        ("commit_twophase", "commit_prepared"),
        ("rollback_twophase", "rollback_prepared"),
    ):
        event.listen(engine, event_name, on_connection(name))


class ProbedSession(Session):
    """A Session whose flush and close are steps, and which tells its probe when it
    was created after its request had ended."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        probe = current_probe.get()
        scope = _current.get()
        # Work that outlived its request may hold a child scope, or open a scope of its
        # own ("script"), which removes its Session itself; a Session of the request's
        # own scope after its end is a leak.
        if (
            probe is not None
            and probe.ended
            and scope is not None
            and scope.parent is None
            and scope.kind != "script"
        ):
            probe.late_sessions.append(actor.get())

    def close(self) -> None:
        step("db", "close")
        super().close()


@event.listens_for(ProbedSession, "before_flush")
def _flush_step(session: Session, *args: Any) -> None:
    step("db", "flush")
