"""Real servers on 127.0.0.1 for the end-to-end tests, started and stopped by the tests."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from werkzeug.serving import make_server


@contextmanager
def werkzeug_server(app: Any) -> Iterator[str]:
    """Werkzeug's threaded server (a thread per request), as ``flask run`` uses."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.shutdown()
        thread.join(10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Any, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``check`` until true: servers finish cleaning up just after the last byte is sent."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@contextmanager
def uvicorn_server(app: Any, on_stop: Any = None) -> Iterator[str]:
    """uvicorn on 127.0.0.1 in a thread with its own event loop; ``on_stop`` runs on that loop."""
    import asyncio

    import uvicorn

    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)

    async def serve() -> None:
        try:
            await server.serve()
        finally:
            if on_stop is not None:
                await on_stop()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    wait_until(lambda: server.started, what="uvicorn to start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@contextmanager
def answering(
    process: subprocess.Popen[Any], base: str, log: Path | None = None, timeout: float = 45
) -> Iterator[str]:
    """Wait until a server started as ``process`` answers ``/_state``; stop it afterwards."""

    def up() -> bool:
        if process.poll() is not None:
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            raise AssertionError(f"the server exited: {tail}")
        try:
            return httpx.get(f"{base}/_state", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(up, timeout=timeout, what="the server to start")
        yield base
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
