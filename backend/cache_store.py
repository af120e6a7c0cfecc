"""A byte-budgeted LRU of values in Redis (the shared image-index cache), and its statistics.

Light (redis only): workers store and read entries; the web process reads the statistics for
/health and /metrics and the room left for warm-ups.

Layout of a store named ``N`` (``index``, ``embedding``):
- ``hybridgl:cache:N:v:<member>``: the value, with a TTL that each use restarts (idle expiry); only
  values carry a TTL, so a Redis run with ``volatile-lru`` evicts values, never the bookkeeping;
- ``hybridgl:cache:N:lru``: sorted set, member -> last use (ms, Redis' clock);
- ``hybridgl:cache:N:sizes``: hash, member -> bytes accounted (``MEMORY USAGE`` of the value, so
  allocator rounding included, plus the bookkeeping's own share);
- ``hybridgl:cache:stats``: hash of every store's ``N:bytes``, ``N:entries``, ``N:budget``,
  ``N:hits``, ``N:misses``, ``N:evictions``, ``N:refused``: one HGETALL for /health.

Every write is one Lua script: it stores the value and evicts least recently used entries until the
store's total is within its budget, atomically, so concurrent workers never push it over. The total
is what Redis reports per key (``MEMORY USAGE``); Redis' ``used_memory`` adds its own overheads
(client buffers, the Lua VM, allocator slack: bench/bench_cache_scale.py measures them).
On the queue's Redis (``noeviction``) this accounting is the only bound. On a Redis of its own run
with ``maxmemory`` and ``volatile-lru`` (an LRU over the keys with a TTL: the values), Redis' LRU and
ours agree: both evict the least recently used value (each read touches the value key and its LRU
score), and a value Redis evicted or expired first is dropped from the accounting when next met (a
miss, or a write's pass over idle entries). ``allkeys-lru`` would work too, but could evict the
bookkeeping itself (Redis' LRU clock ticks once a second, so keys touched within the same second
look alike), after which the figures restart from zero while maxmemory alone bounds the values.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

PREFIX = "hybridgl:cache"
STATS_KEY = f"{PREFIX}:stats"
INDEX, EMBEDDING = "index", "embedding"
STORES = (INDEX, EMBEDDING)
# Bookkeeping as MEMORY USAGE measures it (Redis 7.0, 81-character members): per entry, its sorted-set and
# hash members take twice the member's length plus under 200 bytes; the three structures themselves, under 2 kB.
BOOKKEEPING_BYTES = 200
STRUCTURE_BYTES = 2048

# KEYS: value, lru, sizes, stats. ARGV: member, value, name, room for entries (the budget less the
# structures), ttl ms, value-key prefix, per-entry bookkeeping bytes, the budget (for the statistics).
# Returns {stored (0/1), entries evicted, bytes accounted}.
_PUT = """
local vkey, lru, sizes, stats = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local member, name, budget, ttl, vprefix = ARGV[1], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', stats, name .. ':budget', ARGV[8])
local function forget(m)
  local s = tonumber(redis.call('HGET', sizes, m) or '0')
  redis.call('ZREM', lru, m)
  redis.call('HDEL', sizes, m)
  redis.call('DEL', vprefix .. m)
  redis.call('HINCRBY', stats, name .. ':bytes', -s)
  redis.call('HINCRBY', stats, name .. ':entries', -1)
end
if redis.call('HEXISTS', sizes, member) == 1 then forget(member) end
-- entries idle longer than the TTL: their values have expired
for _, m in ipairs(redis.call('ZRANGEBYSCORE', lru, '-inf', now - ttl, 'LIMIT', 0, 1000)) do forget(m) end
redis.call('SET', vkey, ARGV[2], 'PX', ttl)
local size = redis.call('MEMORY', 'USAGE', vkey) + tonumber(ARGV[7]) + 2 * #member
if size > budget then
  redis.call('DEL', vkey)
  redis.call('HINCRBY', stats, name .. ':refused', 1)
  return {0, 0, size}
end
local evicted = 0
local total = tonumber(redis.call('HGET', stats, name .. ':bytes') or '0')
while total + size > budget do
  local oldest = redis.call('ZRANGE', lru, 0, 0)
  if #oldest == 0 then break end
  local s = tonumber(redis.call('HGET', sizes, oldest[1]) or '0')
  forget(oldest[1])
  total = total - s
  evicted = evicted + 1
end
redis.call('ZADD', lru, now, member)
redis.call('HSET', sizes, member, size)
redis.call('HINCRBY', stats, name .. ':bytes', size)
redis.call('HINCRBY', stats, name .. ':entries', 1)
redis.call('HINCRBY', stats, name .. ':evictions', evicted)
return {1, evicted, size}
"""

# KEYS: value, lru, sizes, stats. ARGV: member, name, ttl ms. Returns the value or nil.
_GET = """
local vkey, lru, sizes, stats = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local member, name, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local value = redis.call('GET', vkey)
if not value then
  local s = redis.call('HGET', sizes, member)
  if s then  -- expired or evicted by Redis itself: drop it from the accounting
    redis.call('ZREM', lru, member)
    redis.call('HDEL', sizes, member)
    redis.call('HINCRBY', stats, name .. ':bytes', -tonumber(s))
    redis.call('HINCRBY', stats, name .. ':entries', -1)
  end
  redis.call('HINCRBY', stats, name .. ':misses', 1)
  return false
end
local t = redis.call('TIME')
redis.call('ZADD', lru, 'XX', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), member)
redis.call('PEXPIRE', vkey, ttl)
redis.call('HINCRBY', stats, name .. ':hits', 1)
return value
"""


@dataclass(frozen=True)
class StoreStats:
    """One store's figures as /health and /metrics show them."""

    bytes: int = 0
    budget: int = 0
    entries: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    refused: int = 0

    @property
    def hit_rate(self) -> float | None:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else None

    @property
    def mean_entry_bytes(self) -> float | None:
        return self.bytes / self.entries if self.entries > 0 else None

    def to_dict(self) -> dict:
        rate = self.hit_rate
        return {"bytes": self.bytes, "budget": self.budget, "entries": self.entries, "hits": self.hits,
                "misses": self.misses, "hit_rate": None if rate is None else round(rate, 4),
                "evictions": self.evictions, "refused": self.refused}


def read_stats(conn: redis.Redis) -> dict[str, StoreStats]:
    """Every store's statistics in one command."""
    return parse_stats(conn.hgetall(STATS_KEY))


def parse_stats(fields: dict) -> dict[str, StoreStats]:
    values: dict[str, dict[str, int]] = {name: {} for name in STORES}
    for raw_key, raw_value in fields.items():
        name, _, figure = (raw_key.decode() if isinstance(raw_key, bytes) else raw_key).partition(":")
        if name in values and figure in StoreStats.__dataclass_fields__:
            try:
                values[name][figure] = int(float(raw_value))
            except ValueError:
                continue
    return {name: StoreStats(**figures) for name, figures in values.items()}


class RedisLRU:
    """One named store: values under a byte budget, least recently used evicted first."""

    def __init__(self, conn: redis.Redis, name: str, budget: int, ttl: int = 7 * 24 * 3600):
        if name not in STORES:
            raise ValueError(f"unknown cache store {name!r}; one of {', '.join(STORES)}")
        if ttl <= 0:
            raise ValueError(f"HYBRIDGL_INDEX_TTL={ttl}: give a positive number of seconds (cache values always "
                             "expire, so that a Redis with volatile-lru can evict them)")
        self.conn = conn
        self.name = name
        self.budget = int(budget)
        self.ttl_ms = int(ttl * 1000)
        self.value_prefix = f"{PREFIX}:{name}:v:"
        self.lru_key = f"{PREFIX}:{name}:lru"
        self.sizes_key = f"{PREFIX}:{name}:sizes"
        self._put = conn.register_script(_PUT)
        self._get = conn.register_script(_GET)

    def _keys(self, member: str) -> list[str]:
        return [self.value_prefix + member, self.lru_key, self.sizes_key, STATS_KEY]

    def get(self, member: str) -> bytes | None:
        """The value, marked as just used; None when absent (counted as a miss)."""
        return self._get(keys=self._keys(member), args=[member, self.name, self.ttl_ms])

    def put(self, member: str, value: bytes) -> bool:
        """Store a value, evicting least recently used entries to stay within the budget. False when the
        value alone is larger than the budget (not stored, counted as refused)."""
        stored, _evicted, _size = self._put(keys=self._keys(member), args=[
            member, value, self.name, self.budget - STRUCTURE_BYTES, self.ttl_ms, self.value_prefix,
            BOOKKEEPING_BYTES, self.budget])
        return bool(stored)

    def stats(self) -> StoreStats:
        return read_stats(self.conn)[self.name]

    def full_of_recent(self, recent_seconds: float) -> bool:
        """Whether one more entry (of the mean size) would evict an entry used within ``recent_seconds``."""
        with self.conn.pipeline(transaction=False) as pipe:
            pipe.hmget(STATS_KEY, f"{self.name}:bytes", f"{self.name}:entries")
            pipe.zrange(self.lru_key, 0, 0, withscores=True)
            pipe.time()
            (used, entries), oldest, (seconds, micros) = pipe.execute()
        used, entries = int(used or 0), int(entries or 0)
        if entries <= 0 or not oldest or used + used / entries <= self.budget - STRUCTURE_BYTES:
            return False
        return seconds * 1000 + micros // 1000 - oldest[0][1] < recent_seconds * 1000
