"""Serve the Starlette example with uvicorn: ``python -m examples.starlette_app``."""

from __future__ import annotations

import os

import uvicorn

from . import create_app

if __name__ == "__main__":
    port = int(os.environ.get("PORT", "8000"))
    print(f"Serving the sessionmw Starlette example on http://127.0.0.1:{port}/notes")
    uvicorn.run(create_app(), host="127.0.0.1", port=port)
