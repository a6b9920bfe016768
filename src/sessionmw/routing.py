"""Reads to read replicas, writes to the primary, and a client's reads after its write.

``request_scoped(factory, replicas=[...])`` gives the registry a Session class whose
:meth:`~sqlalchemy.orm.Session.get_bind` chooses the engine for each statement — the
hook SQLAlchemy documents for this — so every Session API (ORM queries, ``execute``,
lazy loads, ``get``) is routed without wrapping it.

The rules, per request:

- a request with a safe method (GET, HEAD, OPTIONS) reads from one replica, chosen
  when its first statement runs; every other request uses the primary throughout, and
  so do scripts and ``request_scope`` unless opened with ``reads="replica"``;
- a write (a flush, INSERT/UPDATE/DELETE, ``SELECT ... FOR UPDATE``/``FOR SHARE``,
  text that is not a plain SELECT, ``Session.connection()``) goes to the primary, and
  every statement of that Session after it as well: it sees its own writes;
- :func:`use_primary` pins the rest of the current request to the primary;
- a request that committed a write answers with a cookie (:class:`ReadYourWrites`) that
  sends the same client's reads to the primary for a few seconds, long enough for the
  replicas to replay the write: the page after a redirect shows it;
- a replica that fails to connect or drops its connection is skipped for a while (the
  middleware replays a request that met the failure), and with ``max_replica_lag`` one
  that has fallen behind is skipped, checked at most once a second, not per request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from itertools import count
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import Engine, event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import InterfaceError, InternalError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.elements import TextClause

from .retry import SAFE_METHODS, note_replica_failure
from .scope import RequestScope, _current, current_request

if TYPE_CHECKING:
    from sqlalchemy.sql.elements import ClauseElement

__all__ = ["ReadYourWrites", "Router", "marker_for", "routed_factory", "use_primary"]

log = logging.getLogger("sessionmw")

#: A replica that failed is left alone this long before it is tried again.
RETRY_REPLICA_AFTER = 2.0
#: With ``max_replica_lag``, how often each replica's lag is measured.
LAG_CHECK_INTERVAL = 1.0
#: How far behind a PostgreSQL standby is, in seconds; 0 when it has replayed all it got.
LAG_QUERY = (
    "SELECT CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 "
    "ELSE COALESCE(EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()), 0) END"
)


def use_primary() -> None:
    """Send the rest of the current request's statements to the primary.

    For reads that must see the latest data (after a write made by another request, or
    before one of your own), in a request that would otherwise read from a replica.
    """
    root(current_request()).primary_only = True


def root(request: RequestScope) -> RequestScope:
    """The request a child scope belongs to (itself when it is one)."""
    while request.parent is not None:
        request = request.parent
    return request


class Replica:
    """One replica engine and what is known of its health."""

    __slots__ = ("down_until", "engine", "label", "lag_checked", "lagging")

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.label = engine.url.render_as_string(hide_password=True)
        #: ``time.monotonic()`` before which the replica is not used.
        self.down_until = 0.0
        self.lag_checked = -LAG_CHECK_INTERVAL
        self.lagging = False

    def mark_down(self, error: BaseException) -> None:
        if time.monotonic() >= self.down_until:
            log.warning(
                "replica %s failed; its reads go elsewhere for %.0f s: %s",
                self.label,
                RETRY_REPLICA_AFTER,
                str(error).strip().splitlines()[0] if str(error).strip() else type(error),
            )
        self.down_until = time.monotonic() + RETRY_REPLICA_AFTER


class Router:
    """The replicas of one registry and the choice among them."""

    def __init__(self, replicas: Sequence[Engine], max_lag: float | None) -> None:
        if max_lag is not None and (not isinstance(max_lag, (int, float)) or max_lag < 0):
            raise ValueError(
                f"max_replica_lag= takes seconds (a number, 0 or more) or None, not {max_lag!r}"
            )
        self.replicas = [Replica(engine) for engine in replicas]
        self.max_lag = max_lag
        self._turn = count()
        self._lag_lock = threading.Lock()
        for replica in self.replicas:
            event.listen(replica.engine, "handle_error", self._on_error)
            event.listen(replica.engine, "do_connect", _connect_watched(replica))

    def pick(self) -> Replica | None:
        """A healthy replica, in turn; ``None`` when none is: read from the primary."""
        now = time.monotonic()
        replicas = self.replicas
        start = next(self._turn)
        for offset in range(len(replicas)):
            replica = replicas[(start + offset) % len(replicas)]
            if now < replica.down_until:
                continue
            if self.max_lag is not None and self._behind(replica, now):
                continue
            return replica
        return None

    def _behind(self, replica: Replica, now: float) -> bool:
        """Whether ``replica`` lags more than allowed, measured at most once an interval
        by whichever request comes first (the others use the last figure)."""
        if now - replica.lag_checked >= LAG_CHECK_INTERVAL and self._lag_lock.acquire(False):
            try:
                replica.lag_checked = now
                with replica.engine.connect() as connection:
                    lag = float(connection.exec_driver_sql(LAG_QUERY).scalar() or 0)
                replica.lagging = self.max_lag is not None and lag > self.max_lag
                if replica.lagging:
                    log.info(
                        "replica %s is %.1f s behind (max_replica_lag=%s): reads go elsewhere",
                        replica.label,
                        lag,
                        self.max_lag,
                    )
            except Exception as error:  # unreachable: _on_error has marked it down
                replica.lagging = True
                log.debug("measuring the lag of replica %s failed: %s", replica.label, error)
            finally:
                self._lag_lock.release()
        return replica.lagging

    def _on_error(self, context: ExceptionContext) -> None:
        """A replica that refused a connection, lost one, or failed as a server (not a
        mistake in the statement) is skipped for a while, and the request that met it
        may be replayed (see :mod:`sessionmw.retry`)."""
        if not (
            context.is_disconnect
            or context.connection is None
            or isinstance(context.sqlalchemy_exception, _SERVER_FAILURES)
        ):
            return
        engine = context.engine
        for replica in self.replicas:
            if replica.engine is engine:
                replica.mark_down(context.original_exception)
        note_replica_failure(context.sqlalchemy_exception or context.original_exception)


def _connect_watched(replica: Replica) -> Any:
    """A ``do_connect`` hook: a replica that cannot be reached, whatever the driver raises
    (asyncpg raises plain ``OSError``s that never reach ``handle_error``), is marked down
    and the request that met it may be replayed."""

    def connect(dialect: Any, record: Any, cargs: Any, cparams: Any) -> Any:
        try:
            return dialect.connect(*cargs, **cparams)
        except Exception as error:
            replica.mark_down(error)
            note_replica_failure(error)
            raise

    return connect


#: Errors of the server or the link rather than of the statement; on a hot standby these
#: include "canceling statement due to conflict with recovery".
_SERVER_FAILURES = (OperationalError, InterfaceError, InternalError)

_UNDECIDED: Any = object()


class RoutingSession(Session):
    """A Session whose statements go to the primary or to one of the replicas."""

    _sessionmw_router: ClassVar[Router]
    #: The replica this Session reads from (``None``: the primary), once decided.
    _sessionmw_replica: Replica | None = _UNDECIDED
    #: Once True, every statement goes to the primary.
    _sessionmw_pinned = False
    #: A write since the last commit or rollback: its commit earns the client the marker.
    _sessionmw_wrote = False

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        #: The request (or script scope) this Session was opened for.
        self._sessionmw_request = _current.get()

    def get_bind(
        self,
        mapper: Any = None,
        *,
        clause: ClauseElement | None = None,
        **kw: Any,
    ) -> Any:
        primary = super().get_bind(mapper, clause=clause, **kw)
        if kw.get("bind") is not None:
            return primary
        if not self._sessionmw_pinned:
            need = _needs(self, clause)
            if need:
                self._sessionmw_pinned = True
                self._sessionmw_wrote = self._sessionmw_wrote or need is WRITE
            else:
                replica = self._sessionmw_replica
                if replica is _UNDECIDED:
                    replica = self._sessionmw_replica = self._choose()
                if replica is not None and not root(replica_request(self)).primary_only:
                    _log_route(clause, replica.label)
                    return replica.engine
        _log_route(clause, "the primary")
        return primary

    def _choose(self) -> Replica | None:
        request = self._sessionmw_request
        if request is None:
            return None
        request = root(request)
        if request.primary_only:
            return None
        if request.kind == "script":
            return self._sessionmw_router.pick() if request.replica_reads else None
        if request.kind == "wsgi":
            method = request.raw.get("REQUEST_METHOD", "")
        elif request.kind == "http":
            method = request.raw.get("method", "")
        else:  # a websocket may write at any message: the primary throughout
            return None
        if method not in SAFE_METHODS:
            return None
        unit = request.unit
        if unit is not None:
            for binding in unit.bindings:
                if binding.marker is not None and binding.marker.sent_by(request):
                    return None
        return self._sessionmw_router.pick()


def replica_request(session: RoutingSession) -> RequestScope:
    """The request of a Session that reads from a replica (it was opened in one)."""
    request = session._sessionmw_request
    assert request is not None
    return request


READ, LOCK, WRITE = "", "lock", "write"


def _needs(session: Session, clause: ClauseElement | None) -> str:
    """What the statement about to run does: a write or a row lock needs the primary."""
    if clause is None or session._flushing:  # Session.connection(), or a flush
        return WRITE
    if getattr(clause, "is_select", False):
        return LOCK if getattr(clause, "_for_update_arg", None) is not None else READ
    if isinstance(clause, TextClause):
        text = clause.text.lstrip().lower()
        if not text.startswith("select"):
            return WRITE
        return LOCK if " for " in text and _locks(text) else READ
    return WRITE


def _locks(text: str) -> bool:
    return any(
        lock in text
        for lock in (" for update", " for share", " for no key update", " for key share")
    )


def _log_route(clause: Any, target: str) -> None:
    if log.isEnabledFor(logging.DEBUG):
        statement = " ".join(str(clause).split())[:80] if clause is not None else "a flush"
        log.debug("%s -> %s", statement, target)


def _after_commit(session: Session) -> None:
    if (
        isinstance(session, RoutingSession)
        and session._sessionmw_wrote
        and session.get_nested_transaction() is None
    ):
        session._sessionmw_wrote = False
        request = session._sessionmw_request
        if request is not None:
            root(request).wrote = True


def _after_rollback(session: Session) -> None:
    if isinstance(session, RoutingSession):
        session._sessionmw_wrote = False


def routed_factory(
    factory: sessionmaker[Any] | async_sessionmaker[Any],
    replicas: Sequence[Engine] | Sequence[AsyncEngine],
    max_lag: float | None,
) -> Any:
    """A copy of ``factory`` whose Sessions route reads to ``replicas``."""
    engines: list[Any] = (
        [replicas] if isinstance(replicas, (Engine, AsyncEngine)) else list(replicas)
    )
    is_async = isinstance(factory, async_sessionmaker)
    wanted = AsyncEngine if is_async else Engine
    for engine in engines:
        if not isinstance(engine, wanted):
            kind = "async_sessionmaker" if is_async else "sessionmaker"
            make = "create_async_engine" if is_async else "create_engine"
            raise TypeError(
                f"replicas= of a {kind} takes engines made with {make}(), "
                f"not {type(engine).__name__}: the replicas are read the way the primary is."
            )
    if factory.kw.get("binds"):
        raise ValueError(
            "replicas= routes a factory with one primary bind, not one with binds=: "
            "give each database its own sessionmaker and request_scoped() registry."
        )
    sync_engines = [
        engine.sync_engine if isinstance(engine, AsyncEngine) else engine for engine in engines
    ]
    router = Router(sync_engines, max_lag)
    _listen()
    if isinstance(factory, async_sessionmaker):
        base = factory.kw.get("sync_session_class") or Session
        kw = dict(factory.kw, sync_session_class=_routed_class(base, router))
        return async_sessionmaker(class_=factory.class_, **kw)
    return sessionmaker(class_=_routed_class(factory.class_, router), **factory.kw)


def _routed_class(base: type[Session], router: Router) -> type[Session]:
    name = f"Routed{base.__name__}"
    if issubclass(base, RoutingSession):
        return type(name, (base,), {"_sessionmw_router": router})
    return type(name, (RoutingSession, base), {"_sessionmw_router": router})


def _listen() -> None:
    if not event.contains(RoutingSession, "after_commit", _after_commit):
        event.listen(RoutingSession, "after_commit", _after_commit, propagate=True)
        event.listen(RoutingSession, "after_rollback", _after_rollback, propagate=True)


class ReadYourWrites:
    """The marker that sends a client's reads to the primary after it wrote.

    The cookie holds only the time it ends (Unix milliseconds) and is honoured only
    while that lies within the window from now: a client can forge nothing but "read
    from the primary for a few more seconds", which costs it nothing it could not get
    by writing.  No secret is needed, so every process and server of the app agrees.
    """

    __slots__ = ("_attributes", "_prefix", "name", "seconds")

    def __init__(self, seconds: float, name: str) -> None:
        if not isinstance(seconds, (int, float)) or seconds < 0:
            raise ValueError(f"read_your_writes= takes seconds (0 turns it off), not {seconds!r}")
        if not name or any(c in name for c in ' ;,=\t\r\n"'):
            raise ValueError(f"read_your_writes_cookie= takes a cookie name, not {name!r}")
        self.seconds = float(seconds)
        self.name = name
        self._prefix = name + "="
        self._attributes = f"; Max-Age={max(1, round(seconds))}; Path=/; HttpOnly; SameSite=Lax"

    def sent_by(self, request: RequestScope) -> bool:
        """Whether the client sent a marker that is still running."""
        cookies = _cookie_header(request)
        if not cookies or self._prefix not in cookies:
            return False
        for part in cookies.split(";"):
            name, _, value = part.strip().partition("=")
            if name == self.name:
                try:
                    until = int(value)
                except ValueError:
                    return False
                now = time.time() * 1000
                return now < until <= now + (self.seconds + 1) * 1000
        return False

    def set_cookie(self, request: RequestScope) -> str:
        """The ``Set-Cookie`` value for a response to a request that committed a write."""
        until = int((time.time() + self.seconds) * 1000)
        secure = "; Secure" if _is_https(request) else ""
        return f"{self.name}={until}{self._attributes}{secure}"


def _cookie_header(request: RequestScope) -> str:
    raw = request.raw
    if request.kind == "wsgi":
        return str(raw.get("HTTP_COOKIE", ""))
    found = [value for key, value in raw.get("headers", ()) if key.lower() == b"cookie"]
    return "; ".join(value.decode("latin-1") for value in found)


def _is_https(request: RequestScope) -> bool:
    raw = request.raw
    scheme = raw.get("wsgi.url_scheme") if request.kind == "wsgi" else raw.get("scheme")
    return scheme in ("https", "wss")


def routes(session: Any) -> bool:
    """Whether a ``scoped_session`` or ``async_scoped_session`` routes to replicas."""
    factory = session.session_factory
    cls: type = factory.class_
    if isinstance(factory, async_sessionmaker):
        cls = factory.kw.get("sync_session_class") or Session
    return issubclass(cls, RoutingSession)


def marker_for(session: Any, seconds: float, cookie: str) -> ReadYourWrites | None:
    """The read-your-writes marker a middleware serving ``session`` gives its clients."""
    marker = ReadYourWrites(seconds, cookie)  # checks the arguments, replicas or not
    return marker if seconds and routes(session) else None
