"""Defaults for a laptop or a single box: SQLite and a local Redis."""

database_url = "sqlite:///var/enclave.db"
redis_url = "redis://127.0.0.1:6379/0"
log_level = "INFO"
