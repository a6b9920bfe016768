"""What every benchmark shares: the table, the SQLite file, the in-process callers, statistics.

The callers are deliberately minimal and identical for every variant, so that a difference
between two rows is the difference between two ways of managing a session and nothing else:
no network, no HTTP parsing, one prebuilt ASGI scope or WSGI environ copied per request.
"""

from __future__ import annotations

import asyncio
import io
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from time import perf_counter
from typing import Any

from sqlalchemy import String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"

#: The two handlers every variant serves.
NO_DB = "/none"
ONE_QUERY = "/one"
ITEM_NAME = "item-1"

Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [dict[str, Any], Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "item"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


def make_database(directory: Path) -> Path:
    """A SQLite file with 100 rows: a real file, so every query goes through the OS."""
    path = directory / "bench.db"
    engine = create_engine(sync_url(path))
    Base.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        session.add_all(Item(id=i, name=f"item-{i}") for i in range(1, 101))
    engine.dispose()
    return path


def sync_url(path: Path) -> str:
    return f"sqlite:///{path}"


def async_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


# --- the in-process ASGI caller -------------------------------------------------------------

_REQUEST: Message = {"type": "http.request", "body": b"", "more_body": False}


async def receive() -> Message:
    return _REQUEST


async def send(message: Message) -> None:
    return None


def http_scope(path: str) -> dict[str, Any]:
    """A GET scope as uvicorn builds it; spec 2.4 so no response listens for a disconnect."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"bench"), (b"accept", b"*/*")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def asgi_batch(app: ASGIApp, path: str, requests: int, concurrency: int = 1) -> float:
    """Seconds for ``requests`` calls, one at a time or ``concurrency`` at a time (gather)."""
    base = http_scope(path)
    started = perf_counter()
    if concurrency == 1:
        for _ in range(requests):
            await app({**base, "state": {}}, receive, send)
    else:
        for _ in range(requests // concurrency):
            await asyncio.gather(
                *[app({**base, "state": {}}, receive, send) for _ in range(concurrency)]
            )
    return perf_counter() - started


async def asgi_check(app: ASGIApp, path: str, expected: bytes) -> None:
    """One request with a recording ``send``: refuse a variant that does not answer right."""
    sent: list[Message] = []

    async def record(message: Message) -> None:
        sent.append(message)

    await asyncio.wait_for(app({**http_scope(path), "state": {}}, receive, record), 10)
    status = next((m["status"] for m in sent if m["type"] == "http.response.start"), None)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    if status != 200 or body != expected:
        raise RuntimeError(f"{path} answered {status} {body[:80]!r}, expected 200 {expected!r}")


# --- the in-process WSGI caller -------------------------------------------------------------


def wsgi_environ(path: str) -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "bench",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": "bench",
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }


def _write(data: bytes) -> None:
    return None


def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
    return _write


def wsgi_batch(app: WSGIApp, path: str, requests: int) -> float:
    """Seconds for ``requests`` calls: call, iterate the body, close it, as a server does."""
    base = wsgi_environ(path)
    started = perf_counter()
    for _ in range(requests):
        body = app(base.copy(), start_response)
        for _chunk in body:
            pass
        close = getattr(body, "close", None)
        if close is not None:
            close()
    return perf_counter() - started


def wsgi_check(app: WSGIApp, path: str, expected: bytes) -> None:
    seen: list[str] = []

    def record(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        seen.append(status)
        return _write

    body = app(wsgi_environ(path), record)
    try:
        data = b"".join(body)
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    if not seen or not seen[0].startswith("200") or data != expected:
        raise RuntimeError(f"{path} answered {seen} {data[:80]!r}, expected 200 {expected!r}")


# --- statistics ---------------------------------------------------------------------------


@dataclass
class Samples:
    """Per-request µs of each repetition of one measurement."""

    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def spread(self) -> float:
        """Half the min-max range, relative to the median: ±x %."""
        if len(self.values) < 2:
            return 0.0
        return (max(self.values) - min(self.values)) / 2 / self.median * 100


def fmt_us(value: float) -> str:
    return f"{value:.1f}" if value < 1000 else f"{value:,.0f}"


# --- what ran where -----------------------------------------------------------------------

PACKAGES = (
    "sessionmw",
    "SQLAlchemy",
    "aiosqlite",
    "anyio",
    "starlette",
    "fastapi",
    "Flask",
    "Werkzeug",
    "uvicorn",
    "gunicorn",
    "FastAPI-SQLAlchemy",
    "fastapi-async-sqlalchemy",
    "advanced-alchemy",
    "Flask-SQLAlchemy",
)


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sessionmw_revision() -> str:
    """The checkout's commit, whether src/ had local changes, and where sessionmw came from."""
    import sessionmw

    source = Path(sessionmw.__file__).resolve().parent
    elsewhere = "" if source == ROOT / "src" / "sessionmw" else f" (imported from {source})"
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown" + elsewhere
    return head + (" + uncommitted changes in src/" if dirty else "") + elsewhere


def machine() -> dict[str, str]:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "os": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "load": f"{load:.2f}",
        "revision": sessionmw_revision(),
    }
