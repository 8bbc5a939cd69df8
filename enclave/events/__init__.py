"""Session events: numbered, stored, published, and relayed to SSE clients."""
