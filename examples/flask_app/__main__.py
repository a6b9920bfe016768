"""Serve the Flask example: ``python -m examples.flask_app`` (set DATABASE_URL to change the DB)."""

from __future__ import annotations

import os

from . import create_app

if __name__ == "__main__":
    port = int(os.environ.get("PORT", "5000"))
    print(f"Serving the sessionmw Flask example on http://127.0.0.1:{port}/authors")
    create_app().run(host="127.0.0.1", port=port, threaded=True)
