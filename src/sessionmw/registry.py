"""``request_scoped()``: SQLAlchemy's own scoped registry, keyed by the current request.

With ``replicas=`` its sessions route reads to read replicas (:mod:`sessionmw.routing`);
without, the factory is used as given and nothing is added to a request's cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar, overload

from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, async_scoped_session, async_sessionmaker
from sqlalchemy.orm import scoped_session, sessionmaker

from .routing import routed_factory
from .scope import current_request, guard_registry

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session

__all__ = ["request_scoped"]

_S = TypeVar("_S", bound="Session")
_AS = TypeVar("_AS", bound="AsyncSession")


@overload
def request_scoped(
    factory: sessionmaker[_S],
    *,
    replicas: Sequence[Engine] = (),
    max_replica_lag: float | None = None,
) -> scoped_session[_S]: ...


@overload
def request_scoped(
    factory: async_sessionmaker[_AS],
    *,
    replicas: Sequence[AsyncEngine] = (),
    max_replica_lag: float | None = None,
) -> async_scoped_session[_AS]: ...


def request_scoped(
    factory: sessionmaker[_S] | async_sessionmaker[_AS],
    *,
    replicas: Sequence[Engine] | Sequence[AsyncEngine] = (),
    max_replica_lag: float | None = None,
) -> scoped_session[_S] | async_scoped_session[_AS]:
    """Return a registry keyed by the current request for ``factory``.

    A :class:`~sqlalchemy.orm.sessionmaker` gives a ``scoped_session``, an
    :class:`~sqlalchemy.ext.asyncio.async_sessionmaker` an ``async_scoped_session``;
    both are SQLAlchemy's own objects.

    :param replicas: engines of read replicas of the factory's database (async engines
        for an ``async_sessionmaker``): a safe-method request reads from one of them.
    :param max_replica_lag: seconds; a replica further behind is not read from.
    """
    if not isinstance(factory, (sessionmaker, async_sessionmaker)):
        raise TypeError(
            f"request_scoped() takes a sessionmaker or async_sessionmaker, not "
            f"{type(factory).__name__}; for example "
            f"request_scoped(sessionmaker(bind=engine))."
        )
    if replicas:
        factory = routed_factory(factory, replicas, max_replica_lag)
    elif max_replica_lag is not None:
        raise ValueError("max_replica_lag= applies to replicas=; give the replica engines too.")
    if isinstance(factory, async_sessionmaker):
        return guard_registry(async_scoped_session(factory, scopefunc=current_request))
    return guard_registry(scoped_session(factory, scopefunc=current_request))
