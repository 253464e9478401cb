"""The store tests' fixtures: a real redis-server on loopback (tests/redis_server.py)."""

from tests.redis_server import redis_server, redis_server_session

__all__ = ["redis_server", "redis_server_session"]
