"""Deliberately broken variants of the middleware, applied as monkeypatches.

Each one undoes one promise; the harness must catch every one of them:

- ``unshielded``: cleanup (settle, close, on_commit callbacks) is not shielded from
  cancellation, and a worker thread is abandoned when its caller is cancelled;
- ``late_commit``: ASGI forwards ``http.response.start`` first and commits after, so
  the client may get a 2xx for a commit that then fails;
- ``skip_removal``: WSGI skips removing the request's Sessions when the app's iterable
  fails to close;
- ``raise_failed_close``: a Session that fails to close raises to the server, after the
  response too.

Run one with ``SESSIONMW_FAULTS_MUTANT=<name> python -m pytest tests/test_faults_asgi.py
tests/test_faults_wsgi.py -k sqlite``: the runs that catch it are the violations listed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio.to_thread
import pytest

from sessionmw import asgi, unit, wsgi


async def _unshielded(func: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    return await func(*args)


async def _abandoned_on_cancel(func: Callable[..., Any], *args: Any) -> Any:
    return await anyio.to_thread.run_sync(func, *args, abandon_on_cancel=True)


def unshielded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(unit, "run_shielded", _unshielded)
    monkeypatch.setattr(unit, "run_in_worker", _abandoned_on_cancel)


def late_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    send = asgi._Responder.send

    async def forward_then_commit(self: Any, message: Any) -> None:
        work = self.unit
        if message["type"] == "http.response.start" and not work.status:
            work.status = message["status"]
            self.started = True
            await self._send(message)
            if work.holds_sessions():
                await work.settle()
            return
        await send(self, message)

    monkeypatch.setattr(asgi._Responder, "send", forward_then_commit)


def skip_removal(monkeypatch: pytest.MonkeyPatch) -> None:
    def close(self: Any) -> None:
        if self.closed:
            return
        self.closed = True
        body_close = getattr(self.body, "close", None)
        if body_close is not None and not isinstance(self.body, (list, tuple)):
            self.context.run(body_close)  # no finally: a close that raises skips the removal
        self.finish()

    monkeypatch.setattr(wsgi._Response, "close", close)


def raise_failed_close(monkeypatch: pytest.MonkeyPatch) -> None:
    discard_sync, discard_async = unit.discard_sync, unit.discard_async

    def always_raise_sync(proxy: Any, request: Any, reraise: bool = True) -> None:
        discard_sync(proxy, request)

    async def always_raise_async(proxy: Any, request: Any, reraise: bool = True) -> None:
        await discard_async(proxy, request)

    monkeypatch.setattr(unit, "discard_sync", always_raise_sync)
    monkeypatch.setattr(unit, "discard_async", always_raise_async)


MUTANTS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "unshielded": unshielded,
    "late_commit": late_commit,
    "skip_removal": skip_removal,
    "raise_failed_close": raise_failed_close,
}


def apply(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        mutate = MUTANTS[name]
    except KeyError:
        raise ValueError(f"no mutant named {name!r}; there are {sorted(MUTANTS)}") from None
    mutate(monkeypatch)
