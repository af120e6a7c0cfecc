"""The image-index cache: worker memory (LRU) in front of Redis, shared by every worker."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

import redis

from backend.queue import PREFIX, count
from worker.hybridgl.image_index import ImageIndex
from worker.hybridgl.images import image_hash

log = logging.getLogger(__name__)


class IndexCache:
    def __init__(self, pipeline, conn: redis.Redis | None, memory_items: int = 16, ttl: int = 7 * 24 * 3600):
        self.pipeline = pipeline
        self.conn = conn
        self.memory_items = memory_items
        self.ttl = ttl
        self._memory: OrderedDict[str, ImageIndex] = OrderedDict()
        self._lock = threading.Lock()

    def key(self, rgb) -> str:
        return self.pipeline.index_key(image_hash(rgb))

    def get(self, rgb) -> tuple[ImageIndex, str]:
        """The index of a decoded image and where it came from: memory, redis or built."""
        key = self.key(rgb)
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                self._count("memory")
                return self._memory[key], "memory"
        index = self._from_redis(key)
        source = "redis"
        if index is None:
            index = self.pipeline.index(rgb)
            source = "built"
            self._to_redis(key, index)
        self._remember(key, index)
        self._count(source)
        return index, source

    def _remember(self, key: str, index: ImageIndex) -> None:
        with self._lock:
            self._memory[key] = index
            self._memory.move_to_end(key)
            while len(self._memory) > self.memory_items:
                self._memory.popitem(last=False)

    def _from_redis(self, key: str) -> ImageIndex | None:
        if self.conn is None:
            return None
        data = self.conn.get(f"{PREFIX}:index:{key}")
        if data is None:
            return None
        try:
            return ImageIndex.from_bytes(data)
        except Exception as exc:  # noqa: BLE001 - a bad cache entry is rebuilt, not fatal
            log.warning("discarding unreadable cached index %s: %s", key[:16], exc)
            return None

    def _to_redis(self, key: str, index: ImageIndex) -> None:
        if self.conn is not None:
            self.conn.set(f"{PREFIX}:index:{key}", index.to_bytes(), ex=self.ttl)

    def _count(self, source: str) -> None:
        if self.conn is not None:
            count(self.conn, f"index_{source}")
