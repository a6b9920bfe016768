"""A small HTTP/1.1 load generator, run in its own process by servers.py:

    python benchmarks/loadgen.py PORT PATH CONNECTIONS SECONDS WARMUP_SECONDS

Keep-alive connections on 127.0.0.1 only, each sending one GET after another for a fixed
time; prints one JSON object: requests, errors, req/s and latency percentiles. Raw asyncio
streams rather than an HTTP client library, so the client spends as little of the shared
CPU as it can: it needs only a status line and a Content-Length.
"""

from __future__ import annotations

import asyncio
import json
import sys
from time import perf_counter

HOST = "127.0.0.1"


async def _one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> bool:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    ok = head.startswith(b"HTTP/1.1 200")
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
            break
    else:
        raise ValueError("response without Content-Length")
    await reader.readexactly(length)
    return ok


async def _connection(
    port: int, request: bytes, start: float, stop: float, latencies: list[float], errors: list[int]
) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        while True:
            began = perf_counter()
            if began >= stop:
                return
            try:
                ok = await _one(reader, writer, request)
            except (OSError, ValueError, asyncio.IncompleteReadError):
                errors.append(1)
                writer.close()
                reader, writer = await asyncio.open_connection(HOST, port)
                continue
            if began >= start:  # requests of the warm-up are not counted
                if ok:
                    latencies.append(perf_counter() - began)
                else:
                    errors.append(1)
    finally:
        writer.close()


async def run(
    port: int, path: str, connections: int, seconds: float, warmup: float
) -> dict[str, float]:
    request = f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode()
    now = perf_counter()
    start, stop = now + warmup, now + warmup + seconds
    latencies: list[float] = []
    errors: list[int] = []
    await asyncio.gather(
        *(_connection(port, request, start, stop, latencies, errors) for _ in range(connections))
    )
    latencies.sort()

    def pct(q: float) -> float:
        return (
            latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else 0.0
        )

    return {
        "requests": len(latencies),
        "errors": len(errors),
        "seconds": seconds,
        "rps": len(latencies) / seconds,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
    }


if __name__ == "__main__":
    port, path, conns, secs, warm = sys.argv[1:6]
    print(json.dumps(asyncio.run(run(int(port), path, int(conns), float(secs), float(warm)))))
