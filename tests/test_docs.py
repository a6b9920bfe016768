"""Every Python block in docs/ runs: a page's blocks, in order, as one program.

Each page runs in a subprocess of its own, in a temporary directory (the examples write
their SQLite files there), so the docs cannot drift from the code.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
PAGES = sorted(p for p in DOCS.glob("*.md") if BLOCK.search(p.read_text()))


def test_the_pages_have_code() -> None:
    assert len(PAGES) >= 8


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_page_runs(page: Path, tmp_path: Path) -> None:
    program = "\n\n".join(BLOCK.findall(page.read_text()))
    script = tmp_path / f"docs_{page.stem}.py"  # not "flask.py": it would shadow Flask
    script.write_text(program)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-W", "error::ResourceWarning", str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"{page.name}:\n{result.stdout}\n{result.stderr}"
