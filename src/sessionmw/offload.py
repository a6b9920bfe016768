"""Work that must finish: shields against cancellation, and worker threads of our own.

A request that is cancelled (the client went away, the server is shutting down) must
still commit or close what it started and give its connection back, and blocking
database I/O must never run on the event-loop thread.  This module knows nothing of
sessions: it runs a callable to the end, on the loop or in a worker thread.

The worker threads are a pool of this module's own, never anyio's shared 40-token
limiter: there the cleanups of finished requests would queue behind sync
endpoints that wait for the very connections those cleanups would give back, a
deadlock once more than 40 + pool-size requests are in flight.  Cleanups never wait
for a connection, so a limiter of their own always drains.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
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

    Under asyncio the work runs in a task of its own that is awaited until done
    (:func:`wait_out`), which holds off a plain ``Task.cancel()`` and anyio's cancel
    scopes alike (they cancel through ``Task.cancel()`` there); the cancellation is
    re-raised afterwards.  Elsewhere (trio) an anyio shielded scope does the same.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        with anyio.CancelScope(shield=True):
            result = await func(*args)
        return result  # noqa: RET504 - the scope may swallow a cancellation: no return inside
    return await wait_out(asyncio.ensure_future(func(*args)))


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
    The call sees the caller's context variables, as ``asyncio.to_thread`` gives them.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not asyncio: anyio's shield holds
        with anyio.CancelScope(shield=True):
            result = await anyio.to_thread.run_sync(func, *args, limiter=_limiter())
        return result  # noqa: RET504 - as in run_shielded
    context = contextvars.copy_context()
    return await wait_out(loop.run_in_executor(_executor(), context.run, func, *args))


_workers: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _workers
    if _workers is None:
        _workers = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="sessionmw")
    return _workers


def _forget_workers() -> None:
    """A forked child has none of its parent's threads: start a pool of its own."""
    global _workers
    _workers = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers)
