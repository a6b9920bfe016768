"""A TCP proxy on 127.0.0.1 that delays every chunk by D ms in each direction.

    python benchmarks/latency_proxy.py TARGET_PORT [--delay-ms 2] [--port 0]

It stands between the benchmark's servers and PostgreSQL, so that a database round trip
costs what it costs across a network: 2 ms each way is a round trip of 4 ms plus the work.
Each chunk is scheduled for (arrival + D) and written then, in arrival order: a delay, not a
throttle, so many chunks can be in flight at once and throughput is not capped by D.

Sub-millisecond delays need a timer finer than the event loop's: ``epoll_wait`` rounds
its timeout up to whole milliseconds, so ``loop.call_at(now + 0.0005)`` fires ~1 ms later
on an idle loop. On Linux the proxy therefore keeps its own deadlines in a ``timerfd``
(nanosecond resolution, watched by the loop like any socket); elsewhere it falls back to
``loop.call_at``. With D = 0 chunks are forwarded at once, through the same two sockets.

Runs in its own process, driven over stdin/stdout: it prints ``listening PORT``, then
answers one line per command: ``delay MS`` (change D for every connection, open or new;
in-flight chunks keep their time and never overtake earlier ones) and ``stats`` (a JSON
object: connections accepted and open, chunks forwarded, CPU seconds used). End of stdin
stops it, so it cannot outlive the benchmark that started it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ctypes.util
import heapq
import itertools
import json
import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

HOST = "127.0.0.1"

_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = 0o2000000
_TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class Deadlines:
    """Callbacks at absolute ``time.monotonic()`` times, with µs precision on Linux."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._order = itertools.count()
        self._armed: float | None = None
        self._fd = -1
        self._handle: asyncio.TimerHandle | None = None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fd = libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        except (OSError, AttributeError):
            fd = -1
        if fd >= 0:
            self._settime = libc.timerfd_settime
            self._fd = fd
            loop.add_reader(fd, self._expired)

    @property
    def precise(self) -> bool:
        return self._fd >= 0

    def at(self, when: float, callback: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._heap, (when, next(self._order), callback, args))
        if self._armed is None or when < self._armed:
            self._arm(when)

    def _arm(self, when: float) -> None:
        self._armed = when
        if self._fd < 0:
            if self._handle is not None:
                self._handle.cancel()
            # time.monotonic() is the default loop's clock: the deadline carries over
            self._handle = self._loop.call_at(when, self._expired)
            return
        sec = int(when)
        nsec = max(1, int((when - sec) * 1e9))  # an all-zero value would disarm the timer
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(sec, nsec))
        if self._settime(self._fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")

    def _expired(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(BlockingIOError):
                os.read(self._fd, 8)
        self._armed = None
        self._handle = None
        now = time.monotonic()
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, callback, args = heapq.heappop(heap)
            callback(*args)
        if heap:
            self._arm(heap[0][0])


class Stats:
    def __init__(self) -> None:
        self.accepted = 0
        self.open = 0
        self.chunks = 0


class Side(asyncio.Protocol):
    """One socket of a proxied connection; what it receives goes to ``peer`` D later."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.peer: Side | None = None
        self.transport: asyncio.Transport | None = None
        self.backlog: list[bytes | None] = []  # delivered before this side was connected
        self.last_due = 0.0  # of chunks *from* this side: keeps them in order
        self.ended = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        backlog, self.backlog = self.backlog, []
        for data in backlog:
            self.deliver(data)

    def data_received(self, data: bytes) -> None:
        self.proxy.forward(self, data)

    def eof_received(self) -> bool:
        self._end()
        return True  # keep our writing half open until the peer's EOF comes through

    def connection_lost(self, exc: Exception | None) -> None:
        self._end()

    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            self.proxy.forward(self, None)

    def deliver(self, data: bytes | None) -> None:
        """Write a chunk that was received by the peer (None: the peer's side ended)."""
        transport = self.transport
        if transport is None:
            self.backlog.append(data)
        elif data is None:
            transport.close()  # after what is buffered has been written
        elif not transport.is_closing():
            transport.write(data)

    # backpressure: a peer that cannot take more pauses our reading, not the whole proxy
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class ClientSide(Side):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.proxy.stats.accepted += 1
        self.proxy.stats.open += 1
        upstream = Side(self.proxy)
        upstream.peer, self.peer = self, upstream
        self.proxy.connect(upstream, self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.proxy.stats.open -= 1
        super().connection_lost(exc)


class Proxy:
    def __init__(self, target_port: int, delay_s: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.target_port = target_port
        self.delay = delay_s
        self.deadlines = Deadlines(self.loop)
        self.stats = Stats()
        self.tasks: set[asyncio.Task[None]] = set()

    def forward(self, source: Side, data: bytes | None) -> None:
        destination = source.peer
        if destination is None:
            return
        self.stats.chunks += data is not None
        if self.delay <= 0 and source.last_due <= time.monotonic():
            destination.deliver(data)
            return
        due = max(time.monotonic() + self.delay, source.last_due)
        source.last_due = due
        self.deadlines.at(due, destination.deliver, data)

    def connect(self, upstream: Side, client: Side) -> None:
        async def open_upstream() -> None:
            try:
                await self.loop.create_connection(lambda: upstream, HOST, self.target_port)
            except OSError:
                if client.transport is not None:
                    client.transport.abort()

        task = self.loop.create_task(open_upstream())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def command(self, line: str) -> str:
        words = line.split()
        if words[:1] == ["delay"] and len(words) == 2:
            self.delay = float(words[1]) / 1000
            return f"delay {float(words[1]):g}"
        if words == ["stats"]:
            return json.dumps(
                {
                    "accepted": self.stats.accepted,
                    "open": self.stats.open,
                    "chunks": self.stats.chunks,
                    "delay_ms": self.delay * 1000,
                    "cpu_s": time.process_time(),
                    "precise_timer": self.deadlines.precise,
                }
            )
        return f"error: unknown command {line.strip()!r}"


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(target_port: int, port: int, delay_ms: float) -> None:
    _raise_fd_limit()
    proxy = Proxy(target_port, delay_ms / 1000)
    loop = proxy.loop
    server = await loop.create_server(lambda: ClientSide(proxy), HOST, port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    print(f"listening {bound}", flush=True)
    stopped = loop.create_future()

    def reply(line: str) -> None:
        print(proxy.command(line), flush=True)

    def read_commands() -> None:  # a thread: stdin is a pipe from the benchmark
        for line in sys.stdin:
            loop.call_soon_threadsafe(reply, line)
        loop.call_soon_threadsafe(lambda: stopped.done() or stopped.set_result(None))

    threading.Thread(target=read_commands, daemon=True).start()
    async with server:
        await stopped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target_port", type=int, help="the port of the server on 127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="where to listen (0: any free)")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="each way")
    args = parser.parse_args()
    asyncio.run(serve(args.target_port, args.port, args.delay_ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
