"""Threads a cancelled request left behind, still inside its Session.

Under asyncio a plain ``Task.cancel()`` ends the *wait* of ``anyio.to_thread.run_sync``
(how Starlette and FastAPI run a ``def`` endpoint), not the thread: the endpoint goes
on with the request's Session while the middleware would close it.  A connection
closed under a running statement breaks: on SQLite the two calls racing crashed the
interpreter; with a pool, the connection could be handed to the next request while
the old thread still sends on it.

So after a cancellation the request's sync Sessions are closed only once no other
thread runs code that refers to them or to their connections: a frame of another
thread holding one means that thread is inside.  This looks at every thread's stack
(``sys._current_frames()``), about 0.2 ms a look with 60 threads, so it runs only
on that path, in a worker thread, and polls until the threads are out.

Usage::

    # in a worker thread, with the loop's thread id; then session.close()
    wait_until_unused(referents(session), besides=[loop_thread])
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

__all__ = ["LINGER_LIMIT", "referents", "wait_until_unused"]

log = logging.getLogger("sessionmw")

#: How long a cancelled request waits for another thread to leave its Session before it
#: closes the Session all the same (and says so at ERROR).
LINGER_LIMIT = 60.0


def referents(session: Any) -> list[object]:
    """The objects a thread inside ``session`` holds in its frames: the Session and the
    SQLAlchemy connections of its transaction."""
    found: list[object] = [session]
    transaction = session.get_transaction()
    for entry in getattr(transaction, "_connections", {}).values():
        found.append(entry[0])
    return found


def wait_until_unused(
    objects: Iterable[object], *, besides: Iterable[int] = (), limit: float | None = None
) -> bool:
    """Block until no other thread has a frame that refers to one of ``objects``;
    ``False`` if that took longer than ``limit`` seconds (default :data:`LINGER_LIMIT`;
    the caller goes on).

    ``besides``: threads not to look at, such as the event loop's, whose frames below the
    loop (the code that started it) may hold a Session without being inside it.
    """
    wanted = {id(o) for o in objects}
    skipped = {threading.get_ident(), *besides}
    if limit is None:
        limit = LINGER_LIMIT
    deadline = time.monotonic() + limit
    delay = 0.001
    while _inside(wanted, skipped):
        if time.monotonic() >= deadline:
            log.error(
                "a thread is still inside a Session of a cancelled request after %.0f s; "
                "closing it anyway",
                limit,
            )
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    return True


def _inside(wanted: set[int], skipped: set[int]) -> bool:
    for ident, frame in sys._current_frames().items():
        if ident in skipped:
            continue
        current: Any = frame
        while current is not None:
            for value in current.f_locals.values():
                if id(value) in wanted:
                    return True
            current = current.f_back
    return False
