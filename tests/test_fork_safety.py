"""An engine made before the fork (gunicorn --preload) must not share connections with workers.

The guard is one line, documented in the README:
``os.register_at_fork(after_in_child=lambda: engine.dispose(close=False))``.
"""

from __future__ import annotations

import os

from sqlalchemy import Engine, create_engine, text


def backend_pid_in_child(engine: Engine) -> int:
    """Fork; in the child, take a connection from the inherited pool and report its backend."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            with engine.connect() as conn:
                os.write(write, str(conn.scalar(text("select pg_backend_pid()"))).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        reported = pipe.read()
    os.waitpid(child, 0)
    return int(reported)


def pooled_backend_pid(engine: Engine) -> int:
    with engine.connect() as conn:  # returned to the pool, still open, on exit
        return int(conn.scalar(text("select pg_backend_pid()")))


def test_without_the_guard_a_forked_child_reuses_the_parents_connection(pg_url: str) -> None:
    engine = create_engine(pg_url)
    parent = pooled_backend_pid(engine)
    assert backend_pid_in_child(engine) == parent  # the hazard: one socket, two processes
    engine.dispose()


def test_with_the_guard_the_child_opens_its_own_and_the_parent_keeps_its_own(
    pg_url: str,
) -> None:
    engine = create_engine(pg_url)
    os.register_at_fork(after_in_child=lambda: engine.dispose(close=False))
    parent = pooled_backend_pid(engine)
    assert backend_pid_in_child(engine) != parent
    assert pooled_backend_pid(engine) == parent  # the parent's pooled connection still works
    engine.dispose()
