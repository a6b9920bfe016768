"""Put the middleware around a Flask app's ``wsgi_app``, in a spelling type checkers accept.

Flask's documented way to add WSGI middleware is ``app.wsgi_app = Middleware(app.wsgi_app)``,
but Flask declares ``wsgi_app`` as a method, so ``mypy --strict`` refuses the assignment
(``method-assign``). :func:`wrap_wsgi_app` does the same assignment and takes exactly the
middleware's arguments, checked by the type checker. The app stays a Flask object, so
``flask run``, ``app.test_client()`` and ``gunicorn module:app`` all go through the
middleware, which is not true of wrapping the app object itself
(``application = WSGISessionMiddleware(app, Session)``: ``flask run`` refuses it and
``app.test_client()`` bypasses it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Protocol, TypeVar

from .wsgi import WSGISessionMiddleware

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

__all__ = ["HasWSGIApp", "wrap_wsgi_app"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


class HasWSGIApp(Protocol):
    """An application object that serves WSGI through its ``wsgi_app`` (Flask's shape)."""

    @property
    def wsgi_app(self) -> WSGIApplication: ...


def _takes_the_arguments_of(
    middleware: Callable[Concatenate[WSGIApplication, _P], object],
) -> Callable[[Callable[..., _R]], Callable[Concatenate[HasWSGIApp, _P], _R]]:
    """Give the decorated ``wrap(app, *args, **kwargs)`` the middleware's own parameters
    after its first, for type checkers: a keyword the middleware gains is accepted, and
    checked, with no copy of the list here."""

    def typed(wrap: Callable[..., _R]) -> Callable[Concatenate[HasWSGIApp, _P], _R]:
        return wrap

    return typed


@_takes_the_arguments_of(WSGISessionMiddleware)
def wrap_wsgi_app(app: HasWSGIApp, /, *args: Any, **kwargs: Any) -> WSGISessionMiddleware:
    """Wrap ``app.wsgi_app`` in a :class:`WSGISessionMiddleware` and return the middleware.

    ``sessionmw.wrap_wsgi_app(app, Session, commit="on_success")`` does what
    ``app.wsgi_app = WSGISessionMiddleware(app.wsgi_app, Session, commit="on_success")``
    does, with the same arguments after ``app``, and passes ``mypy --strict``.
    """
    middleware = WSGISessionMiddleware(app.wsgi_app, *args, **kwargs)
    instance: Any = app  # the class declares a method; the instance takes the attribute
    instance.wsgi_app = middleware
    return middleware
