"""Use cases: what a caller can do with a session, independent of HTTP."""
