"""End a request's transactions in a ``def`` endpoint's own thread, not after it.

Under ASGI a ``def`` endpoint runs in a worker thread, and by default the middleware
commits or closes the request's Session after the endpoint has returned: the event loop
must first take the endpoint's result, then hand the round trip (COMMIT, or the ROLLBACK
that resets the connection) to another thread.  On a busy loop the connection stays
checked out through all of that, and with a pool that is the limit, every request waits
longer for one.  A hand-written endpoint ends its transaction before it returns.

:func:`ends_in_thread` does that for a ``def`` endpoint that returns a complete
response: the policy's decision is taken with the response's status, in the
endpoint's thread, and the Sessions are reset there; the middleware then only removes
them, with no hop.  Everything else stays with the middleware: a response that is
streamed, or has background tasks, may still use the Session after the endpoint
returns, and an endpoint that returns plain data (FastAPI) has no status yet.

Usage::

    from sessionmw import ends_in_thread

    @ends_in_thread
    def item(request: Request) -> Response:
        row = Session.get(Item, request.path_params["id"])
        return JSONResponse({"name": row.name})
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from .scope import _current

__all__ = ["ends_in_thread"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


def ends_in_thread(endpoint: Callable[_P, _R]) -> Callable[_P, _R]:
    """Settle and reset the request's sync Sessions before ``endpoint`` returns.

    With ``commit="on_success"`` the request commits if the returned response's status
    is below 400 (and :func:`sessionmw.set_rollback` was not called); ``"manual"`` rolls
    back what was not committed.  A commit that fails raises from the endpoint, so the
    client gets an error, never the success it returned.  Outside a request, when the
    endpoint raises (an exception handler may still answer with a success), or for a
    response that is streamed, has background tasks or is not a response at all, it does
    nothing and the middleware ends the request as usual.
    """
    if inspect.iscoroutinefunction(endpoint):
        raise TypeError(
            f"ends_in_thread() is for def endpoints, and {endpoint.__qualname__} is async: "
            "the middleware already ends an async endpoint's sessions without a thread hop. "
            "Remove the decorator."
        )

    @functools.wraps(endpoint)
    def ending(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        response = endpoint(*args, **kwargs)
        status = complete_status(response)
        if status is not None:
            request = _current.get()
            unit: Any = request.unit if request is not None else None
            if unit is not None:
                unit.end_in_thread(status)
        return response

    return ending


def complete_status(response: object) -> int | None:
    """The status of a response whose body is complete and that runs nothing after it
    is sent (Starlette's ``Response`` and its subclasses but the streamed ones), else
    ``None``."""
    status = getattr(response, "status_code", None)
    if (
        isinstance(status, int)
        and isinstance(getattr(response, "body", None), bytes)
        and getattr(response, "background", None) is None
    ):
        return status
    return None
