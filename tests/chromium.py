"""Headless Chromium driven over the DevTools protocol, through a pipe: no library, no network.

``--remote-debugging-pipe`` makes Chromium read protocol commands from fd 3 and write
answers and events to fd 4, each one JSON message ended by a NUL byte. That is all the
docs-site test needs to load a page, wait for its scripts and read the DOM, closed shadow
roots included (where Material draws the Mermaid diagrams), with Debian's ``chromium``.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

Message = dict[str, Any]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """One headless Chromium and one page in it (a flattened session on one target)."""

    def __init__(self, executable: str) -> None:
        self._profile = tempfile.TemporaryDirectory(prefix="sessionmw-chromium-")
        # Chromium's stderr, shown when it stops answering; open as long as the browser is
        self._log = tempfile.TemporaryFile()  # noqa: SIM115
        to_chromium_r, self._to_chromium = os.pipe()
        self._from_chromium, from_chromium_w = os.pipe()
        command = [
            executable,
            "--headless",
            "--no-sandbox",  # root in CI
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            "--remote-debugging-pipe",
            f"--user-data-dir={self._profile.name}",
            "about:blank",
        ]
        # The protocol needs fds 3 (commands in) and 4 (messages out): bash puts them there
        # (dash cannot: it takes single-digit fds only).
        script = f'exec "$@" 3<&{to_chromium_r} 4>&{from_chromium_w}'
        self._process = subprocess.Popen(
            ["/bin/bash", "-c", script, "chromium", *command],
            pass_fds=(to_chromium_r, from_chromium_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        os.close(to_chromium_r)
        os.close(from_chromium_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[Message] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self._session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Network", "DOM"):
            self.page(f"{domain}.enable")

    def call(self, method: str, session: str | None = None, **params: Any) -> Message:
        """Send one command and return its result, keeping the events that come first."""
        self._next_id += 1
        message: Message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        try:
            os.write(self._to_chromium, json.dumps(message).encode() + b"\0")
        except BrokenPipeError:
            raise RuntimeError(f"Chromium has exited:\n{self.log_tail()}") from None
        while True:
            answer = self._read(timeout=30.0)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                result: Message = answer["result"]
                return result
            self.events.append(answer)

    def page(self, method: str, **params: Any) -> Message:
        return self.call(method, self._session, **params)

    def load(self, url: str, ready: str, timeout: float = 20.0) -> None:
        """Open ``url`` and wait until the JavaScript expression ``ready`` is true."""
        self.events.clear()
        self.page("Page.navigate", url=url)
        try:
            self.wait_for(lambda: bool(self.evaluate(ready)), timeout, f"{url}: {ready}")
        except TimeoutError as error:
            raise TimeoutError(f"{error}; page errors: {self.exceptions()}") from None

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"still not true after {timeout} s: {what}")
            time.sleep(0.1)

    def evaluate(self, expression: str) -> Any:
        result = self.page(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def dom(self) -> Message:
        """The whole document, shadow roots (closed ones too) included."""
        root: Message = self.page("DOM.getDocument", depth=-1, pierce=True)["root"]
        return root

    def requested_urls(self) -> list[str]:
        return [
            e["params"]["request"]["url"]
            for e in self.events
            if e.get("method") == "Network.requestWillBeSent"
        ]

    def exceptions(self) -> list[str]:
        return [
            e["params"]["exceptionDetails"].get("exception", {}).get("description", "")
            or e["params"]["exceptionDetails"].get("text", "")
            for e in self.events
            if e.get("method") == "Runtime.exceptionThrown"
        ]

    def screenshot(self, path: str) -> None:
        data = self.page("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as file:
            file.write(base64.b64decode(data))

    def log_tail(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-3000:]

    def _read(self, timeout: float) -> Message:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._process.poll() is not None:
                raise RuntimeError(f"Chromium stopped answering:\n{self.log_tail()}")
            if not select.select([self._from_chromium], [], [], remaining)[0]:
                continue
            chunk = os.read(self._from_chromium, 1 << 16)
            if not chunk:
                raise RuntimeError(f"Chromium closed its protocol pipe:\n{self.log_tail()}")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        message: Message = json.loads(raw)
        return message

    def close(self) -> None:
        with suppress(RuntimeError):
            self.call("Browser.close")
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        os.close(self._to_chromium)
        os.close(self._from_chromium)
        self._profile.cleanup()
        self._log.close()


@contextmanager
def open_browser(executable: str) -> Iterator[Browser]:
    browser = Browser(executable)
    try:
        yield browser
    finally:
        browser.close()


def walk(node: Message) -> Iterator[Message]:
    """Every node under ``node``, into shadow roots and frames, depth first."""
    yield node
    for key in ("children", "shadowRoots"):
        for child in node.get(key, ()):
            yield from walk(child)
    if "contentDocument" in node:
        yield from walk(node["contentDocument"])


def attributes(node: Message) -> dict[str, str]:
    flat = node.get("attributes", [])
    return dict(zip(flat[::2], flat[1::2], strict=True))
