"""tether: connection lifecycle management for FastAPI."""
