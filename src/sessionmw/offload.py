"""Work that must finish: shields against cancellation, and worker threads of our own.

A request that is cancelled (the client went away, the server is shutting down) must
still commit or close what it started and give its connection back, and blocking
database I/O must never run on the event-loop thread.  This module knows nothing of
sessions: it runs a callable to the end, on the loop or in a worker thread.

The worker threads sit behind a limiter of this module's own, never anyio's shared
40-token one: there the cleanups of finished requests would queue behind sync
endpoints that wait for the very connections those cleanups would give back, a
deadlock once more than 40 + pool-size requests are in flight.  Cleanups never wait
for a connection, so a limiter of their own always drains.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from anyio.lowlevel import RunVar

__all__ = ["WORKER_THREADS", "run_in_worker", "run_shielded", "wait_out"]

log = logging.getLogger("sessionmw")

_T = TypeVar("_T")

#: Worker threads that may run cleanups (commit, rollback, close) at once, per event loop.
WORKER_THREADS = 16

_limiter_var: RunVar[anyio.CapacityLimiter] = RunVar("sessionmw_worker_limiter")


def _limiter() -> anyio.CapacityLimiter:
    try:
        return _limiter_var.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(WORKER_THREADS)
        _limiter_var.set(limiter)
        return limiter


async def run_shielded(func: Callable[..., Awaitable[_T]], *args: Any) -> _T:
    """Run ``func(*args)`` to the end even if the caller is cancelled meanwhile.

    An anyio shielded scope holds off anyio's (and trio's) cancellation; without it an
    anyio scope cancelled around the caller would cancel the waiting task again on
    every turn of the loop.  It does not hold off a plain ``Task.cancel()`` under
    asyncio, so there the work runs in a task of its own that is awaited until done
    (:func:`wait_out`); the cancellation is re-raised afterwards.
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

    Then the caller's first cancellation is re-raised (a failure of ``work`` that
    nobody can receive any more is logged), else ``work``'s outcome.
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


async def run_in_worker(func: Callable[..., _T], *args: Any) -> _T:
    """Run ``func(*args)`` in a worker thread and wait until that thread is done with it.

    Shielded: under asyncio the wait is on a future the thread itself resolves, so even
    a plain ``Task.cancel()`` of every task (as ``asyncio.run`` does at shutdown) cannot
    end the wait while the thread still works on objects the caller will touch next.
    The call sees the caller's context variables, as anyio's worker threads give them.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not asyncio: anyio's shield holds
        with anyio.CancelScope(shield=True):
            result = await anyio.to_thread.run_sync(func, *args, limiter=_limiter())
        return result  # noqa: RET504 - the scope may swallow a cancellation: no return inside
    finished: asyncio.Future[_T] = loop.create_future()
    started = threading.Event()

    def run_and_report() -> None:
        started.set()
        try:
            result = func(*args)
        except BaseException as exc:
            loop.call_soon_threadsafe(_resolve, finished, None, exc)
        else:
            loop.call_soon_threadsafe(_resolve, finished, result, None)

    with anyio.CancelScope(shield=True):
        runner = asyncio.ensure_future(anyio.to_thread.run_sync(run_and_report, limiter=_limiter()))

        def never_ran(task: asyncio.Future[None]) -> None:
            # Cancelled while still waiting for a worker thread: nothing will report.
            if task.cancelled() and not started.is_set() and not finished.done():
                finished.cancel()

        runner.add_done_callback(never_ran)
        try:
            result = await wait_out(finished)
        finally:
            await asyncio.gather(runner, return_exceptions=True)
    return result


def _resolve(future: asyncio.Future[_T], result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(result)
    else:
        future.set_exception(exc)
