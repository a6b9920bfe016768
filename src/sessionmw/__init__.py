"""Request-scoped SQLAlchemy sessions for any WSGI or ASGI application."""

from ._version import __version__ as __version__
from .asgi import ASGISessionMiddleware
from .endpoint import ends_in_thread
from .oncommit import on_commit
from .registry import request_scoped
from .retry import is_transient
from .routing import use_primary
from .scope import (
    NoRequestScopeError,
    RequestScope,
    current_request,
    set_rollback,
)
from .unit import request_scope
from .wsgi import WSGISessionMiddleware
from .wsgi_app import wrap_wsgi_app

__all__ = [
    "ASGISessionMiddleware",
    "NoRequestScopeError",
    "RequestScope",
    "WSGISessionMiddleware",
    "current_request",
    "ends_in_thread",
    "is_transient",
    "on_commit",
    "request_scope",
    "request_scoped",
    "set_rollback",
    "use_primary",
    "wrap_wsgi_app",
]
