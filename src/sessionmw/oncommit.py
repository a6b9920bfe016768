"""After-commit callbacks: ``on_commit(session, func)``.

Work that must only happen once data is saved (an e-mail, a message to a queue, a cache
purge) is registered with the transaction it depends on.  It runs once that Session's
outermost transaction has committed, whoever committed it (the middleware's policy or
the app's own ``Session.commit()``), and is dropped when that transaction, or the
savepoint it was registered in, rolls back, or when the commit fails.

In a request served by a middleware the callbacks wait until the response has been
sent, so they neither delay it nor turn it into an error; elsewhere (``request_scope``,
scripts, jobs) they run right after the commit.

Usage::

    user = User(email=email)
    Session.add(user)
    sessionmw.on_commit(Session, lambda: send_welcome_mail(email))
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession, async_scoped_session
from sqlalchemy.orm import Session, SessionTransaction, scoped_session
from sqlalchemy.util import concurrency

from .scope import RequestScope, _current

__all__ = ["Callback", "on_commit", "run_callback"]

log = logging.getLogger("sessionmw")

#: A callable taking no arguments, or a coroutine function taking none.
Callback = Callable[[], Awaitable[Any] | Any]

_PENDING = "sessionmw.on_commit"
_COMMITTED = "sessionmw.committed"


def on_commit(
    session: scoped_session[Any] | async_scoped_session[Any] | Session | AsyncSession,
    func: Callback,
) -> None:
    """Run ``func`` once, after ``session``'s outermost transaction commits.

    ``session`` may be a ``scoped_session`` or ``async_scoped_session`` (it resolves to
    the current request's Session), a ``Session`` or an ``AsyncSession``.  ``func`` is a
    callable or a coroutine function, taking no arguments.  Registered inside a
    savepoint (``begin_nested()``), it is dropped if that savepoint rolls back.
    """
    if not callable(func):
        raise TypeError(
            f"on_commit() takes a callable with no arguments, not {func!r}; "
            "for example on_commit(Session, lambda: send_mail(address))."
        )
    target = _sync_session(session)
    _listen()
    transaction = target.get_nested_transaction() or target.get_transaction()
    target.info.setdefault(_PENDING, []).append((transaction, func))


def _sync_session(session: Any) -> Session:
    if isinstance(session, (scoped_session, async_scoped_session)):
        session = session()
    if isinstance(session, AsyncSession):
        return session.sync_session
    if isinstance(session, Session):
        return session
    raise TypeError(
        f"on_commit() takes a scoped_session, async_scoped_session, Session or AsyncSession, "
        f"not {type(session).__name__}."
    )


def _listen() -> None:
    if not event.contains(Session, "after_commit", _after_commit):
        event.listen(Session, "after_commit", _after_commit)
        event.listen(Session, "after_transaction_end", _after_transaction_end)


def _after_commit(session: Session) -> None:
    if session.info.get(_PENDING):
        committed = session.get_nested_transaction() or session.get_transaction()
        session.info.setdefault(_COMMITTED, set()).add(committed)


def _owner(transaction: SessionTransaction | None) -> SessionTransaction | None:
    """The savepoint or root transaction that ``transaction`` belongs to."""
    while transaction is not None and not transaction.nested and transaction.parent is not None:
        transaction = transaction.parent
    return transaction


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    pending: list[tuple[SessionTransaction | None, Callback]] | None = session.info.get(_PENDING)
    if not pending or (transaction.parent is not None and not transaction.nested):
        return  # nothing registered, or a flush's inner transaction
    committed_set: set[SessionTransaction] = session.info.get(_COMMITTED, set())
    committed = transaction in committed_set
    committed_set.discard(transaction)
    root = transaction.parent is None
    mine = [f for t, f in pending if t is transaction or (root and t is None)]
    if not mine:
        return
    rest = [(t, f) for t, f in pending if not (t is transaction or (root and t is None))]
    if committed and not root:  # a released savepoint: its callbacks wait for the outer one
        parent = _owner(transaction.parent)
        rest.extend((parent, f) for f in mine)
    session.info[_PENDING] = rest
    if committed and root:
        _dispatch(mine)


def _dispatch(callbacks: list[Callback]) -> None:
    """Hand committed callbacks to the request's unit of work, to run after the
    response; outside a served request, run them now."""
    scope: RequestScope | None = _current.get()
    while scope is not None:
        if scope.unit is not None and not scope.ended:
            scope.unit.callbacks.extend(callbacks)
            return
        scope = scope.parent
    for callback in callbacks:
        run_callback(callback, "a commit outside a request")


def run_callback(callback: Callback, where: str) -> None:
    """Run one callback in this thread, logging (not raising) its failure."""
    try:
        if inspect.iscoroutinefunction(callback):
            _run_coroutine(callback)
        else:
            callback()
    except Exception:
        log.error("an on_commit callback failed after %s", where, exc_info=True)


def _run_coroutine(callback: Callback) -> None:
    if _in_greenlet():  # an AsyncSession's commit: await it on the session's own loop
        concurrency.await_only(callback())
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(callback())  # type: ignore[arg-type]
        return
    task = loop.create_task(callback())  # type: ignore[arg-type]
    _background.add(task)
    task.add_done_callback(_finished)


def _in_greenlet() -> bool:
    check = getattr(concurrency, "in_greenlet", None)
    return bool(check is not None and check())


_background: set[asyncio.Task[Any]] = set()


def _finished(task: asyncio.Task[Any]) -> None:
    _background.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("an on_commit callback failed", exc_info=task.exception())
