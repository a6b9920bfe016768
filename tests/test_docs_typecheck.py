"""Every Python block of README.md and docs/*.md, and both example apps, pass ``mypy --strict``.

Users build their apps from these blocks and check them with ``mypy --strict``; a block
that needs a ``cast`` or a ``# type: ignore`` there is a bug in the docs.

How blocks become modules:

- A page's blocks are joined, in order, into one module, as ``tests/test_docs.py`` runs
  them: a block may use what an earlier block of its page defined.
- ``<!-- typecheck: new module -->`` on the line before a block starts a new module with
  that block (the blocks after it continue it): for pages such as the README whose blocks
  each stand alone.
- A block fenced as ````` ```python title="name.py" ````` is the file it names: a module
  ``name`` of its own, which the page's other titled blocks may import (``from conftest
  import app``). It neither joins nor starts the page's running module. A file name is
  used by one page only (all pages are checked in one run).
- ``<!-- typecheck: skip (reason) -->`` on the line before a block leaves it out; the
  reason is required. Keep these rare.

All modules and the examples are checked in one mypy run (``tests/typecheck.py``: strict,
Django read as untyped); an error is reported at its page and line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from tests.typecheck import ROOT, mypy_strict

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLES = [ROOT / "examples" / "flask_app", ROOT / "examples" / "starlette_app"]

FENCE = re.compile(r'^```python(?:\s+.*?title="(?P<title>[^"]+)")?.*$')
MARKER = re.compile(r"^<!--\s*typecheck:\s*(?P<what>.*?)\s*-->\s*$")
SKIP = re.compile(r"^skip\s+\((?P<reason>.+)\)$")


@dataclass
class Module:
    """Blocks joined into one file; ``origin[n]`` is where line ``n + 1`` came from."""

    name: str
    lines: list[str] = field(default_factory=list)
    origin: list[str] = field(default_factory=list)


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence
    code: list[str]
    marker: str | None
    title: str | None


def blocks(page: Path) -> list[Block]:
    found = []
    lines = page.read_text().splitlines()
    n = 0
    while n < len(lines):
        fence = FENCE.match(lines[n])
        if fence:
            start = n
            n += 1
            while not lines[n].startswith("```"):
                n += 1
            previous = lines[start - 1] if start else ""
            marker = MARKER.match(previous)
            what = marker["what"] if marker else None
            found.append(Block(page, start + 1, lines[start + 1 : n], what, fence["title"]))
        n += 1
    return found


def modules(page: Path) -> tuple[list[Module], list[Block], list[tuple[Block, str]]]:
    """The page's modules, the blocks in them, and the blocks it skips with their reasons."""
    stem = re.sub(r"\W", "_", page.stem.lower())
    made: list[Module] = []
    checked = []
    skipped = []
    for block in blocks(page):
        where = f"{page.relative_to(ROOT)}:{block.line}"
        if block.marker is not None:
            skip = SKIP.match(block.marker)
            if skip:
                skipped.append((block, skip["reason"]))
                continue
            assert block.marker == "new module", f"{where}: unknown marker {block.marker!r}"
        if block.title is not None:
            name = block.title.removesuffix(".py")
            assert name.isidentifier(), f"{where}: title {block.title!r} is no module name"
            module = Module(name)
            made.append(module)
        else:
            running = [m for m in made if m.name.startswith("doc_")]
            if not running or block.marker == "new module":
                running.append(Module(f"doc_{stem}_{block.line}"))
                made.append(running[-1])
            module = running[-1]
        checked.append(block)
        if module.lines:
            module.lines += ["", ""]
            module.origin += [where, where]
        for offset, code in enumerate(block.code, 1):
            module.lines.append(code)
            module.origin.append(f"{page.relative_to(ROOT)}:{block.line + offset}")
    return made, checked, skipped


def test_every_python_block_and_example_passes_mypy_strict(tmp_path: Path) -> None:
    package = tmp_path / "docs_blocks"
    package.mkdir()
    origins: dict[str, list[str]] = {}  # by file name: see tests/typecheck.py
    checked: list[Block] = []
    skipped: list[tuple[Block, str]] = []
    for page in PAGES:
        made, page_checked, page_skipped = modules(page)
        checked += page_checked
        skipped += page_skipped
        for module in made:
            path = package / f"{module.name}.py"
            assert not path.exists(), f"{page.name}: a second {path.name} (see the docstring)"
            path.write_text("\n".join(module.lines) + "\n")
            origins[path.name] = module.origin

    assert len(checked) >= 30, "the pages lost their code blocks?"
    assert len(skipped) <= 2, [f"{b.page.name}:{b.line} ({r})" for b, r in skipped]
    report = mypy_strict([*package.iterdir(), *EXAMPLES], tmp_path)

    failures = []
    for message in report.errors():
        origin = origins.get(message.path.name)
        if origin is not None and message.path.parent.name == package.name:
            where = origin[message.line - 1]
        else:
            where = f"{message.path}:{message.line}"
        failures.append(f"{where}: {message.text}")
    assert not failures, "\n".join(failures)
    assert report.status == 0, report.output
