"""Work that must finish: shields against cancellation, and worker threads of our own.

A request that is cancelled (the client went away, the server is shutting down) must
still commit or close what it started and give its connection back, and blocking
database I/O must never run on the event-loop thread.  This module knows nothing of
sessions: it runs a callable to the end, on the loop or in a worker thread.

The worker threads are this module's own (under trio, anyio's behind a limiter of this
module's own), never behind anyio's shared 40-token limiter: there the cleanups of
finished requests would queue behind sync endpoints that wait for the very
connections those cleanups would give back, a deadlock once more than 40 + pool-size
requests are in flight.  Cleanups never wait for a connection, so threads of their
own always drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import importlib
import logging
import os
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from anyio.lowlevel import RunVar

__all__ = ["WORKER_THREADS", "run_in_worker", "run_shielded", "wait_out"]

log = logging.getLogger("sessionmw")

_T = TypeVar("_T")

#: Worker threads that may run cleanups (commit, rollback, close) at once.
WORKER_THREADS = 16

_limiter_var: RunVar[anyio.CapacityLimiter] = RunVar("sessionmw_worker_limiter")


def _anyio_task_states() -> Any:
    """anyio's record of the cancel scopes each asyncio task is in (private: ``None`` if
    it moved, and then every wait is shielded)."""
    try:
        module = importlib.import_module("anyio._backends._asyncio")
    except ImportError:  # pragma: no cover - asyncio is always there
        return None
    return getattr(module, "_task_states", None)


_task_states = _anyio_task_states()


def _limiter() -> anyio.CapacityLimiter:
    try:
        return _limiter_var.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(WORKER_THREADS)
        _limiter_var.set(limiter)
        return limiter


async def run_shielded(func: Callable[..., Coroutine[Any, Any, _T]], *args: Any) -> _T:
    """Run ``func(*args)`` to the end even if the caller is cancelled meanwhile.

    An anyio shielded scope holds off anyio's (and trio's) cancellation; without it an
    anyio scope cancelled around the caller would cancel the waiting task again on
    every turn of the loop.  It does not hold off a plain ``Task.cancel()`` under
    asyncio, so there the work runs in a task of its own that is awaited until done
    (:func:`wait_out`); the cancellation is re-raised afterwards.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not asyncio: the shielded scope is enough
        with anyio.CancelScope(shield=True):
            result = await func(*args)
        return result  # noqa: RET504 - the scope may swallow a cancellation: no return inside
    return await _wait_shielded(loop.create_task(func(*args)))


def _in_anyio_scope() -> bool:
    """Whether the current asyncio task is inside an anyio cancel scope (a task group, a
    timeout, Starlette's streaming responses): only such a scope, once cancelled, cancels
    the task again on every turn of the loop, which an anyio shield holds off.  Entering
    one costs more than the rest of a hop, so it is entered only then."""
    if _task_states is None:
        return True
    state = _task_states.get(asyncio.current_task())
    return state is not None and state.cancel_scope is not None


async def _wait_shielded(work: asyncio.Future[_T]) -> _T:
    """:func:`wait_out`, inside an anyio shield when an anyio scope could cancel us."""
    if not _in_anyio_scope():
        return await wait_out(work)
    with anyio.CancelScope(shield=True):
        result = await wait_out(work)
    return result  # noqa: RET504 - the scope may swallow a cancellation: no return inside


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
    end the wait while the thread still works on objects the caller will touch next; a
    call still queued for a thread runs all the same.  The call sees the caller's
    context variables.  Under asyncio one hop is one call queued for a thread of this
    module's executor and one callback on the loop: no task, no second future.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not asyncio: anyio's shield holds
        with anyio.CancelScope(shield=True):
            result = await anyio.to_thread.run_sync(func, *args, limiter=_limiter())
        return result  # noqa: RET504 - the scope may swallow a cancellation: no return inside
    finished: asyncio.Future[_T] = loop.create_future()
    # Handed over on the loop's next turn, not now: the callback that resumed the caller
    # may still hold the last reference to a result of the caller's last statement (the
    # future of a thread hop, say).  Freed once the thread has given the connection back
    # and another thread waits on it for a lock, a SQLite cursor blocks the whole process
    # on that connection's mutex, GIL held, until the busy timeout.
    loop.call_soon(_hand_over, _Call(loop, finished, func, args))
    return await _wait_shielded(finished)


class _Call:
    """One ``func(*args)`` for a worker thread, run in the caller's context and reported
    to the caller's loop."""

    __slots__ = ("args", "context", "finished", "func", "loop")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        finished: asyncio.Future[Any],
        func: Callable[..., Any],
        args: tuple[Any, ...],
    ) -> None:
        self.loop = loop
        self.finished = finished
        self.func = func
        self.args = args
        self.context = contextvars.copy_context()

    def run(self) -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            result = self.context.run(self.func, *self.args)
        except BaseException as exc:
            error = exc
        finally:  # nothing of the caller's outlives the call in this thread
            del self.func, self.args, self.context
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            self.loop.call_soon_threadsafe(_resolve, self.finished, result, error)


def _hand_over(call: _Call) -> None:
    try:
        _executor().submit(call.run)
    except BaseException as exc:  # no thread to run it (shutting down): the caller gets why
        _resolve(call.finished, None, exc)


_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="sessionmw worker")
    return _pool


def _forget_pool() -> None:
    global _pool
    _pool = None  # a forked child has none of its parent's threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _resolve(future: asyncio.Future[_T], result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(result)
    else:
        future.set_exception(exc)
