"""The image-index cache: a byte-budgeted LRU in the worker's memory in front of two shared,
byte-budgeted stores in Redis (``backend.cache_store``) that every worker reads.

- ``index`` store: what a new expression needs (masks cropped and packed, fp16 features);
- ``embedding`` store: SAM's image embedding, which only clicks need, written only for interactive
  configs (``keep_embedding``) and under a budget of its own.

The cache is an accelerator: when its Redis fails, lookups count as misses and writes are skipped
(logged), and jobs go on building indexes.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

import redis

from backend.cache_store import EMBEDDING, INDEX, RedisLRU
from backend.queue import count
from worker.hybridgl.image_index import ImageIndex
from worker.hybridgl.images import image_hash

log = logging.getLogger(__name__)


class MemoryLRU:
    """Indexes in this process, least recently used dropped first once their bytes pass ``budget``.
    An index larger than the whole budget is not kept."""

    def __init__(self, budget: int):
        self.budget = budget
        self.bytes = 0
        self._items: OrderedDict[str, ImageIndex] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> ImageIndex | None:
        with self._lock:
            index = self._items.get(key)
            if index is not None:
                self._items.move_to_end(key)
            return index

    def put(self, key: str, index: ImageIndex) -> None:
        size = index.nbytes
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes
            if size > self.budget:
                return
            while self._items and self.bytes + size > self.budget:
                _, dropped = self._items.popitem(last=False)
                self.bytes -= dropped.nbytes
            self._items[key] = index
            self.bytes += size

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)


class IndexCache:
    def __init__(self, pipeline, conn: redis.Redis | None, cache_conn: redis.Redis | None = None, *,
                 memory_bytes: int = 512 * 2**20, index_bytes: int = 2**30, embedding_bytes: int = 256 * 2**20,
                 ttl: int = 7 * 24 * 3600):
        """``conn`` is the queue's Redis (metrics), ``cache_conn`` the cache's (default: the same)."""
        self.pipeline = pipeline
        self.conn = conn
        cache_conn = cache_conn if cache_conn is not None else conn
        self.memory = MemoryLRU(memory_bytes)
        self.indexes = RedisLRU(cache_conn, INDEX, index_bytes, ttl) if cache_conn is not None else None
        self.embeddings = RedisLRU(cache_conn, EMBEDDING, embedding_bytes, ttl) if cache_conn is not None else None

    def key(self, rgb) -> str:
        return self.pipeline.index_key(image_hash(rgb))

    def get(self, rgb, need_embedding: bool = False, keep_embedding: bool = False) -> tuple[ImageIndex, str]:
        """The index of a decoded image and where it came from: memory, redis or built.

        ``need_embedding``: the caller refines with clicks, so the index must carry SAM's embedding.
        ``keep_embedding``: share the embedding through Redis too (interactive configs)."""
        key = self.key(rgb)
        index, source = self.memory.get(key), "memory"
        if index is None:
            index, source = self._shared(key, self.indexes, ImageIndex.from_bytes), "redis"
        if index is not None and need_embedding and index.sam_embedding is None:
            index = self._shared(key, self.embeddings, index.with_embedding)
        if index is None:
            index, source = self.pipeline.index(rgb), "built"
            self._store(self.indexes, key, index.to_bytes)
            if keep_embedding:
                self._store(self.embeddings, key, index.embedding_to_bytes)
        if not keep_embedding and not need_embedding and index.sam_embedding is not None:
            index = index.without_embedding()  # nothing here will click on it: hold the smaller index
        self.memory.put(key, index)
        self._count(source)
        return index, source

    def full_of_recent(self, recent_seconds: float) -> bool:
        """A new shared entry would evict one used within ``recent_seconds`` (a warm-up would hurt)."""
        if self.indexes is None:
            return False
        try:
            return self.indexes.full_of_recent(recent_seconds)
        except redis.RedisError as exc:
            log.warning("index cache unreachable (%s): warming anyway", exc)
            return False

    def _shared(self, key: str, store: RedisLRU | None, decode):
        if store is None:
            return None
        try:
            data = store.get(key)
        except redis.RedisError as exc:
            log.warning("index cache unreachable (%s): building the index", exc)
            return None
        if data is None:
            return None
        try:
            return decode(data)
        except Exception as exc:  # noqa: BLE001 - a bad cache entry is rebuilt, not fatal
            log.warning("discarding unreadable cached %s %s: %s", store.name, key[:16], exc)
            return None

    def _store(self, store: RedisLRU | None, key: str, encode) -> None:
        if store is None:
            return
        data = encode()
        if data is None:
            return
        try:
            if not store.put(key, data):
                log.warning("image %s's %s (%d bytes) is larger than its whole cache budget: not shared",
                            key[:16], store.name, len(data))
        except redis.RedisError as exc:
            log.warning("index cache unreachable (%s): the index is not shared", exc)

    def _count(self, source: str) -> None:
        if self.conn is not None:
            count(self.conn, f"index_{source}")
