"""Sessions: one run of code in a sandbox, from request to result."""
