"""One mixed scenario against every production server, each in a process of its own, on
PostgreSQL.

The apps (``tests/matrix_apps.py``) answer the same routes on every framework: reads,
writes, writes that end in a 404, a crash or a commit that fails on a deferred foreign key,
streamed bodies read in full and streams the client abandons after the first chunk; with a
sync ``scoped_session`` and, on the asyncio ASGI servers, the same routes under ``/a/`` with
an ``async_scoped_session`` over asyncpg. ``REQUESTS`` requests, ``CONCURRENCY`` at a time,
then:

- every answer has the status its route promises (and a full stream its whole body);
- the users in the database are exactly those a 2xx answer acknowledged, no note is kept;
- the server's registries and pools drain to 0 (``/_state``);
- PostgreSQL shows no connection of the app ``idle in transaction``.

A server whose package is not installed is skipped with the reason; gunicorn 26 removed its
eventlet worker, so eventlet is also served by its own ``eventlet.wsgi`` server.
``SESSIONMW_MATRIX_REQUESTS`` and ``SESSIONMW_MATRIX_CONCURRENCY`` set the size.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from pprint import pformat
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.pool import NullPool

from tests.matrix_apps import stream_body
from tests.models import Base, Note, User
from tests.servers import answering, free_port, wait_until

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
REQUESTS = int(os.environ.get("SESSIONMW_MATRIX_REQUESTS", "200"))
CONCURRENCY = int(os.environ.get("SESSIONMW_MATRIX_CONCURRENCY", "20"))
#: Per request, and for the whole load: a server that hangs fails the test, it does not stall it.
REQUEST_TIMEOUT = 20.0
LOAD_TIMEOUT = 120.0
#: Servers keep idle connections this long: longer than the load, so that no request is
#: sent on a connection the server is closing (gunicorn's default is 2 s).
KEEP_ALIVE = 75

EXPECTED = {
    "read": 200,
    "write": 201,
    "write404": 404,
    "crash": 500,
    "commitfail": 500,
    "stream": 200,
    "abandon": 200,
}
SYNC_MIX = ["read"] * 2 + ["write"] * 3 + ["write404", "crash", "commitfail", "stream", "abandon"]
ASYNC_MIX = [f"a/{kind}" for kind in SYNC_MIX]
#: Their handler raises, or their commit fails: a server may close the connection after
#: answering, so each goes on a connection of its own.
RAISING = {"crash", "commitfail"}


@dataclass
class Server:
    """How to start one server on a port, what it needs installed, what it serves."""

    command: Callable[[int], list[str]]
    requires: tuple[str, ...]
    async_routes: bool
    env: dict[str, str] = field(default_factory=dict)
    unavailable: Callable[[], str | None] = lambda: None


def _uvicorn(factory: str) -> Callable[[int], list[str]]:
    def command(port: int) -> list[str]:
        return [
            PY, "-m", "uvicorn", "--factory", f"tests.matrix_apps:{factory}",
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
            "--timeout-keep-alive", str(KEEP_ALIVE),
        ]  # fmt: skip

    return command


def _hypercorn(worker: str) -> Callable[[int], list[str]]:
    def command(port: int) -> list[str]:
        return [
            PY, "-m", "hypercorn", "-k", worker, "-w", "1", "-b", f"127.0.0.1:{port}",
            "--log-level", "WARNING", "--keep-alive", str(KEEP_ALIVE),
            "tests.matrix_apps:starlette_app()",
        ]  # fmt: skip

    return command


def _granian(interface: str, factory: str) -> Callable[[int], list[str]]:
    def command(port: int) -> list[str]:
        return [
            PY, "-m", "granian", "--interface", interface, "--host", "127.0.0.1",
            "--port", str(port), "--workers", "1", "--log-level", "warning",
            "--no-access-log", "--factory", f"tests.matrix_apps:{factory}",
        ]  # fmt: skip

    return command


def _gunicorn(worker: str, target: str, *options: str) -> Callable[[int], list[str]]:
    def command(port: int) -> list[str]:
        return [
            PY, "-m", "gunicorn", "-w", "1", "-k", worker, *options,
            "-b", f"127.0.0.1:{port}", "--log-level", "warning", "--graceful-timeout", "5",
            "--keep-alive", str(KEEP_ALIVE),
            f"tests.matrix_apps:{target}()",
        ]  # fmt: skip

    return command


def _eventlet(port: int) -> list[str]:
    return [
        PY,
        "-c",
        "import eventlet; eventlet.monkey_patch(); "
        f"import tests.matrix_apps as m; m.serve_eventlet({port})",
    ]


def _gunicorn_without_eventlet() -> str | None:
    from gunicorn.workers import SUPPORTED_WORKERS

    if "eventlet" in SUPPORTED_WORKERS:
        return None
    from gunicorn import __version__

    return (
        f"gunicorn {__version__} has no eventlet worker (removed in gunicorn 26.0); "
        "eventlet is covered by eventlet.wsgi-flask"
    )


SERVERS = {
    "uvicorn-starlette": Server(_uvicorn("starlette_app"), ("uvicorn", "starlette"), True),
    "hypercorn-asyncio-starlette": Server(_hypercorn("asyncio"), ("hypercorn", "starlette"), True),
    "hypercorn-trio-starlette": Server(
        _hypercorn("trio"), ("hypercorn", "trio", "starlette"), False, {"MATRIX_ASYNC": "0"}
    ),
    "granian-asgi-starlette": Server(
        _granian("asgi", "starlette_app"), ("granian", "starlette"), True
    ),
    # granian's WSGI sends the status line as soon as the app returns, before the body's
    # first chunk (PEP 3333 says not before it), so before the middleware has committed.
    "granian-wsgi-flask": Server(_granian("wsgi", "flask_app"), ("granian", "flask"), False),
    "gunicorn-sync-flask": Server(_gunicorn("sync", "flask_app"), ("gunicorn", "flask"), False),
    "gunicorn-gthread-flask": Server(
        _gunicorn("gthread", "flask_app", "--threads", str(CONCURRENCY)),
        ("gunicorn", "flask"),
        False,
    ),
    "gunicorn-gevent-flask": Server(
        _gunicorn("gevent", "flask_app", "--worker-connections", "100"),
        ("gunicorn", "gevent", "flask"),
        False,
    ),
    "gunicorn-eventlet-flask": Server(
        _gunicorn("eventlet", "flask_app", "--worker-connections", "100"),
        ("gunicorn", "eventlet", "flask"),
        False,
        unavailable=_gunicorn_without_eventlet,
    ),
    "eventlet.wsgi-flask": Server(_eventlet, ("eventlet", "flask"), False),
    "gunicorn-asgi-starlette": Server(
        _gunicorn("asgi", "starlette_app"), ("gunicorn", "starlette"), True
    ),
    "gunicorn-gthread-django": Server(
        _gunicorn("gthread", "django_wsgi", "--threads", str(CONCURRENCY)),
        ("gunicorn", "django"),
        False,
    ),
    "uvicorn-django": Server(_uvicorn("django_asgi"), ("uvicorn", "django"), True),
    "uvicorn-litestar": Server(_uvicorn("litestar_app"), ("uvicorn", "litestar"), True),
    # uvicorn starts the next request of a kept-alive connection from inside the previous
    # response's last send(), in the context that send() runs in: under WsgiToAsgi, one that
    # names the previous request's CurrentThreadExecutor, which has quit by then.
    "uvicorn-flask-wsgitoasgi": Server(
        _uvicorn("flask_asgi"), ("uvicorn", "flask", "asgiref"), False
    ),
}


@contextmanager
def serve(server: Server, url: str, app_name: str, log: Path) -> Iterator[str]:
    """Start ``server`` on a free port; yield its base URL once ``/_state`` answers."""
    port = free_port()
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "MATRIX_APP_NAME": app_name,
        "PYTHONPATH": pythonpath,
        **server.env,
    }
    with open(log, "wb") as output:
        process = subprocess.Popen(
            server.command(port), cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT
        )
    base = f"http://127.0.0.1:{port}"

    with answering(process, base, log) as url:
        yield url


def log_tail(log: Path, size: int = 4000) -> str:
    return log.read_text(errors="replace")[-size:] if log.exists() else ""


def log_errors(log: Path) -> dict[str, int]:
    """The exceptions in the server's log, each with how often it was logged."""
    if not log.exists():
        return {}
    found = Counter(
        re.sub(r"\d+", "N", line)[:160]  # one entry for crash-1, crash-2, ...
        for line in log.read_text(errors="replace").splitlines()
        if re.match(r"[\w.]+(Error|Exception|Exit|Interrupt): ", line)
    )
    return dict(found.most_common(10))


# --- the load -----------------------------------------------------------------------------


@dataclass
class Answer:
    kind: str  # "write", "a/stream", ...
    name: str
    status: int | str  # a string says what went wrong instead of a status

    @property
    def route(self) -> str:
        return self.kind.rsplit("/", 1)[-1]


async def one(client: httpx.AsyncClient, kind: str, n: int) -> Answer:
    name = f"{kind.replace('/', '-')}-{n}"
    route = kind.rsplit("/", 1)[-1]
    path = f"/{kind}" if route == "read" else f"/{kind}/{name}"
    method = "GET" if route in ("read", "stream", "abandon") else "POST"
    status: int | None = None
    try:
        async with AsyncExitStack() as stack:
            if route in RAISING:
                client = await stack.enter_async_context(
                    httpx.AsyncClient(
                        base_url=client.base_url,
                        timeout=REQUEST_TIMEOUT,
                        headers={"Connection": "close"},
                    )
                )
            response = await stack.enter_async_context(client.stream(method, path))
            status = response.status_code
            if route == "abandon":  # the client hangs up after the first chunk
                async for _ in response.aiter_raw():
                    break
                return Answer(kind, name, status)
            body = await response.aread()
    except httpx.HTTPError as exc:
        # Say what the client saw: a status line followed by a broken body is a status
        # the client was told.
        seen = f"{status}, then " if status is not None else ""
        return Answer(kind, name, f"{seen}{type(exc).__name__}: {exc}")
    if route == "stream" and body != stream_body():
        return Answer(kind, name, f"{status} with {len(body)} of the body's bytes")
    return Answer(kind, name, status)


async def run_load(base: str, mix: list[str]) -> list[Answer]:
    plan = [(n, random.Random(n).choice(mix)) for n in range(REQUESTS)]
    gate = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=base, timeout=REQUEST_TIMEOUT, limits=limits) as client:

        async def gated(n: int, kind: str) -> Answer:
            async with gate:
                return await one(client, kind, n)

        return await asyncio.wait_for(
            asyncio.gather(*(gated(n, kind) for n, kind in plan)), LOAD_TIMEOUT
        )


# --- the checks ---------------------------------------------------------------------------


def drained(base: str) -> dict[str, Any]:
    """The server's registries and pools, once all are 0 or after 20 s of waiting."""
    seen: dict[str, Any] = {}

    def empty() -> bool:
        try:
            seen.update(httpx.get(f"{base}/_state", timeout=5).json())
        except httpx.HTTPError as exc:
            seen["error"] = f"{type(exc).__name__}: {exc}"
            return False
        seen.pop("error", None)
        return not any(seen.values())

    with suppress(AssertionError):  # what is left is the answer
        wait_until(empty, timeout=20, what="the registries and pools to drain")
    return {key: value for key, value in seen.items() if value}


def idle_in_transaction(engine: Any, app_name: str) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "select state, count(*) from pg_stat_activity "
                "where application_name = :app and state like 'idle in transaction%' "
                "group by state"
            ),
            {"app": app_name},
        )
        return {state: int(count) for state, count in rows}


@pytest.mark.parametrize("server_name", list(SERVERS))
def test_mixed_load_on_a_production_server(server_name: str, pg_url: str, tmp_path: Path) -> None:
    server = SERVERS[server_name]
    missing = [name for name in server.requires if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed here (pip install -e '.[test]')")
    reason = server.unavailable()
    if reason:
        pytest.skip(reason)

    started = time.monotonic()
    app_name = f"sessionmw-matrix-{os.getpid()}"
    engine = create_engine(pg_url, poolclass=NullPool)
    Base.metadata.create_all(engine)
    mix = SYNC_MIX + (ASYNC_MIX if server.async_routes else [])
    log = tmp_path / "server.log"
    try:
        with serve(server, pg_url, app_name, log) as base:
            answers = asyncio.run(run_load(base, mix))
            state = drained(base)
            # While the server still holds its pool: a connection left in a transaction
            # would show here, and vanish once the process exits.
            idle = idle_in_transaction(engine, app_name)
        with engine.connect() as conn:
            kept = set(conn.scalars(select(User.name)))
            notes = conn.scalar(select(func.count()).select_from(Note))
    finally:
        engine.dispose()

    acknowledged = {a.name for a in answers if a.route != "read" and str(a.status)[0] == "2"}
    unexpected = Counter(
        f"{a.kind} -> {a.status}" for a in answers if a.status != EXPECTED[a.route]
    )
    observed = {
        "unexpected answers": dict(unexpected),
        "rows no 2xx acknowledged": sorted(kept - acknowledged),
        "2xx writes missing": sorted(acknowledged - kept),
        "notes kept": notes,
        "server state left after draining": state,
        "connections idle in transaction": idle,
    }
    seconds = time.monotonic() - started
    statuses = Counter(str(a.status) for a in answers)
    print(
        f"\nMATRIX | {server_name} | {len(answers)} requests, {CONCURRENCY} concurrent | "
        f"{dict(sorted(statuses.items()))} | {len(acknowledged)} rows | {seconds:.1f} s"
    )
    assert observed == {
        "unexpected answers": {},
        "rows no 2xx acknowledged": [],
        "2xx writes missing": [],
        "notes kept": 0,
        "server state left after draining": {},
        "connections idle in transaction": {},
    }, (
        f"{server_name}: {pformat(observed, width=100)}\n"
        f"exceptions in the server's log: {pformat(log_errors(log), width=100)}\n"
        f"the server's log ends with:\n{log_tail(log, 2500)}"
    )
    assert len(answers) == REQUESTS
    assert len(acknowledged) > 0
    kinds = Counter(a.route for a in answers)
    assert all(kinds[route] for route in EXPECTED), kinds
