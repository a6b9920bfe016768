"""Load for ``tests.pooler_app``, run in its own process:

    python -m tests.pooler_loadgen BASE_URL REQUESTS CONCURRENCY OUT.json

A fixed mix (the same for a given REQUESTS) of reads, writes that commit and writes that
fail after adding a row.  Writes one ``[kind, status, key]`` per request: ``status`` is the
HTTP status, or the client error's text when no answer came.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
from typing import Any

import httpx

MIX = ["read"] * 3 + ["ok"] * 3 + ["reject", "crash", "commit_fail"]

#: uvicorn closes the connection after an exception in the app, even when a 500 was sent,
#: which would cut off a keep-alive request queued behind it: these get a connection each.
RAISING = {"crash", "commit_fail"}


async def one(client: httpx.AsyncClient, n: int, kind: str) -> list[Any]:
    key = f"{kind}-{n}"
    if kind in RAISING:
        client = httpx.AsyncClient(base_url=client.base_url, headers={"Connection": "close"})
    try:
        if kind == "read":
            response = await client.get("/entries")
        else:
            response = await client.post(f"/entries/{key}", params={"outcome": kind})
    except httpx.TransportError as exc:
        return [kind, f"{type(exc).__name__}: {exc}", key]
    finally:
        if kind in RAISING:
            await client.aclose()
    return [kind, response.status_code, key]


async def run(base: str, requests: int, concurrency: int) -> list[list[Any]]:
    plan = [(n, random.Random(n).choice(MIX)) for n in range(requests)]
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:

        async def gated(n: int, kind: str) -> list[Any]:
            async with gate:
                return await one(client, n, kind)

        return await asyncio.gather(*(gated(n, kind) for n, kind in plan))


def main() -> None:
    base, requests, concurrency, out = sys.argv[1:5]
    results = asyncio.run(run(base, int(requests), int(concurrency)))
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
