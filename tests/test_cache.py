"""The image-index cache keeps its byte budgets: in Redis under concurrent writers (threads and
processes), against Redis' own LRU eviction, and in a worker's memory; warm-ups yield to it.

Each test runs a Redis of its own (tests/services.py RedisServer), so that ``used_memory`` and the
keyspace are the cache's alone. Real indexes come from MobileSAM + the small test ViT.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
import redis
import torch
from fastapi.testclient import TestClient
from PIL import Image

from backend import cache_store
from backend.app import create_app
from backend.cache_store import INDEX, RedisLRU
from backend.config import ServeSettings
from worker import jobs
from worker.cache import IndexCache, MemoryLRU

from .services import DATA, REPO, RedisServer, serve_directory

PHOTOS = ["dog.jpg", "truck.jpg", "groceries.jpg"]


@pytest.fixture
def server(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    server.kill()


def _accounting(conn: redis.Redis, store: RedisLRU) -> dict:
    """What the store believes against what Redis holds."""
    sizes = {k.decode(): int(v) for k, v in conn.hgetall(store.sizes_key).items()}
    lru = {m.decode() for m in conn.zrange(store.lru_key, 0, -1)}
    values = {k.decode()[len(store.value_prefix):] for k in conn.scan_iter(store.value_prefix + "*", count=1000)}
    return {"sizes": sizes, "lru": lru, "values": values, "stats": store.stats()}


def _assert_consistent(conn: redis.Redis, store: RedisLRU) -> dict:
    a = _accounting(conn, store)
    assert set(a["sizes"]) == a["lru"] == a["values"], "every entry tracked has its value, and no value is untracked"
    assert a["stats"].bytes == sum(a["sizes"].values()) <= store.budget - cache_store.STRUCTURE_BYTES
    assert a["stats"].entries == len(a["sizes"])
    return a


@pytest.fixture(scope="module")
def pipeline(tiny_settings):
    from worker.hybridgl.pipeline import HybridGL

    return HybridGL(tiny_settings)


@pytest.fixture(scope="module")
def photos(pipeline):
    """(rgb, index) of the test photos, made small: the indexes are real, the module quick."""
    out = []
    for name in PHOTOS:
        image = Image.open(DATA / name).convert("RGB")
        image.thumbnail((320, 320))
        rgb = np.asarray(image)
        out.append((rgb, pipeline.index(rgb)))
    return out


@pytest.fixture
def builds(pipeline, photos, monkeypatch):
    """The pipeline's builds of the test photos answered with the index it built for each in ``photos``
    (the same result, without a minute per build on this machine); returns the list of builds made."""
    from worker.hybridgl.images import image_hash

    known = {image_hash(rgb): index for rgb, index in photos}
    made: list[str] = []

    def index(rgb, *args, **kwargs):
        made.append(image_hash(rgb))
        return known[image_hash(rgb)]

    monkeypatch.setattr(pipeline, "index", index)
    return made


def test_real_indexes_stay_within_a_small_budget(server, pipeline, photos, builds):
    """Three real indexes in a budget that holds two: the least recently used is evicted, the cache's keys
    take no more than the budget (as Redis' MEMORY USAGE measures them), and a later lookup of the evicted
    one is a miss that rebuilds it."""
    conn = redis.Redis.from_url(server.url)
    probe = IndexCache(pipeline, conn)
    sizes = []
    for rgb, index in photos:  # what the store will account for each: Redis' MEMORY USAGE + bookkeeping
        key = probe.key(rgb)
        conn.set(probe.indexes.value_prefix + key, index.to_bytes())
        sizes.append(conn.memory_usage(probe.indexes.value_prefix + key) + cache_store.BOOKKEEPING_BYTES + 2 * len(key))
        conn.delete(probe.indexes.value_prefix + key)
    # photo 0 and either other, not all three
    budget = max(sizes[0] + sizes[1], sizes[0] + sizes[2]) + cache_store.STRUCTURE_BYTES
    cache = IndexCache(pipeline, conn, memory_bytes=0, index_bytes=budget, embedding_bytes=budget)
    for rgb, index in photos[:2]:
        cache.indexes.put(cache.key(rgb), index.to_bytes())
    assert cache.get(photos[0][0])[1] == "redis"  # now the most recently used
    cache.indexes.put(cache.key(photos[2][0]), photos[2][1].to_bytes())
    a = _assert_consistent(conn, cache.indexes)
    assert a["values"] == {cache.key(photos[0][0]), cache.key(photos[2][0])}  # photo 1 was the least recent
    assert a["stats"].evictions == 1 and a["stats"].bytes <= budget - cache_store.STRUCTURE_BYTES
    # As Redis measures each key: the values and the bookkeeping.
    assert sum(conn.memory_usage(k) for k in conn.scan_iter(f"{cache_store.PREFIX}:*")) <= budget
    again, source = cache.get(photos[1][0])
    assert source == "built" and len(builds) == 1 and torch.equal(again.masks, photos[1][1].masks)
    _assert_consistent(conn, cache.indexes)
    stats = cache.indexes.stats()
    assert (stats.hits, stats.misses) == (1, 1)


def test_an_entry_larger_than_the_budget_is_refused(server):
    conn = redis.Redis.from_url(server.url)
    store = RedisLRU(conn, INDEX, budget=10_000)
    store.put("small", b"x" * 1000)
    assert not store.put("huge", b"x" * 20_000)
    assert store.get("huge") is None and store.get("small") == b"x" * 1000
    assert store.stats().refused == 1
    _assert_consistent(conn, store)


# Readers and writers of overlapping entries, as workers are; the processes import only the store.
HAMMER = """
import random, sys
import redis
from backend.cache_store import INDEX, RedisLRU
def hammer(url, budget, seed, rounds):
    store = RedisLRU(redis.Redis.from_url(url), INDEX, budget)
    rng = random.Random(seed)
    for _ in range(rounds):
        member = f"image-{rng.randrange(60)}"
        if rng.random() < 0.4:
            store.get(member)
        else:
            store.put(member, bytes([seed]) * rng.randrange(1_000, 40_000))
if __name__ == "__main__":
    hammer(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
"""


def _hammer(url: str, budget: int, seed: int, rounds: int) -> None:
    namespace: dict = {"__name__": "hammer"}
    exec(HAMMER, namespace)  # noqa: S102 - the same code the processes run
    namespace["hammer"](url, budget, seed, rounds)


def test_budget_holds_under_concurrent_threads_and_processes(server):
    """Four processes and four threads write and read overlapping entries; a watcher samples the total
    throughout. The total never passes the budget, and in the end the accounting matches Redis exactly."""
    conn = redis.Redis.from_url(server.url)
    budget = 300_000
    stop = threading.Event()
    samples: list[int] = []

    def watch() -> None:
        while not stop.is_set():
            samples.append(int(conn.hget(cache_store.STATS_KEY, f"{INDEX}:bytes") or 0))

    watcher = threading.Thread(target=watch)
    watcher.start()
    processes = [subprocess.Popen([sys.executable, "-c", HAMMER, server.url, str(budget), str(seed), "300"], cwd=REPO)
                 for seed in range(1, 5)]
    threads = [threading.Thread(target=_hammer, args=(server.url, budget, seed, 300)) for seed in range(5, 9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for process in processes:
        assert process.wait(300) == 0
    stop.set()
    watcher.join()
    store = RedisLRU(conn, INDEX, budget)
    a = _assert_consistent(conn, store)
    assert samples and max(samples) <= budget - cache_store.STRUCTURE_BYTES
    assert a["stats"].evictions > 0 and a["stats"].bytes > budget // 2  # it was full, and kept full
    # The accounting is what Redis reports for each value (allocator rounding included).
    for member, size in list(a["sizes"].items())[:10]:
        assert size >= conn.memory_usage(store.value_prefix + member)


def test_redis_lru_eviction_and_ours_agree(tmp_path):
    """On a cache Redis of its own (maxmemory + volatile-lru, as docker-compose.yml runs it) whose limit is
    below our budget, Redis evicts values first, never the bookkeeping; the next lookups drop what it
    evicted from our accounting, which then matches Redis again."""
    server = RedisServer(tmp_path)
    try:
        conn = redis.Redis.from_url(server.url)
        used = int(conn.info("memory")["used_memory"])
        conn.config_set("maxmemory", used + 1_500_000)
        conn.config_set("maxmemory-policy", "volatile-lru")
        store = RedisLRU(conn, INDEX, budget=10_000_000)
        members = [f"image-{i}" for i in range(40)]
        for member in members:
            store.put(member, b"v" * 100_000)
        assert store.stats().entries == 40  # our accounting did not evict: the budget is larger
        assert len(list(conn.scan_iter(store.value_prefix + "*"))) < 40  # Redis did
        found = [store.get(m) is not None for m in members]
        assert any(found) and not all(found)
        # Redis evicts before each command while over maxmemory (replies of values count too): a PING lets it
        # finish; then a lookup of each value it evicted drops that one from our accounting.
        conn.ping()
        for member in members:
            if not conn.exists(store.value_prefix + member):
                assert store.get(member) is None
        _assert_consistent(conn, store)
    finally:
        server.kill()


def test_memory_lru_counts_bytes(photos):
    sizes = [index.nbytes for _, index in photos]
    memory = MemoryLRU(budget=sizes[1] + sizes[2])
    for i, (_, index) in enumerate(photos):
        memory.put(str(i), index)
        assert memory.bytes <= memory.budget
    assert memory.get("0") is None and memory.get("1") is photos[1][1] and memory.get("2") is photos[2][1]
    memory.put("big", photos[0][1].without_embedding())
    assert memory.bytes <= memory.budget
    tiny = MemoryLRU(budget=1000)
    tiny.put("x", photos[0][1])
    assert len(tiny) == 0 and tiny.bytes == 0  # larger than the whole budget: not kept


def test_embedding_is_shared_only_for_interactive_configs(server, pipeline, photos, builds):
    conn = redis.Redis.from_url(server.url)
    cache = IndexCache(pipeline, conn, memory_bytes=0)
    rgb = photos[0][0]
    index, source = cache.get(rgb)
    assert source == "built" and index.sam_embedding is None
    assert conn.exists(cache.indexes.value_prefix + cache.key(rgb))
    assert not conn.exists(cache.embeddings.value_prefix + cache.key(rgb))
    # A click needs the embedding: not in Redis, so the index is built again, and kept for the next click.
    clicked, source = cache.get(rgb, need_embedding=True, keep_embedding=True)
    assert source == "built" and torch.equal(clicked.sam_embedding, photos[0][1].sam_embedding)
    again, source = cache.get(rgb, need_embedding=True, keep_embedding=True)
    assert source == "redis" and torch.equal(again.sam_embedding, photos[0][1].sam_embedding)
    assert torch.equal(again.masks, photos[0][1].masks) and len(builds) == 2


def test_out_of_memory_empties_the_memory_cache_and_retries_once(server, pipeline, photos, builds, monkeypatch):
    """A stand-in for the allocator: the first build raises MemoryError, as torch's CPU allocator does
    under HYBRIDGL_JOB_MEMORY (a real one, with a real worker, is tests/test_faults.py's). The retry runs
    with the memory cache emptied and succeeds; a second failure fails the job with the reason."""
    conn = redis.Redis.from_url(server.url)
    rt = jobs.Runtime(ServeSettings(redis_url=server.url), conn, pipeline, IndexCache(pipeline, conn))
    rt.cache.memory.put("held", photos[1][1])
    build, calls = pipeline.index, []

    def failing_once(rgb, *args, **kwargs):
        calls.append(len(rt.cache.memory))
        if len(calls) == 1:
            raise MemoryError()
        return build(rgb, *args, **kwargs)

    monkeypatch.setattr(pipeline, "index", failing_once)
    index, source = jobs._index(rt, photos[0][0], task_id=1)
    assert source == "built" and calls == [1, 0]  # the retry ran with the memory cache empty
    assert float(conn.hget("hybridgl:metrics", "index_oom_retries")) == 1

    def always(rgb, *args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(pipeline, "index", always)
    with pytest.raises(jobs.JobFailed, match="also with the worker's index cache emptied"):
        jobs._index(rt, photos[2][0], task_id=2)


def test_warm_up_is_skipped_when_the_cache_is_full_of_recent_entries(server, pipeline, photos, builds, tmp_path):
    Image.fromarray(photos[0][0]).save(tmp_path / "photo.png")  # lossless: the worker decodes the same pixels
    http, image_server = serve_directory(tmp_path)
    conn = redis.Redis.from_url(server.url)
    settings = ServeSettings(redis_url=server.url, image_allowed_hosts="127.0.0.1", image_allow_private=True)
    rt = jobs.Runtime.create(settings, pipeline)
    jobs.set_runtime(rt)
    try:
        for i in range(3):
            rt.cache.indexes.put(f"recent-{i}", b"x" * 100_000)
        # Full: room for less than one more entry.
        rt.cache.indexes.budget = rt.cache.indexes.stats().bytes + cache_store.STRUCTURE_BYTES + 10_000
        payload = {"task_id": 1, "image": f"{image_server}/photo.png"}
        assert jobs.warm(payload)["index"] == "skipped" and builds == []
        assert float(conn.hget("hybridgl:metrics", "warmups_skipped")) == 1
        seconds, _ = conn.time()  # recent-0's last use 2 hours ago (HYBRIDGL_WARMUP_PROTECT_SECONDS: 1 hour)
        conn.zadd(rt.cache.indexes.lru_key, {"recent-0": (seconds - 7200) * 1000})
        assert jobs.warm(payload)["index"] == "built"
        assert rt.cache.indexes.stats().evictions >= 1
    finally:
        jobs.set_runtime(None)
        http.shutdown()


def test_webhook_warms_no_more_than_the_cache_holds_and_health_shows_it(server):
    conn = redis.Redis.from_url(server.url)
    store = RedisLRU(conn, INDEX, budget=1_000_000)
    for i in range(2):
        store.put(f"image-{i}", b"x" * 200_000)  # entries of about 200 kB: the budget holds 4 or 5
    store.get("image-0")
    store.get("missing")
    app = create_app(ServeSettings(redis_url=server.url, index_cache_bytes=1_000_000, warmup_per_import=3))
    config = '<View><Image name="image" value="$image"/><BrushLabels name="m" toName="image"><Label value="A"/></BrushLabels></View>'
    tasks = [{"id": i, "data": {"image": f"http://127.0.0.1/{i}.jpg"}} for i in range(10)]
    with TestClient(app) as web:
        body = {"action": "TASKS_CREATED", "project": {"id": 1, "label_config": config}, "tasks": tasks}
        assert web.post("/webhook", json=body).json()["enqueued"] == 3  # HYBRIDGL_WARMUP_PER_IMPORT
        second = web.post("/webhook", json={**body, "tasks": [{"id": 11, "data": {"image": "http://h/11.jpg"}},
                                                              *tasks[:6]]}).json()
        capacity = (1_000_000 - cache_store.STRUCTURE_BYTES) // store.stats().mean_entry_bytes
        assert second["enqueued"] == capacity - 3 == 1  # the budget's room (4 entries), less the 3 waiting
        assert conn.llen("rq:queue:warmup") == 4
        health = web.get("/health").json()
        figures = health["cache"]["index"]
        assert figures["entries"] == 2 and figures["budget"] == 1_000_000 and 400_000 < figures["bytes"] < 1_000_000
        assert (figures["hits"], figures["misses"], figures["hit_rate"]) == (1, 1, 0.5)
        metrics = web.get("/metrics").text
        assert 'hybridgl_index_cache_entries{store="index"} 2' in metrics
        assert f'hybridgl_warmups_not_enqueued_total {7 + 7 - second["enqueued"]:g}' in metrics
