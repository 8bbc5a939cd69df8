"""Defaults for production: nothing is assumed; the environment names every service."""

database_url = ""
redis_url = ""
log_level = "INFO"
