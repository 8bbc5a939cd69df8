"""gunicorn settings for the `web` process; every value can come from the environment."""

import os

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"
worker_class = "gevent"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# Each SSE client holds a greenlet, not a thread: a worker serves many.
worker_connections = int(os.environ.get("ENCLAVE_WORKER_CONNECTIONS", "1000"))
timeout = int(os.environ.get("ENCLAVE_WEB_TIMEOUT", "60"))
graceful_timeout = 20
keepalive = 5
accesslog = os.environ.get("ENCLAVE_ACCESS_LOG", "-")
# The query string can hold a cursor but never a credential; still, log the path only.
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms'
errorlog = "-"
loglevel = os.environ.get("ENCLAVE_LOG_LEVEL", "info").lower()
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
