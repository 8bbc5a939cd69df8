"""Logging set-up shared by every process: one line per record, fields as key=value."""

from __future__ import annotations

import logging
import sys

from enclave.config import Settings

FORMAT = (
    "%(asctime)s level=%(levelname)s logger=%(name)s process=%(process)d %(message)s"
)


def configure_logging(settings: Settings) -> None:
    root = logging.getLogger()
    if getattr(root, "_enclave_configured", False):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # Client libraries log request URLs and headers at DEBUG; keep them quiet.
    for noisy in ("urllib3", "docker", "kubernetes", "peewee"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    root._enclave_configured = True  # type: ignore[attr-defined]
