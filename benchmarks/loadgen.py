"""A small HTTP/1.1 load generator, run in its own process by servers.py and network.py:

    python benchmarks/loadgen.py PORT PATH CONNECTIONS SECONDS WARMUP_SECONDS
    python benchmarks/loadgen.py --mix PORT SECONDS WARMUP_SECONDS PATH=CONNECTIONS ...

Keep-alive connections on 127.0.0.1 only, each sending one GET after another for a fixed
time; prints one JSON object: requests, errors, req/s and latency percentiles. With
``--mix``, several routes are loaded at the same time, each by its own connections (say 50
on the database route and 5 on a route that never touches it), and the object has one
such entry per path. Raw asyncio streams rather than an HTTP client library, so the client
spends as little of the shared CPU as it can: it needs only a status line and a
Content-Length.
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
    writer: asyncio.StreamWriter | None = None
    try:
        while perf_counter() < stop:
            if writer is None:
                try:
                    reader, writer = await asyncio.open_connection(HOST, port)
                except OSError:
                    errors.append(1)
                    await asyncio.sleep(0.01)  # the server is gone: do not spin
                    continue
            began = perf_counter()
            try:
                ok = await _one(reader, writer, request)
            except (OSError, ValueError, asyncio.IncompleteReadError):
                errors.append(1)
                writer.close()
                writer = None
                continue
            if began >= start:  # requests of the warm-up are not counted
                if ok:
                    latencies.append(perf_counter() - began)
                else:
                    errors.append(1)
    finally:
        if writer is not None:
            writer.close()


def summary(latencies: list[float], errors: int, seconds: float) -> dict[str, float]:
    latencies.sort()

    def pct(q: float) -> float:
        return (
            latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else 0.0
        )

    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": seconds,
        "rps": len(latencies) / seconds,
        "mean_ms": sum(latencies) / len(latencies) * 1000 if latencies else 0.0,
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "p999_ms": pct(0.999),
        "max_ms": latencies[-1] * 1000 if latencies else 0.0,
    }


async def run_mix(
    port: int, routes: list[tuple[str, int]], seconds: float, warmup: float
) -> dict[str, dict[str, float]]:
    """Load every (path, connections) of ``routes`` at once; one summary per path."""
    now = perf_counter()
    start, stop = now + warmup, now + warmup + seconds
    found: dict[str, tuple[list[float], list[int]]] = {path: ([], []) for path, _ in routes}
    await asyncio.gather(
        *(
            _connection(
                port,
                f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode(),
                start,
                stop,
                *found[path],
            )
            for path, connections in routes
            for _ in range(connections)
        )
    )
    return {path: summary(lat, len(err), seconds) for path, (lat, err) in found.items()}


async def run(
    port: int, path: str, connections: int, seconds: float, warmup: float
) -> dict[str, float]:
    return (await run_mix(port, [(path, connections)], seconds, warmup))[path]


def main(argv: list[str]) -> None:
    if argv[0] == "--mix":
        port, secs, warm = argv[1:4]
        routes = [(p, int(n)) for p, n in (arg.rsplit("=", 1) for arg in argv[4:])]
        result: object = asyncio.run(run_mix(int(port), routes, float(secs), float(warm)))
    else:
        port, path, conns, secs, warm = argv[:5]
        result = asyncio.run(run(int(port), path, int(conns), float(secs), float(warm)))
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
