"""A run's share of the server's connections, so a classroom can share one server.

(Placeholder: grants what is asked. The classroom design replaces the inside, not the call.)
"""
from __future__ import annotations

import contextlib


@contextlib.contextmanager
def share(s, connections: int):
    """Wait for this run's turn to open `connections` extra connections at once on the server;
    yields how many it may open (at most `connections`). Released on exit."""
    yield connections
