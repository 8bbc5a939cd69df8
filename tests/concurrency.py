"""Run one function in several threads at once and collect what went wrong."""

from __future__ import annotations

import threading
from typing import Callable


def run_concurrently(work: Callable[[int], None], threads: int) -> list[BaseException]:
    """Call `work(n)` for n in range(threads), all at once; return their exceptions."""
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def run(n: int) -> None:
        start.wait()
        try:
            work(n)
        except Exception as exc:  # noqa: BLE001 - handed back to the test to assert on
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return errors
