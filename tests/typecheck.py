"""Run ``mypy --strict`` in process, the way a user of the package would run it.

The configuration is a user's: strict, nothing relaxed, except that Django, which ships no
type information, is read as untyped (what a project without django-stubs configures).
The cache lives in the repository's ``.mypy_cache`` (ignored by git), apart from the
package's own run, so a second run only re-checks what changed. Messages are matched to
files by name: mypy replays the cached messages of an unchanged module with the path it
had when cached, so files checked from a fresh temporary directory need unique names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mypy import api

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".mypy_cache" / "users"

CONFIG = """\
[mypy]
strict = True
python_version = 3.10

[mypy-django.*]
ignore_missing_imports = True
"""

MESSAGE = re.compile(r"^(?P<path>[^:\n]+):(?P<line>\d+): (?P<kind>error|note): (?P<text>.*)$")


@dataclass(frozen=True)
class Message:
    path: Path
    line: int
    kind: str
    text: str


@dataclass(frozen=True)
class Report:
    status: int
    messages: list[Message]
    output: str

    def errors(self) -> list[Message]:
        return [m for m in self.messages if m.kind == "error"]

    def revealed(self, name: str) -> dict[int, str]:
        """``reveal_type`` results in the file called ``name``, by line."""
        found = {}
        for m in self.messages:
            if m.path.name == name and m.text.startswith("Revealed type is "):
                found[m.line] = m.text.removeprefix("Revealed type is ").strip('"')
        return found


def mypy_strict(paths: Iterable[Path], workdir: Path) -> Report:
    """One mypy run over ``paths`` (files or package directories)."""
    config = workdir / "mypy.ini"
    config.write_text(CONFIG)
    stdout, stderr, status = api.run(
        [
            "--config-file",
            str(config),
            "--cache-dir",
            str(CACHE),
            "--show-absolute-path",
            "--no-error-summary",
            "--hide-error-context",
            "--no-pretty",
            *(str(p) for p in paths),
        ]
    )
    messages = []
    for line in stdout.splitlines():
        match = MESSAGE.match(line)
        if match:
            messages.append(
                Message(
                    Path(match["path"]).resolve(),
                    int(match["line"]),
                    match["kind"],
                    match["text"],
                )
            )
    return Report(status, messages, stdout + stderr)
