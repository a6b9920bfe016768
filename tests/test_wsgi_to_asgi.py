"""A WSGI Flask app behind asgiref's WsgiToAsgi, behind the ASGI middleware."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from asgiref.wsgi import WsgiToAsgi
from flask import Flask, jsonify
from sqlalchemy import Engine

import sessionmw
from tests.conftest import Tracker, assert_clean, user_names
from tests.models import User

pytestmark = pytest.mark.anyio


async def test_flask_through_wsgi_to_asgi_keeps_one_session_per_request(
    Session: Any, engine: Engine, tracker: Tracker
) -> None:
    flask_app = Flask(__name__)
    seen: list[Any] = []

    @flask_app.post("/users/<name>")
    def create(name: str) -> Any:
        session = Session()
        Session.add(User(name=name))
        Session.flush()
        seen.append((sessionmw.current_request(), session, Session()))
        if name == "bad":
            return jsonify(error="no"), 422
        return jsonify(name=name), 201

    app = sessionmw.ASGISessionMiddleware(
        WsgiToAsgi(flask_app), session=Session, commit="on_success"
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        statuses = [(await client.post(f"/users/{n}")).status_code for n in ("a", "b", "bad")]
    assert statuses == [201, 201, 422]
    assert user_names(engine) == {"a", "b"}
    assert all(first is again for _, first, again in seen)
    assert len({id(token) for token, _, _ in seen}) == len({id(s) for _, s, _ in seen}) == 3
    assert all(token.kind == "http" for token, _, _ in seen)
    assert_clean(Session, engine, tracker)
