"""Every fault at every step of every request shape, through WSGISessionMiddleware.

The harness is the WSGI server: it calls the app with its own ``start_response``,
iterates the body and closes it, and may fail ``start_response`` or ``write`` (the
client left) or close the iterable early.  SQLite runs the whole space, PostgreSQL a
seeded sample (``SESSIONMW_FAULTS_FULL=1``: the whole space).  See ``tests/faults``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.harness import describe, explore
from tests.faults.shapes import WSGI_SHAPES, Shape
from tests.faults.world import World, database_urls

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("fault_mutant")]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
@pytest.mark.parametrize("shape", WSGI_SHAPES, ids=lambda shape: shape.name)
async def test_every_fault_at_every_step(
    shape: Shape, backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    urls = database_urls(request, backend, shape.databases, tmp_path)
    report = await explore(World(shape, "wsgi", "sync", urls), backend)
    print(describe(report))
    assert not report.violations, describe(report)
