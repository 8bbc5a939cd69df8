"""Defaults for the test suite; the fixtures name the real servers to use."""

log_level = "DEBUG"
heartbeat_s = 0.5
lease_ttl_s = 3
reaper_interval_s = 1.0
sse_keepalive_s = 2.0
api_key_cache_s = 30
