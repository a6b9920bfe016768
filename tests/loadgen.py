"""A load generator for the load tests, run in its own process:

    python -m tests.loadgen BASE_URL flask|starlette REQUESTS CONCURRENCY OUT.json

Writes one ``[kind, status, name]`` per request (status ``null`` for a client timeout).
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
from typing import Any

import httpx

MIXES: dict[str, list[str]] = {
    "flask": ["read"] * 4
    + ["write"] * 4
    + ["crash", "conflict", "commit_fail", "abandon", "timeout", "missing", "stream"],
    "starlette": ["read"] * 3
    + ["write"] * 4
    + [
        "crash",
        "conflict",
        "commit_fail",
        "commit_fail_sync",
        "abandon",
        "timeout",
        "missing",
        "background",
    ],
}


#: Requests whose handler raises. uvicorn closes the connection after an exception in the
#: app even when a 500 was sent, so a keep-alive request queued behind it would be cut off;
#: these go on a connection of their own.
RAISING = {"crash", "commit_fail", "commit_fail_sync"}


async def one(client: httpx.AsyncClient, app: str, n: int, kind: str) -> list[Any]:
    name = f"{kind}-{n}"
    flask = app == "flask"
    if kind in RAISING:
        client = httpx.AsyncClient(base_url=str(client.base_url), headers={"Connection": "close"})
    try:
        if kind == "read":
            r = await client.get("/authors/1" if flask else "/notes/1")
        elif kind == "write":
            r = await (
                client.post("/authors", json={"name": name})
                if flask
                else client.post("/notes", json={"title": name})
            )
        elif kind == "conflict":
            r = await (
                client.post("/authors", json={"name": "dup"})
                if flask
                else client.post("/notes", json={"title": "dup"})
            )
        elif kind == "crash":
            r = await client.post("/authors/1/fail" if flask else "/fail")
        elif kind == "commit_fail":
            r = await client.post(f"/commit-fails/{name}")
        elif kind == "commit_fail_sync":
            r = await client.post(f"/commit-fails-sync/{name}")
        elif kind == "missing":
            r = await client.get("/authors/999999" if flask else "/notes/999999")
        elif kind == "background":
            r = await client.post("/notes/1/view")
        elif kind == "stream":
            r = await client.get("/books/stream")
        elif kind == "abandon":
            async with client.stream("GET", "/books/stream" if flask else "/notes/stream") as r:
                async for _ in r.aiter_bytes():
                    break
        elif kind == "timeout":
            r = await client.get("/slow", timeout=0.2)
        else:
            raise ValueError(kind)
    except httpx.TimeoutException:
        return [kind, None, name]
    except httpx.TransportError as exc:
        return [kind, f"{type(exc).__name__}: {exc}", name]
    finally:
        if kind in RAISING:
            await client.aclose()
    return [kind, r.status_code, name]


async def run(base: str, app: str, requests: int, concurrency: int) -> list[list[Any]]:
    mix = MIXES[app]
    plan = [(n, random.Random(n).choice(mix)) for n in range(requests)]
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:

        async def gated(n: int, kind: str) -> list[Any]:
            async with gate:
                return await one(client, app, n, kind)

        return await asyncio.gather(*(gated(n, kind) for n, kind in plan))


def main() -> None:
    base, app, requests, concurrency, out = sys.argv[1:6]
    results = asyncio.run(run(base, app, int(requests), int(concurrency)))
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
