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

from contextvars import ContextVar
from typing import Any, Literal, TypeVar, Union

from sqlalchemy.ext.asyncio import async_scoped_session
from sqlalchemy.orm import scoped_session

__all__ = [
    "NoRequestScopeError",
    "RequestScope",
    "ScopedSession",
    "current_request",
    "set_rollback",
]

ScopeKind = Literal["wsgi", "http", "websocket", "script"]
ScopedSession = Union["scoped_session[Any]", "async_scoped_session[Any]"]


class NoRequestScopeError(LookupError):
    """The session was used where no request scope is active."""


class RequestScope:
    """The token for one request: hashed by identity, never reused.

    While a session keyed by it sits in a registry, the registry holds the
    token, so no later request can collide with it (unlike keys made of
    ``id()`` of a per-request object, which Python hands out again).
    """

    __slots__ = (
        "ended",
        "kind",
        "parent",
        "primary_only",
        "raw",
        "replica_reads",
        "rollback",
        "unit",
        "wrote",
    )

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
        #: Set once the scope's sessions are removed: from then on the token opens no
        #: Session, so work that outlives its request cannot leak one.
        self.ended = False
        #: The request's unit of work (its sessions and their outcome), when a
        #: middleware serves it.
        self.unit: Any = None
        #: Replica routing (``request_scoped(..., replicas=)``): :func:`sessionmw.use_primary`
        #: was called; a script scope opened with ``reads="replica"``; a write committed.
        self.primary_only = False
        self.replica_reads = False
        self.wrote = False

    def __repr__(self) -> str:
        child = " child" if self.parent is not None else ""
        ended = " ended" if self.ended else ""
        return f"<RequestScope {self.kind}{child}{ended} at {id(self):#x}>"


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


_ENDED = (
    "The request this code belongs to has ended ({scope!r}) and its sessions were removed; "
    "no new Session is opened for it, since nothing would remove that one. Work that "
    "outlives its request (a task, a thread, an executor, a body streamed after the client "
    "left) opens its own scope: `with sessionmw.request_scope(Session): ...` "
    "(`async with` for an async_scoped_session)."
)


def current_request() -> RequestScope:
    """Return the active request's token; the ``scopefunc`` for ``scoped_session``.

    Raises :class:`NoRequestScopeError` outside a scope, and for a scope that has ended.
    """
    scope = _current.get()
    if scope is None:
        raise NoRequestScopeError(_NO_SCOPE)
    if scope.ended:
        raise NoRequestScopeError(_ENDED.format(scope=scope))
    return scope


def set_rollback(flag: bool = True) -> None:
    """Veto (or un-veto) the commit of the innermost active scope.

    With ``commit="on_success"`` the request then rolls back even though it
    succeeds.  Inside a child :class:`request_scope` it applies to that child.
    """
    current_request().rollback = flag


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
    return guard_registry(session)


class _Registry(dict[RequestScope, Any]):
    """A scoped_session's registry that takes no Session for a scope that has ended.

    :func:`current_request` refuses an ended scope, but a thread may have passed that
    check just before its request ended and store its new Session just after the
    middleware emptied the registry: nothing would ever remove that one.
    """

    def setdefault(self, key: RequestScope, default: Any = None) -> Any:
        value = super().setdefault(key, default)
        if key.ended:
            self.pop(key, None)
            raise NoRequestScopeError(_ENDED.format(scope=key))
        return value

    def __setitem__(self, key: RequestScope, value: Any) -> None:
        super().__setitem__(key, value)
        if key.ended:
            self.pop(key, None)
            raise NoRequestScopeError(_ENDED.format(scope=key))


_Scoped = TypeVar("_Scoped", bound=ScopedSession)


def guard_registry(session: _Scoped) -> _Scoped:
    """Give ``session`` a registry that refuses ended scopes (once; keeps what it holds)."""
    registry = session.registry
    if type(registry.registry) is dict:
        registry.registry = _Registry(registry.registry)
    return session
