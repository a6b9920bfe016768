"""Every fault at every step of every request shape, through ASGISessionMiddleware.

Sync and async sessions; SQLite runs the whole space, PostgreSQL a seeded sample
(``SESSIONMW_FAULTS_FULL=1``: the whole space there too).  See ``tests/faults``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.harness import describe, explore
from tests.faults.shapes import ASGI_SHAPES, Shape
from tests.faults.world import World, database_urls

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("fault_mutant")]

CASES = [
    pytest.param(shape, kind, id=f"{shape.name}-{kind}")
    for shape in ASGI_SHAPES
    for kind in shape.session_kinds
]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
@pytest.mark.parametrize(("shape", "kind"), CASES)
async def test_every_fault_at_every_step(
    shape: Shape, kind: str, backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    urls = database_urls(request, backend, shape.databases, tmp_path)
    report = await explore(World(shape, "asgi", kind, urls), backend)
    print(describe(report))
    assert not report.violations, describe(report)
