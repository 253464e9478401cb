# -*- test-case-name: tests.store.test_redis_scripts -*-
"""The Redis store's Lua scripts, and the refusal statuses that every store shares.

Each write of a domain's data is one script, so the check (lock held with this token, fence
not older than the stored one) and the write happen atomically on the server. Expiry is
Redis's own (``PX`` on the lock key): no script compares clocks. A certificate's keys share
one hash slot (``{name}`` hash tag), so the scripts also run on Redis Cluster; the events
channel is passed as an argument (a channel is not a key).

Statuses returned by the fenced scripts: ``ok``, ``expired`` (no lock key: it expired or was
released), ``taken`` (another token holds it) and ``older`` (a newer fence wrote the data).
"""

from __future__ import annotations

import redis
from attrs import frozen
from redis.commands.core import Script

from trackingproxy.store.contract import Lock, LockLost

__all__ = [
    "EXPIRED",
    "OK",
    "OLDER",
    "TAKEN",
    "Scripts",
    "refusal",
]

OK = "ok"
EXPIRED = "expired"
TAKEN = "taken"
OLDER = "older"

# The fence below which a holder may not write: the largest fence stored with the data.
_FLOOR = """
local function fence_of(key)
  return tonumber(redis.call('HGET', key, 'fence') or '0') or 0
end
local function floor(cert, order)
  return math.max(fence_of(cert), fence_of(order))
end
local function check(lock, token, fence, cert, order)
  local held = redis.call('GET', lock)
  if not held then return 'expired' end
  if held ~= token then return 'taken' end
  if (tonumber(fence) or -1) < floor(cert, order) then return 'older' end
  return 'ok'
end
"""

# KEYS: lock, fence counter, cert, order. ARGV: token, ttl (ms).
# The new fence is above the counter and above every fence stored with the data, so a lost
# counter (a partial restore) never locks a name out.
ACQUIRE = _FLOOR + """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return false end
local fence = redis.call('INCR', KEYS[2])
local stored = floor(KEYS[3], KEYS[4])
if fence <= stored then
  fence = stored + 1
  redis.call('SET', KEYS[2], fence)
end
return fence
"""

# KEYS: lock. ARGV: token, ttl (ms).
REFRESH = """
local held = redis.call('GET', KEYS[1])
if not held then return 'expired' end
if held ~= ARGV[1] then return 'taken' end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 'ok'
"""

# KEYS: lock. ARGV: token.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: lock, cert, order, error. ARGV: token, fence, channel, name, field, value, ...
SAVE_CERT = _FLOOR + """
local status = check(KEYS[1], ARGV[1], ARGV[2], KEYS[2], KEYS[3])
if status ~= 'ok' then return status end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
redis.call('HSET', KEYS[2], 'fence', ARGV[2], 'updated', redis.call('TIME')[1],
           unpack(ARGV, 5))
redis.call('PUBLISH', ARGV[3], 'cert ' .. ARGV[4])
return 'ok'
"""

# KEYS: lock, cert, order. ARGV: token, fence, field, value, ...
SAVE_ORDER = _FLOOR + """
local status = check(KEYS[1], ARGV[1], ARGV[2], KEYS[2], KEYS[3])
if status ~= 'ok' then return status end
redis.call('DEL', KEYS[3])
redis.call('HSET', KEYS[3], 'fence', ARGV[2], unpack(ARGV, 3))
return 'ok'
"""

# KEYS: cert. ARGV: channel, name, field, value, ... Written with fence 0: any holder may
# replace a seeded certificate.
SEED = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'fence', 0, 'updated', redis.call('TIME')[1], unpack(ARGV, 3))
redis.call('PUBLISH', ARGV[1], 'cert ' .. ARGV[2])
return 1
"""

# KEYS: cert. ARGV: serial (hex), ARI window (JSON).
SAVE_ARI = """
if redis.call('HGET', KEYS[1], 'serial') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'ari', ARGV[2])
return 1
"""

# KEYS: the domain set. ARGV: 'add' or 'remove', name, channel. PUBLISHes only on a change.
DOMAINS = """
local changed
if ARGV[1] == 'add' then
  changed = redis.call('SADD', KEYS[1], ARGV[2])
else
  changed = redis.call('SREM', KEYS[1], ARGV[2])
end
if changed == 1 then redis.call('PUBLISH', ARGV[3], 'domains') end
return changed
"""


@frozen
class Scripts:
    """The scripts registered on one client (redis-py loads them again after NOSCRIPT)."""

    acquire: Script
    refresh: Script
    release: Script
    save_cert: Script
    save_order: Script
    seed: Script
    save_ari: Script
    domains: Script

    @classmethod
    def register(cls, client: redis.Redis) -> Scripts:
        return cls(
            acquire=client.register_script(ACQUIRE),
            refresh=client.register_script(REFRESH),
            release=client.register_script(RELEASE),
            save_cert=client.register_script(SAVE_CERT),
            save_order=client.register_script(SAVE_ORDER),
            seed=client.register_script(SEED),
            save_ari=client.register_script(SAVE_ARI),
            domains=client.register_script(DOMAINS),
        )


def refusal(status: str, lock: Lock) -> LockLost:
    """The LockLost for a refused write of ``lock.name``, saying why."""
    if status == EXPIRED:
        return LockLost(f"the lock on {lock.name} expired")
    if status == TAKEN:
        return LockLost(f"the lock on {lock.name} was taken over by another holder")
    if status == OLDER:
        return LockLost(
            f"the lock on {lock.name} has an older fence ({lock.fence}) than the data stored "
            "since: a newer holder wrote it"
        )
    return LockLost(f"the lock on {lock.name} was refused ({status})")
