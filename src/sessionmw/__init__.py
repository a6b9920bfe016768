"""Request-scoped SQLAlchemy sessions for any WSGI or ASGI application."""

from .asgi import ASGISessionMiddleware
from .oncommit import on_commit
from .retry import is_transient
from .scope import (
    NoRequestScopeError,
    RequestScope,
    current_request,
    request_scoped,
    set_rollback,
)
from .unit import request_scope
from .wsgi import WSGISessionMiddleware

__all__ = [
    "ASGISessionMiddleware",
    "NoRequestScopeError",
    "RequestScope",
    "WSGISessionMiddleware",
    "current_request",
    "is_transient",
    "on_commit",
    "request_scope",
    "request_scoped",
    "set_rollback",
]
