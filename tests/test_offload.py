"""The worker threads that run commits, rollbacks and closes off the event loop."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import weakref

import anyio

from sessionmw.offload import WORKER_THREADS, run_in_worker

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")


class Result:
    """Stands for a statement's result that still holds a cursor of the connection."""


def test_the_worker_starts_after_the_loop_let_go_of_what_it_held_for_the_caller() -> None:
    """A callback the loop runs before the caller's hop still holds a result of the
    caller's last statement.  On SQLite, such a cursor freed after the worker gave its
    connection to another thread, which waits there for a lock, blocked every thread of
    the process (the GIL held) until the busy timeout: 200 concurrent requests on
    uvicorn, 11 of them failed with "database is locked"."""
    worker_started = threading.Event()

    def holds_the_result(result: Result) -> None:
        worker_started.wait(0.5)  # a worker that already has the call starts meanwhile

    def result_was_let_go(gone: weakref.ref[Result]) -> bool:
        worker_started.set()
        return gone() is None

    async def main() -> bool:
        result = Result()
        gone = weakref.ref(result)
        asyncio.get_running_loop().call_soon(holds_the_result, result)
        del result
        return await run_in_worker(result_was_let_go, gone)

    assert asyncio.run(main())


def test_at_most_worker_threads_calls_run_at_once_and_all_of_them_run() -> None:
    lock = threading.Lock()
    running = 0
    peak = 0
    finished = 0
    full = threading.Event()

    def work() -> None:
        nonlocal running, peak, finished
        with lock:
            running += 1
            peak = max(peak, running)
            if running == WORKER_THREADS:
                full.set()
        full.wait(5)
        with lock:
            running -= 1
            finished += 1

    async def main() -> None:
        await asyncio.gather(*(run_in_worker(work) for _ in range(3 * WORKER_THREADS)))

    asyncio.run(main())
    assert peak == WORKER_THREADS
    assert finished == 3 * WORKER_THREADS


def test_the_call_sees_the_callers_context_and_leaves_it_unchanged() -> None:
    def swap() -> str:
        seen = request_id.get()
        request_id.set("changed in the worker")
        return seen

    async def main() -> tuple[str, str]:
        request_id.set("r1")
        seen = await run_in_worker(swap)
        return seen, request_id.get()

    assert asyncio.run(main()) == ("r1", "r1")


def test_a_failure_reaches_the_caller() -> None:
    def fail() -> None:
        raise LookupError("from the worker")

    async def main() -> str:
        try:
            await run_in_worker(fail)
        except LookupError as exc:
            return str(exc)
        return "no error"

    assert asyncio.run(main()) == "from the worker"


def test_under_trio_the_call_runs_in_another_thread() -> None:
    async def main() -> int:
        return await run_in_worker(threading.get_ident)

    assert anyio.run(main, backend="trio") != threading.get_ident()
