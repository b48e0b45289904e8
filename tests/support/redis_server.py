"""A private redis-server on a free port: the one `sessionmgr dev` uses, shared with the tests."""

from sessionmgr.devstack import RedisServer, free_port

__all__ = ["RedisServer", "free_port"]
