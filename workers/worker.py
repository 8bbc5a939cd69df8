"""Starts an RQ worker that launches sessions: `python -m workers.worker`.

Configured by the environment alone (see `enclave.config`). Each job runs in
a forked work horse; the database connection is opened inside the job, never
inherited across the fork.
"""

from __future__ import annotations

import logging

from rq import Worker

from workers.runtime import runtime

logger = logging.getLogger(__name__)


def main() -> None:
    rt = runtime()
    worker = Worker([rt.settings.queue_name], connection=rt.redis)
    logger.info(
        "worker up name=%s queue=%s backend=%s",
        worker.name,
        rt.settings.queue_name,
        rt.backend.name,
    )
    worker.work(with_scheduler=False, logging_level=rt.settings.log_level.upper())
    logger.info("worker down name=%s", worker.name)


if __name__ == "__main__":
    main()
