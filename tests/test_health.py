"""/health stays cheap: a fixed handful of Redis commands, whatever the keyspace holds.

It used to SCAN for worker registrations, /setup records and problems: one round trip per 100 keys,
and a Redis holding thousands of job records (a 200-task batch among 10 annotators) made it take
over 100 ms on a loaded machine (bench/bench_load.py). Counted with the server's own statistics, on
a Redis of this test's own (nothing else talks to it).
"""

from __future__ import annotations

import redis
from fastapi.testclient import TestClient

from backend import queue as q
from backend.app import create_app
from backend.config import ServeSettings

from .services import RedisServer


def _commands(conn: redis.Redis) -> int:
    return int(conn.info("stats")["total_commands_processed"])


def test_health_reads_a_fixed_number_of_commands_whatever_the_keyspace(tmp_path):
    server = RedisServer(tmp_path)
    try:
        conn = redis.Redis.from_url(server.url)
        q.register_worker(conn, "w1", {"name": "w1", "model_version": "v1"}, heartbeat=60)
        q.report_problem(conn, "labelstudio", "workers cannot reach Label Studio", ttl=60)
        q.save_setup(conn, "3.1700000000", "http://ls:8080", "a-token", secret_key="")
        app = create_app(ServeSettings(redis_url=server.url))
        counts = []
        with TestClient(app) as web:
            web.get("/health")  # connects (redis-py's handshake commands are not /health's)
            for filler in (0, 30_000):
                with conn.pipeline(transaction=False) as pipe:
                    for k in range(filler):
                        pipe.set(f"rq:job:filler-{k}", "x")
                    pipe.execute()
                before = _commands(conn)
                body = web.get("/health").json()
                counts.append(_commands(conn) - before - 1)  # less the INFO that reads the count
                assert [w["name"] for w in body["workers"]] == ["w1"]
                assert body["model_version"] == "v1" and body["status"] == "DEGRADED"
                assert any(p.startswith("workers cannot reach Label Studio (since ") for p in body["problems"])
                assert any("3.1700000000" in p for p in body["problems"])  # the withheld /setup token
        # 11: the batch depth is one script over the projects' queues, and Redis counts the SMEMBERS inside it
        assert counts[0] == counts[1] <= 11, counts
    finally:
        server.kill()


def test_expired_registrations_and_problems_drop_out(tmp_path):
    server = RedisServer(tmp_path)
    try:
        conn = redis.Redis.from_url(server.url)
        q.register_worker(conn, "gone", {"name": "gone", "model_version": "v1"}, heartbeat=60)
        q.register_worker(conn, "alive", {"name": "alive", "model_version": "v1"}, heartbeat=60)
        conn.zadd(q.WORKERS_KEY, {"gone": 1.0})  # its last heartbeat long ago
        q.report_problem(conn, "old", "an old problem", ttl=60)
        q.report_problem(conn, "new", "a new problem", ttl=60)
        conn.hset(q.PROBLEMS_KEY, "old", '{"message": "an old problem", "since": 1, "until": 2}')
        assert [w["name"] for w in q.live_workers(conn)] == ["alive"]
        assert [p.split(" (since")[0] for p in q.problems(conn)] == ["a new problem"]
        q.clear_problem(conn, "new")
        q.unregister_worker(conn, "alive")
        assert q.problems(conn) == [] and q.live_workers(conn) == []
    finally:
        server.kill()


def test_health_counts_every_projects_batch_queue_in_one_round_trip(tmp_path):
    """The batch depth /health reports is the sum of the projects' queues, read by one script (one round
    trip; inside it, one LLEN per project: the cost grows with projects, never with jobs)."""
    server = RedisServer(tmp_path)
    try:
        conn = redis.Redis.from_url(server.url)
        with conn.pipeline(transaction=False) as pipe:
            for project in range(30):
                pipe.rpush(f"rq:queue:batch-{project}", *range(project + 1))
                pipe.sadd("rq:queues", f"rq:queue:batch-{project}")
            pipe.rpush("rq:queue:interactive", "x")
            pipe.execute()
        with TestClient(create_app(ServeSettings(redis_url=server.url))) as web:
            assert web.get("/health").json()["queues"] == {"interactive": 1, "batch": sum(range(1, 31)), "warmup": 0}
        assert q.project_depths(conn) == {str(p): p + 1 for p in range(30)}
    finally:
        server.kill()
