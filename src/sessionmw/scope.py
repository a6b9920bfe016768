"""The request token and the scope it keys.

SQLAlchemy's :class:`~sqlalchemy.orm.scoped_session` stores one ``Session`` per
value returned by its ``scopefunc``.  The default scope is the thread, which is
wrong as soon as one thread serves several requests (asyncio, greenlets) or one
request spans several threads (a thread pool running sync endpoints).  Here the
scope is the *request*: every request gets a fresh :class:`RequestScope` object,
held in a :class:`~contextvars.ContextVar` that follows the request through
threads, tasks and greenlets, and :func:`current_request` is the ``scopefunc``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextvars import ContextVar, Token
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union

import anyio
from sqlalchemy.ext.asyncio import async_scoped_session, async_sessionmaker
from sqlalchemy.orm import scoped_session, sessionmaker

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session

log = logging.getLogger("sessionmw")

__all__ = [
    "NoRequestScopeError",
    "RequestScope",
    "ScopedSession",
    "current_request",
    "request_scope",
    "request_scoped",
    "set_rollback",
]

ScopeKind = Literal["wsgi", "http", "websocket", "script"]
ScopedSession = Union["scoped_session[Any]", "async_scoped_session[Any]"]

_S = TypeVar("_S", bound="Session")
_AS = TypeVar("_AS", bound="AsyncSession")
_T = TypeVar("_T")


class NoRequestScopeError(LookupError):
    """The session was used where no request scope is active."""


class RequestScope:
    """The token for one request: hashed by identity, never reused.

    While a session keyed by it sits in a registry, the registry holds the
    token, so no later request can collide with it (unlike keys made of
    ``id()`` of a per-request object, which Python hands out again).
    """

    __slots__ = ("kind", "parent", "raw", "rollback")

    def __init__(
        self,
        kind: ScopeKind,
        raw: Any = None,
        parent: RequestScope | None = None,
    ) -> None:
        #: ``"wsgi"``, ``"http"``, ``"websocket"`` or ``"script"``.
        self.kind = kind
        #: The WSGI ``environ`` or ASGI ``scope`` this token stands for
        #: (``None`` for a script scope).
        self.raw = raw
        #: The enclosing scope when this is a child scope, else ``None``.
        self.parent = parent
        #: Set by :func:`set_rollback`: roll back even if the request succeeds.
        self.rollback = False

    def __repr__(self) -> str:
        child = " child" if self.parent is not None else ""
        return f"<RequestScope {self.kind}{child} at {id(self):#x}>"


_current: ContextVar[RequestScope | None] = ContextVar("sessionmw.request", default=None)

#: Where a middleware leaves the request's token in the environ or ASGI scope, so a
#: middleware stacked inside it (even behind one that copies the dict) shares the token.
TOKEN_KEY = "sessionmw.request"

_NO_SCOPE = (
    "No request scope is active. Wrap the application with "
    "sessionmw.WSGISessionMiddleware or sessionmw.ASGISessionMiddleware, or open "
    "one explicitly with `with sessionmw.request_scope(Session): ...` "
    "(`async with` for an async_scoped_session) in scripts, jobs and tests. "
    "At start-up, configure the factory itself: Session.session_factory.configure(bind=engine)."
)


def current_request() -> RequestScope:
    """Return the active request's token; the ``scopefunc`` for ``scoped_session``."""
    scope = _current.get()
    if scope is None:
        raise NoRequestScopeError(_NO_SCOPE)
    return scope


def set_rollback(flag: bool = True) -> None:
    """Veto (or un-veto) the commit of the innermost active scope.

    With ``commit="on_success"`` the request then rolls back even though it
    succeeds.  Inside a child :class:`request_scope` it applies to that child.
    """
    current_request().rollback = flag


def request_scoped(
    factory: sessionmaker[_S] | async_sessionmaker[_AS],
) -> scoped_session[_S] | async_scoped_session[_AS]:
    """Return a registry keyed by the current request for ``factory``.

    A :class:`~sqlalchemy.orm.sessionmaker` gives a ``scoped_session``, an
    :class:`~sqlalchemy.ext.asyncio.async_sessionmaker` an
    ``async_scoped_session``; both are SQLAlchemy's own objects.
    """
    if isinstance(factory, async_sessionmaker):
        return async_scoped_session(factory, scopefunc=current_request)
    if isinstance(factory, sessionmaker):
        return scoped_session(factory, scopefunc=current_request)
    raise TypeError(
        f"request_scoped() takes a sessionmaker or async_sessionmaker, not "
        f"{type(factory).__name__}; for example "
        f"request_scoped(sessionmaker(bind=engine))."
    )


def is_async(session: ScopedSession) -> bool:
    """Tell an ``async_scoped_session`` from a ``scoped_session``."""
    return isinstance(session, async_scoped_session)


def check_request_scoped(session: object, owner: str) -> ScopedSession:
    """Refuse anything but a scoped_session keyed by :func:`current_request`.

    A thread-local or ``current_task`` scoped_session would hand one Session to
    several requests, so the mistake is caught at start-up, with the fix.
    """
    fix = (
        "Create it with `Session = sessionmw.request_scoped(sessionmaker(bind=engine))` "
        "or `scoped_session(factory, scopefunc=sessionmw.current_request)`."
    )
    if not isinstance(session, (scoped_session, async_scoped_session)):
        raise TypeError(
            f"{owner} needs a scoped_session or async_scoped_session, not "
            f"{type(session).__name__}. {fix}"
        )
    scopefunc = getattr(session.registry, "scopefunc", None)
    if scopefunc is not current_request:
        where = "thread-local" if scopefunc is None else f"scopefunc={scopefunc!r}"
        raise ValueError(
            f"{owner} got a {type(session).__name__} whose scope is {where}, "
            f"not the current request, so requests would share Sessions. {fix}"
        )
    return session


def session_of(proxy: ScopedSession, request: RequestScope) -> Any:
    """The Session ``request`` holds in ``proxy``'s registry, or ``None``; creates nothing."""
    return proxy.registry.registry.get(request)


def discard_sync(proxy: scoped_session[Any], request: RequestScope) -> None:
    """What ``Session.remove()`` does for ``request``: close its Session (rolling back what
    was not committed), then forget it; forgotten even if the close fails."""
    registry = proxy.registry.registry
    session = registry.get(request)
    if session is None:
        return
    try:
        session.close()
    except Exception:
        log.error("closing the session failed", exc_info=True)
        raise
    finally:
        registry.pop(request, None)


async def discard_async(proxy: async_scoped_session[Any], request: RequestScope) -> None:
    """:func:`discard_sync` for an ``async_scoped_session``.

    A close that may do I/O is shielded from cancellation (:func:`run_shielded`);
    one of a session that never began a transaction does none and is awaited as is.
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
        log.error("closing the session failed", exc_info=True)
        raise
    finally:
        registry.pop(request, None)


async def run_shielded(func: Callable[..., Awaitable[_T]], *args: Any) -> _T:
    """Run ``func(*args)`` to the end even if the caller is cancelled meanwhile.

    A cancelled request (client gone, server shutting down) must still commit
    or close what it started and give its connection back.  An anyio shielded
    scope holds off anyio's (and trio's) cancellation, but not a plain
    ``Task.cancel()`` under asyncio, so there the work runs in a task of its own
    that is awaited until done; the cancellation is re-raised afterwards.
    """
    with anyio.CancelScope(shield=True):
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # not asyncio: the shielded scope is enough
            result = await func(*args)
        else:
            result = await wait_out(asyncio.ensure_future(func(*args)))
    return result


async def wait_out(work: asyncio.Future[_T]) -> _T:
    """Await ``work`` until it is done, however often the caller is cancelled meanwhile.

    Then the caller's first cancellation is re-raised (a failure of ``work``
    that nobody can receive any more is logged), else ``work``'s outcome.
    """
    cancelled: asyncio.CancelledError | None = None
    while not work.done():
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError as exc:
            cancelled = cancelled or exc
    if cancelled is not None:
        if not work.cancelled() and work.exception() is not None:
            log.error("cleanup failed while its request was cancelled", exc_info=work.exception())
        raise cancelled
    return work.result()


class request_scope:  # noqa: N801 - used like contextlib's lowercase managers
    """Open a request scope outside a web request, or a child scope inside one.

    ``with request_scope(Session): ...`` (``async with`` when any of the
    sessions is an ``async_scoped_session``) gives the block its own token, so
    the named sessions are fresh inside it and removed when it exits, whatever
    happens; what was not committed is rolled back.  Inside a request it opens
    a *child* scope: the way to give each task of an ``asyncio.gather`` its own
    Session, or a websocket one Session per message.
    """

    def __init__(self, *sessions: ScopedSession) -> None:
        self.sessions = tuple(check_request_scoped(s, "request_scope()") for s in sessions)
        self._token: Token[RequestScope | None] | None = None
        self._scope: RequestScope | None = None

    def _open(self) -> RequestScope:
        if self._token is not None:
            raise RuntimeError("This request_scope is already open; create one per block.")
        parent = _current.get()
        if parent is None:
            scope = RequestScope("script")
        else:
            scope = RequestScope(parent.kind, parent.raw, parent)
        self._scope = scope
        self._token = _current.set(scope)
        return scope

    def _close(self) -> None:
        token, self._token = self._token, None
        if token is not None:
            _current.reset(token)

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
        for session in self.sessions:
            if is_async(session):
                try:
                    await discard_async(session, self._scope)  # type: ignore[arg-type]
                except BaseException as error:
                    failure = failure or error
        self._discard_sync_and_close(failure)

    def _discard_sync_and_close(self, failure: BaseException | None) -> None:
        """Remove every sync session, even when one fails; then leave the scope and re-raise
        the first failure."""
        for session in self.sessions:
            if not is_async(session):
                try:
                    discard_sync(session, self._scope)  # type: ignore[arg-type]
                except BaseException as error:
                    failure = failure or error
        self._close()
        if failure is not None:
            raise failure
