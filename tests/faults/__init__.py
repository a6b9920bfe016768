"""A fault-injection harness for the request lifecycle.

Each request *shape* (``shapes.py``) is first run once to record the steps it goes
through: the awaits the ASGI middleware makes on ``receive``, ``send`` and the app, the
WSGI calls, and every database round trip seen through SQLAlchemy's events
(``probe.py``).  Then it is replayed once per step and fault kind, the fault injected at
that step, and the lifecycle invariants are checked after every run (``harness.py``).
"""
