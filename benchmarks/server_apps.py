"""App factories for the real servers of servers.py: the same apps as part 1.

uvicorn: ``uvicorn --factory server_apps:starlette_app``; gunicorn:
``gunicorn 'server_apps:flask_app()'``. The variant and the SQLite file come from the
environment (``BENCH_VARIANT``, ``BENCH_DB``), since both servers import the app by name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import variants


def _build() -> Any:
    builder = getattr(variants, os.environ["BENCH_VARIANT"])
    return builder(Path(os.environ["BENCH_DB"])).app


def starlette_app() -> Any:
    return _build()


def flask_app() -> Any:
    return _build()
