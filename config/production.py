"""Defaults for production: nothing is assumed; the environment names every service."""

database_url = ""
redis_url = ""
log_level = "INFO"
# A production deployment runs real sandboxes; the simulator runs no code.
backend = "docker"
