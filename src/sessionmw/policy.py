"""Commit or roll back: the one place that decides, and what the logs say of it.

The request's unit of work asks :meth:`CommitPolicy.should_commit` once, when the
response status is known and *before* the response starts, so a commit that fails can
still become a 500: a client is never told "200 OK" for data that was not saved.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from time import perf_counter
from typing import Any, Literal

from sqlalchemy import event
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import Session

from .scope import RequestScope, ScopedSession

__all__ = [
    "Commit",
    "CommitPolicy",
    "describe",
    "log_open",
    "log_removed",
    "session_events_target",
    "warn_if_unsaved",
]

log = logging.getLogger("sessionmw")

Commit = Literal["manual", "on_success"] | Callable[[int], bool]

_UNSAVED = "sessionmw.unsaved"


def _on_success(status: int) -> bool:
    return status < 400


class CommitPolicy:
    """What ``commit=`` means: ``"manual"``, ``"on_success"`` or ``(status) -> bool``."""

    __slots__ = ("_rule", "manual")

    def __init__(self, commit: Commit) -> None:
        rule: Callable[[int], bool] | None
        if commit == "manual":
            rule = None
        elif commit == "on_success":
            rule = _on_success
        elif callable(commit):
            rule = commit
        else:
            raise ValueError(
                f"commit= takes 'manual', 'on_success' or a callable (status: int) -> bool, "
                f"not {commit!r}; for example commit='on_success'."
            )
        self._rule = rule
        self.manual = rule is None

    def should_commit(self, status: int, request: RequestScope) -> bool:
        """Commit only if the policy accepts ``status`` and nobody called set_rollback()."""
        if self._rule is None or request.rollback:
            return False
        return bool(self._rule(status))


def describe(request: RequestScope) -> str:
    """``"GET /path"`` for log lines; the kind for a script scope."""
    raw = request.raw
    if request.kind == "wsgi":
        return f"{raw.get('REQUEST_METHOD', '')} {raw.get('PATH_INFO', '')}"
    if request.kind == "http":
        return f"{raw.get('method', '')} {raw.get('path', '')}"
    if request.kind == "websocket":
        return f"WEBSOCKET {raw.get('path', '')}"
    return request.kind


def log_open(request: RequestScope) -> float:
    """Log the scope's opening at DEBUG; return its start time, or 0.0 when not logging."""
    if not log.isEnabledFor(logging.DEBUG):
        return 0.0
    log.debug("open %s", describe(request))
    return perf_counter()


def log_removed(
    request: RequestScope, status: int, started: float, statements: int = 0, db_time: float = 0.0
) -> None:
    """Log the session's removal with the request's duration, if :func:`log_open` timed it,
    and what it did to the database: its statements and their time in milliseconds."""
    if started:
        elapsed = (perf_counter() - started) * 1000
        log.debug(
            "remove %s (status %d) after %.1f ms; database: %d statement%s, %.1f ms",
            describe(request),
            status,
            elapsed,
            statements,
            "" if statements == 1 else "s",
            db_time * 1000,
        )


def warn_if_unsaved(session: Session, request: RequestScope) -> None:
    """Under ``"manual"``, warn when a successful request leaves ORM writes uncommitted."""
    info = session.__dict__.get("info")  # not session.info: that would create the dict
    flushed = False
    if info is not None:
        flushed_in = info.get(_UNSAVED)
        if flushed_in is not None:  # a flush, in a transaction that may have ended since
            transaction = flushed_in()
            flushed = transaction is not None and transaction is session.get_transaction()
    # Session.new/.dirty/.deleted build a set on every call; the containers behind them
    # tell for free whether there can be anything at all (True if they ever go away).
    maybe_pending: object
    try:
        maybe_pending = session._new or session._deleted or session.identity_map._modified
    except AttributeError:  # pragma: no cover - renamed in a SQLAlchemy to come
        maybe_pending = True
    if flushed or (maybe_pending and (session.new or session.dirty or session.deleted)):
        log.warning(
            "%s succeeded but its session has uncommitted changes, which are now rolled "
            "back; call Session.commit() or use commit='on_success'",
            describe(request),
        )


def _mark_unsaved(session: Session, *args: Any) -> None:
    """Remember the transaction that flushed: a weak reference, so the flag lapses once
    that transaction ends (commit, rollback) without a listener on every transaction's
    end, which every request would pay for."""
    transaction = session.get_transaction()
    if transaction is not None:
        session.info[_UNSAVED] = weakref.ref(transaction)


def session_events_target(session: ScopedSession) -> Any:
    """Where to listen for the Session events of ``session``'s factory: the factory, or
    for an AsyncSession its sync Session class (by default the ``Session`` class itself,
    so then the events of every Session in the process are heard)."""
    factory: Any = session.session_factory
    if isinstance(factory, async_sessionmaker):
        return factory.kw.get("sync_session_class") or factory.class_.sync_session_class
    return factory


def track_unsaved_writes(session: ScopedSession) -> None:
    """Remember flushed-but-uncommitted ORM writes of ``session``'s factory, for
    :func:`warn_if_unsaved`; only the flushes of that factory's sessions pay for it."""
    target = session_events_target(session)
    # A weak set, not event.contains(): SQLAlchemy keys that by id(), which a new
    # factory's Session class may reuse from a collected one.
    if target not in _tracked:
        _tracked.add(target)
        event.listen(target, "after_flush", _mark_unsaved)


_tracked: weakref.WeakSet[Any] = weakref.WeakSet()
