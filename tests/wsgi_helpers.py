"""Calling a WSGI app the way a server does, step by step."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from werkzeug.test import EnvironBuilder


class Server:
    """Records what the app told ``start_response``, like a server would."""

    def __init__(self, fail_start: bool = False) -> None:
        self.statuses: list[str] = []
        self.fail_start = fail_start

    def start_response(self, status: str, headers: list[Any], exc_info: Any = None) -> Any:
        if self.fail_start:
            raise ConnectionResetError("client went away before the headers")
        self.statuses.append(status)
        return lambda data: None

    def call(self, app: Any, path: str = "/", method: str = "GET", **kw: Any) -> Iterable[bytes]:
        environ = EnvironBuilder(path=path, method=method, **kw).get_environ()
        return app(environ, self.start_response)  # type: ignore[no-any-return]

    def get(self, app: Any, path: str = "/", method: str = "GET", **kw: Any) -> tuple[str, bytes]:
        """Call, read the whole body, close: one complete request."""
        body = self.call(app, path, method, **kw)
        try:
            data = b"".join(body)
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()
        return self.statuses[-1], data
