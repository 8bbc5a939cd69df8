"""Cooperative PostgreSQL I/O under gevent.

psycopg2 talks to the server from C, out of gevent's sight, so one slow query
would stall every request of a web process. A wait callback hands each wait
for the socket to gevent instead.
"""

from __future__ import annotations

import psycopg2
from psycopg2 import extensions


def _wait(conn, timeout=None):
    from gevent.socket import wait_read, wait_write

    while True:
        state = conn.poll()
        if state == extensions.POLL_OK:
            return
        if state == extensions.POLL_READ:
            wait_read(conn.fileno(), timeout=timeout)
        elif state == extensions.POLL_WRITE:
            wait_write(conn.fileno(), timeout=timeout)
        else:
            raise psycopg2.OperationalError(f"unexpected poll state {state}")


def make_psycopg2_cooperative() -> bool:
    """Install the callback when gevent has patched the process; True if it did."""
    try:
        from gevent import monkey
    except ImportError:
        return False
    if not monkey.is_module_patched("socket"):
        return False
    extensions.set_wait_callback(_wait)
    return True
