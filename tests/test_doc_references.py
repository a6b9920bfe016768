"""Every file the README, RELIABILITY.md and the docs point to is in the repository.

Relative links, snippet includes (``--8<--``), paths in code spans (``tests/test_docs.py``),
any ``*.md`` named in the text and the file of a section reference (``NAME §3``) must
resolve, so a reader never follows a reference to
a file that is not there; and no page states a test count, which goes stale with the
next test (the suite counts itself).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", ROOT / "RELIABILITY.md", *sorted(DOCS.glob("*.md"))]

LINK = re.compile(r"\]\(([^)\s]+)\)")
SNIPPET = re.compile(r'^--8<-- "([^":]+)', re.MULTILINE)
PATH_IN_CODE = re.compile(r"`(\.?[\w.-]+(?:/[\w.-]+)+/?)`")
MARKDOWN_FILE = re.compile(r"(?<![\w/.-])([\w/-]*\w\.md)\b")
SECTION_OF = re.compile(r"([\w./-]+) §")  # "DESIGN §3": a section of which file?
TEST_COUNT = re.compile(r"\b\d[\d,]* (?:tests|test cases)\b")
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)

#: Charts benchmarks/mkdocs_hooks.py adds to the site from benchmarks/results/.
GENERATED = {"benchmarks/results.png", "benchmarks/network.png"}


def resolves(page: Path, target: str) -> bool:
    return any((base / target).exists() for base in (page.parent, ROOT, DOCS))


def broken_references(page: Path) -> list[str]:
    text = page.read_text()
    prose = FENCE.sub("", text)  # code blocks name the reader's files (app.py), not ours
    broken = []
    for match in LINK.finditer(prose):
        target = match.group(1).split("#")[0]
        if not target or re.match(r"[a-z]+:", target):
            continue  # an anchor on the same page, or a URL
        if page.parent == DOCS and target in GENERATED:
            target = "benchmarks/results/" + target.rsplit("/", 1)[1]
            if (ROOT / target).exists():
                continue
        if not (page.parent / target).exists():
            broken.append(f"link {match.group(1)}")
    broken += [f"snippet {t}" for t in SNIPPET.findall(text) if not (ROOT / t).exists()]
    for path in PATH_IN_CODE.findall(prose):
        is_file_or_folder = "." in path.rsplit("/", 1)[-1] or path.endswith("/")
        if is_file_or_folder and not resolves(page, path):
            broken.append(f"path {path}")
    broken += [f"file {name}" for name in MARKDOWN_FILE.findall(prose) if not resolves(page, name)]
    for name in SECTION_OF.findall(prose):
        if not (resolves(page, name) or resolves(page, f"{name}.md")):
            broken.append(f"section of {name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_reference_resolves(page: Path) -> None:
    assert broken_references(page) == []


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_no_page_states_a_test_count(page: Path) -> None:
    assert TEST_COUNT.findall(page.read_text()) == []


def test_a_missing_file_is_reported(tmp_path: Path) -> None:
    page = tmp_path / "probe.md"
    page.write_text(
        "See [the design](DESIGN.md), `tests/test_nothing_here.py`, NOTES.md, DESIGN §3.\n"
        '--8<-- "benchmarks/results/gone.md:tables"\n'
    )
    assert broken_references(page) == [
        "link DESIGN.md",
        "snippet benchmarks/results/gone.md",
        "path tests/test_nothing_here.py",
        "file DESIGN.md",
        "file NOTES.md",
        "file benchmarks/results/gone.md",
        "section of DESIGN",
    ]
