"""Replaying a request that failed with a transient database error.

A serialization failure or a deadlock says "try again": the database rolled the
transaction back and the same request, run anew, usually succeeds.  The middleware may
replay the whole request (``retries=``) when it is safe: nothing of the response has
reached the server, nothing of the request was committed, and its body was read whole
(and is small enough to keep) or not at all.  This module holds what both protocols
share: the test for a transient error, the evidence a request collects (the database
errors it met, whether it committed), the backoff, and the WSGI input recorder.

The evidence comes from SQLAlchemy's own events, so an error that the app's error
handler turned into a 500 counts as well as one that escaped.
"""

from __future__ import annotations

import io
import logging
import random
import sqlite3
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.orm import Session

from .scope import RequestScope, _current

__all__ = [
    "Evidence",
    "RecordingInput",
    "RecordingReceive",
    "RetryPolicy",
    "is_transient",
    "note_replica_failure",
]

log = logging.getLogger("sessionmw")

#: The methods whose requests read from a replica, when there are replicas.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

#: PostgreSQL: serialization_failure, deadlock_detected, lock_not_available.
_PG_TRANSIENT = frozenset({"40001", "40P01", "55P03"})
#: MySQL and MariaDB: lock wait timeout, deadlock.
_MYSQL_TRANSIENT = frozenset({1205, 1213})


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a database failure that the same request, replayed, may not meet.

    Serialization failure (SQLSTATE 40001), deadlock (40P01) and lock timeout (55P03) on
    PostgreSQL with psycopg 3, psycopg2 or asyncpg; deadlock (1213) and lock-wait
    timeout (1205) on MySQL; "database is locked" on SQLite.  Looks through SQLAlchemy's
    wrappers and the exception's causes.
    """
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        code = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
        if code in _PG_TRANSIENT:
            return True
        args = getattr(error, "args", ())
        if args and args[0] in _MYSQL_TRANSIENT and "mysql" in type(error).__module__.lower():
            return True
        if isinstance(error, sqlite3.OperationalError) and "database is locked" in str(error):
            return True
        pending.extend((getattr(error, "orig", None), error.__cause__, error.__context__))
    return False


class RetryPolicy:
    """What ``retries=``, ``retry_on=`` and ``retry_body_limit=`` mean."""

    __slots__ = ("body_limit", "failover", "replays", "retries", "retry_on")

    def __init__(
        self,
        retries: int,
        retry_on: Callable[[BaseException], bool] | None,
        body_limit: int,
        failover: bool = False,
    ) -> None:
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(
                f"retries= takes a whole number of replays, 0 or more, not {retries!r}"
            )
        if retry_on is not None and not callable(retry_on):
            raise TypeError(
                f"retry_on= takes a predicate (exc) -> bool, not {retry_on!r}; "
                "for example retry_on=sessionmw.is_transient."
            )
        if not isinstance(body_limit, int) or body_limit < 0:
            raise ValueError(f"retry_body_limit= takes a number of bytes, not {body_limit!r}")
        self.retries = retries
        self.retry_on = retry_on or is_transient
        self.body_limit = body_limit
        #: With replicas: a request that met a failing replica is replayed once, its
        #: reads going elsewhere, on top of the ``retries`` for transient errors.
        self.failover = failover
        #: The most replays of one request.
        self.replays = retries + failover
        if self.replays:
            _listen()

    def may_replay(self, method: str) -> bool:
        """Whether a request with ``method`` takes the replaying path: with ``retries``,
        every one; with replicas alone, only a safe method (only it reads from one)."""
        return bool(self.retries) or (self.failover and method in SAFE_METHODS)

    def evidence(self, previous: Evidence | None) -> Evidence:
        """The evidence for the next attempt, knowing what the replays so far were for."""
        if previous is None:
            return Evidence(self.retries > 0, self.failover)
        if previous.replica_failure is not None and previous.failover_left:
            return Evidence(previous.replayable, False, previous.transient_used)
        used = previous.transient_used + 1
        return Evidence(used < self.retries, previous.failover_left, used)

    def failure(self, evidence: Evidence, escaped: BaseException | None) -> BaseException | None:
        """The failure that makes the attempt worth replaying, if any: a replica that
        failed (once), else a transient error while ``retries`` are left."""
        if evidence.replica_failure is not None and evidence.failover_left:
            return evidence.replica_failure
        if not evidence.replayable:
            return None
        candidates = list(evidence.errors)  # the database's own word first
        if escaped is not None:
            candidates.append(escaped)
        for error in candidates:
            if isinstance(error, Exception) and self.retry_on(error):
                return error
        return None

    @staticmethod
    def backoff(attempt: int) -> float:
        """Seconds to wait before replay number ``attempt`` (1, 2, ...): short, jittered."""
        base: float = min(0.01 * 2 ** (attempt - 1), 0.5)
        return base * random.uniform(0.5, 1.5)

    @staticmethod
    def log_replay(request: RequestScope, attempt: int, retries: int, error: BaseException) -> None:
        from .policy import describe

        log.warning(
            "replaying %s after a %s (replay %d of %d): %s",
            describe(request),
            "failed replica" if _replica_failure(error) else "transient database error",
            attempt,
            retries,
            str(error).splitlines()[0] if str(error) else type(error).__name__,
        )


class Evidence:
    """What one attempt of a request did that bears on replaying it."""

    __slots__ = (
        "committed",
        "errors",
        "failover_left",
        "replayable",
        "replica_failure",
        "transient_used",
    )

    def __init__(
        self, replayable: bool = True, failover_left: bool = False, transient_used: int = 0
    ) -> None:
        #: Database errors met on the way, even those the app caught and answered.
        self.errors: list[BaseException] = []
        #: A Session of the request committed: replaying would apply that twice.
        self.committed = False
        #: Replays for transient errors are left: such a failure is not the last word.
        self.replayable = replayable
        self.transient_used = transient_used
        #: A replica failed in this attempt (the error), and a replay for that is left.
        self.replica_failure: BaseException | None = None
        self.failover_left = failover_left


def _replica_failure(error: BaseException) -> bool:
    return bool(getattr(error, "_sessionmw_replica", False))


def note_replica_failure(error: BaseException) -> None:
    """A replica refused or dropped a connection in the current request: the request may
    be replayed once (its reads then go to another replica or to the primary)."""
    evidence = _evidence()
    if evidence is not None and evidence.replica_failure is None:
        error._sessionmw_replica = True  # type: ignore[attr-defined]
        evidence.replica_failure = error


def _evidence() -> Evidence | None:
    scope = _current.get()
    while scope is not None:
        unit = scope.unit
        if unit is not None:
            evidence: Evidence | None = unit.evidence
            return evidence
        scope = scope.parent
    return None


def _on_error(context: ExceptionContext) -> None:
    evidence = _evidence()
    if evidence is not None:
        evidence.errors.append(context.sqlalchemy_exception or context.original_exception)


def _on_commit(session: Session) -> None:
    if session.get_nested_transaction() is None:  # not a savepoint's release
        evidence = _evidence()
        if evidence is not None:
            evidence.committed = True


def _listen() -> None:
    if not event.contains(Engine, "handle_error", _on_error):
        event.listen(Engine, "handle_error", _on_error)
        event.listen(Session, "after_commit", _on_commit)


class RecordingInput:
    """``wsgi.input`` that keeps what the app reads, up to a limit, to replay it."""

    def __init__(self, stream: Any, limit: int, length: int | None) -> None:
        self._stream = stream
        self._limit = limit
        self.length = length
        self._kept = io.BytesIO()
        self._total = 0
        self.read_any = False
        self.overflowed = False
        self.at_end = False

    def _keep(self, data: bytes, asked: int | None) -> bytes:
        self._total += len(data)
        if data:
            self.read_any = True
            if self._total > self._limit:
                self.overflowed = True
                self._kept = io.BytesIO()
            elif not self.overflowed:
                self._kept.write(data)
        exhausted = not data and asked != 0
        if exhausted or (self.length is not None and self._total >= self.length):
            self.at_end = True
        return data

    def read(self, size: int | None = -1) -> bytes:
        whole = size is None or size < 0
        return self._keep(self._stream.read() if whole else self._stream.read(size), size)

    def readline(self, size: int | None = -1) -> bytes:
        whole = size is None or size < 0
        return self._keep(self._stream.readline() if whole else self._stream.readline(size), size)

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        return [self._keep(line, None) for line in self._stream.readlines(hint)]

    def __iter__(self) -> Any:
        return iter(self.readline, b"")

    def replayable(self) -> bool:
        """Read not at all, or whole within the limit."""
        return not self.read_any or (self.at_end and not self.overflowed)

    def replay(self) -> Any:
        """The input for the next attempt: the kept bytes, or the untouched stream."""
        if not self.read_any:
            return self._stream
        return io.BytesIO(self._kept.getvalue())


class RecordingReceive:
    """An ASGI ``receive`` that keeps the request body the app reads, up to a limit."""

    def __init__(self, receive: Any, limit: int) -> None:
        self._receive = receive
        self._limit = limit
        self._messages: list[Any] = []
        self._size = 0
        self.read_any = False
        self.overflowed = False
        self.complete = False

    async def receive(self) -> Any:
        message = await self._receive()
        if message["type"] == "http.request":
            self.read_any = True
            if not self.overflowed:
                self._size += len(message.get("body", b""))
                if self._size > self._limit:
                    self.overflowed = True
                    self._messages.clear()
                else:
                    self._messages.append(message)
            if not message.get("more_body", False):
                self.complete = True
        return message

    def replayable(self) -> bool:
        """Read not at all, or whole within the limit."""
        return not self.read_any or (self.complete and not self.overflowed)

    def replay(self) -> Any:
        """The ``receive`` for the next attempt: the kept body first, then the server's."""
        if not self.read_any:
            return self.receive
        queue = list(self._messages)

        async def replayed() -> Any:
            if queue:
                return queue.pop(0)
            return await self._receive()

        return replayed
