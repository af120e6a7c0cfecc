"""Prefetch: while a worker runs one job, the image of the job it will most likely take next is
downloaded and decoded in a background thread, so that the worker does not wait on the image host
between jobs (pre-labeling throughput with a slow or distant image host).

At most two images are held (the next job's, and the current job's until it takes it), so the
memory is bounded by two decoded images (3 bytes x IMAGE_MAX_PIXELS each at most). The fetch is the
job's own (the same access decision, policy and token for the same payload), run early; whatever goes
wrong in it is forgotten and the job fetches the image itself, so failures are reported by the job
exactly as without prefetch. An image prefetched
but not taken within ``MAX_AGE`` seconds is dropped (it may have changed since).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from backend import jobspec as js

log = logging.getLogger(__name__)
MAX_AGE = 300.0


def image_key(payload: dict) -> str | None:
    """What decides a job's image bytes: its reference and its project (whose Label Studio access the
    fetch uses). None for a job without an image."""
    image = payload.get("image")
    if not isinstance(image, str) or not image:
        return None
    return json.dumps([image, js.project_key(payload.get("project"))])


class Prefetcher:
    """``load(payload)`` returns a job's decoded image; it runs in this object's one thread.

    Holds at most ``slots`` images (fetched or on their way), the oldest dropped first: two, because the
    look-ahead for the next job starts as the current job begins, before that job has taken the image
    prefetched for it."""

    def __init__(self, load: Callable[[dict], Any], max_age: float = MAX_AGE, slots: int = 2):
        self._load = load
        self._max_age = max_age
        self._slots = slots
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._lock = threading.Lock()
        self._held: OrderedDict[str, tuple[Future, float]] = OrderedDict()  # key -> (fetch, when started)

    def start(self, payload: dict) -> None:
        """Begin fetching ``payload``'s image unless it is held already."""
        key = image_key(payload)
        if key is None:
            return
        with self._lock:
            held = self._held.get(key)
            if held is not None and time.monotonic() - held[1] < self._max_age:
                return  # fetched or on its way
            self._held.pop(key, None)
            while len(self._held) >= self._slots:
                _, (dropped, _) = self._held.popitem(last=False)
                dropped.cancel()  # not started yet: never runs; running: its result is dropped
            self._held[key] = (self._pool.submit(self._load, payload), time.monotonic())

    def take(self, payload: dict):
        """The prefetched image of ``payload`` (waiting for a fetch under way: cheaper than starting
        again), or None when there is none or it failed (then the job fetches it itself)."""
        key = image_key(payload)
        with self._lock:
            held = self._held.pop(key, None) if key is not None else None
        if held is None:
            return None
        future, started = held
        if time.monotonic() - started >= self._max_age:
            future.cancel()
            return None
        try:
            return future.result()
        except Exception as exc:  # noqa: BLE001 - the job fetches again and reports its own failure
            log.debug("prefetch of %s failed (%s): the job fetches it", key, type(exc).__name__)
            return None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
