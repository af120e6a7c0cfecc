"""Batches: every `hybridgl prelabel` run and every /predict without context (Retrieve Predictions)
is a batch with an id, a project and its jobs, so that teams can see their work and cancel it.

A batch is a record in Redis (``batch:<id>``: project, kind, when it was created, jobs canceled) and
the set of its jobs' ids (``batch:<id>:jobs``); a job joined by two batches (a Retrieve during a
prelabel run) is in both. Counts are read from the jobs' own RQ records when asked, so nothing has
to be kept in step with the workers: queued, running, retrying (waiting for a retry), done, failed
(with reasons), canceled, and ``expired`` for jobs whose record is gone (HYBRIDGL_RESULT_TTL after
they ended). A batch is listed until all its jobs' records are gone; its record expires a week after
its last job was added in any case.

Cancel removes the batch's queued jobs from its project's queue, each with one atomic LREM (a job a
worker took meanwhile is running and is left to finish and deliver), except those another live
batch of the project (one not canceled itself) also holds. A canceled job's id can be enqueued again (a re-run).

Light: no torch, nothing from ``worker``.
"""

from __future__ import annotations

import secrets
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import redis
from rq.job import Job
from rq.queue import Queue
from rq.registry import CanceledJobRegistry

from backend import queue as q
from backend.jobspec import PREFIX, batch_queue, project_id

PRELABEL, PREDICT = "prelabel", "predict"
BATCHES_KEY = f"{PREFIX}:batches"  # sorted set: batch id -> created (Redis time)
BATCH_TTL = 7 * 24 * 3600
REASONS_READ = 200  # failed jobs whose reason is read per batch (the count covers all of them)
# KEYS: queue, canceled registry. ARGV: canceled-registry score, job ids. -> ids removed from the queue
_CANCEL = """
local removed = {}
for i = 2, #ARGV do
  if redis.call('LREM', KEYS[1], 0, ARGV[i]) > 0 then
    redis.call('HSET', 'rq:job:' .. ARGV[i], 'status', 'canceled')
    redis.call('ZADD', KEYS[2], ARGV[1], ARGV[i])
    table.insert(removed, ARGV[i])
  end
end
return removed
"""


class BatchNotFound(LookupError):
    pass


def batch_key(batch_id: str) -> str:
    return f"{PREFIX}:batch:{batch_id}"


def jobs_key(batch_id: str) -> str:
    return f"{PREFIX}:batch:{batch_id}:jobs"


def create(conn: redis.Redis, project: Any, kind: str) -> str:
    """A new batch of ``project``; returns its id."""
    batch_id = secrets.token_hex(6)
    now = q.redis_now(conn)
    with conn.pipeline(transaction=False) as pipe:
        pipe.hset(batch_key(batch_id), mapping={"project": project_id(project), "kind": kind, "created": now,
                                                "queue": batch_queue(project), "cancel_requested": 0})
        pipe.expire(batch_key(batch_id), BATCH_TTL)
        pipe.zadd(BATCHES_KEY, {batch_id: now})
        pipe.execute()
    return batch_id


def add_jobs(conn: redis.Redis, batch_id: str, job_ids: Iterable[str]) -> None:
    ids = list(job_ids)
    if not ids:
        return
    with conn.pipeline(transaction=False) as pipe:
        pipe.sadd(jobs_key(batch_id), *ids)
        pipe.expire(jobs_key(batch_id), BATCH_TTL)
        pipe.expire(batch_key(batch_id), BATCH_TTL)
        pipe.execute()


@dataclass
class BatchState:
    id: str
    project: str
    kind: str
    created: float
    jobs: int = 0
    queued: int = 0
    running: int = 0
    retrying: int = 0
    done: int = 0
    failed: int = 0
    canceled: int = 0
    expired: int = 0
    failed_reasons: dict[str, int] = field(default_factory=dict)
    rate_per_minute: float = 0.0  # jobs done per minute since the batch was created
    eta_seconds: float | None = None  # at that rate; None before the first job is done
    cancel_requested: bool = False  # someone canceled it (it holds no queued job back from another cancel)
    state: str = "active"  # active | finished | canceled

    def as_dict(self) -> dict:
        return asdict(self)


def state(conn: redis.Redis, batch_id: str) -> BatchState:
    record = conn.hgetall(batch_key(batch_id)) if _valid_id(batch_id) else {}
    if not record:
        raise BatchNotFound(batch_id)
    record = {k.decode(): v.decode() for k, v in record.items()}
    result = BatchState(batch_id, record.get("project", ""), record.get("kind", ""), float(record.get("created", 0)))
    job_ids = sorted(m.decode() for m in conn.smembers(jobs_key(batch_id)))
    with conn.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hget(Job.key_for(job_id), "status")
        pipe.time()
        *statuses, now = pipe.execute()
    counts = Counter((s.decode() if s else "expired") for s in statuses)
    result.jobs = len(job_ids)
    result.queued = counts["queued"]
    result.running = counts["started"]
    result.retrying = counts["scheduled"] + counts["deferred"]
    result.done = counts["finished"]
    result.failed = counts["failed"] + counts["stopped"]
    result.canceled = counts["canceled"]
    result.expired = counts["expired"]
    failed_ids = [j for j, s in zip(job_ids, statuses) if s in (b"failed", b"stopped")][:REASONS_READ]
    reasons: Counter = Counter()
    for job in q.fetch_jobs(failed_ids, conn) if failed_ids else []:
        if job is not None:
            reasons[q.job_error(job, job.latest_result())] += 1
    result.failed_reasons = dict(reasons.most_common())
    elapsed = max(now[0] + now[1] / 1e6 - result.created, 1e-6)
    result.rate_per_minute = round(result.done / elapsed * 60, 3)
    left = result.queued + result.running + result.retrying
    if result.done and left:
        result.eta_seconds = round(left / (result.done / elapsed), 1)
    result.cancel_requested = bool(int(record.get("cancel_requested") or 0))
    if left == 0:
        result.state = "canceled" if result.cancel_requested and result.canceled else "finished"
    return result


def listing(conn: redis.Redis, project: Any = None) -> list[BatchState]:
    """Every batch still visible (oldest first), or one project's; drops the ones whose jobs are all gone."""
    wanted = project_id(project) if project is not None else None
    found: list[BatchState] = []
    for raw in conn.zrange(BATCHES_KEY, 0, -1):
        batch_id = raw.decode()
        try:
            current = state(conn, batch_id)
        except BatchNotFound:
            conn.zrem(BATCHES_KEY, batch_id)  # its record expired
            continue
        if current.jobs and current.expired == current.jobs:
            forget(conn, batch_id)
            continue
        if wanted is None or current.project == wanted:
            found.append(current)
    return found


def forget(conn: redis.Redis, batch_id: str) -> None:
    with conn.pipeline(transaction=False) as pipe:
        pipe.zrem(BATCHES_KEY, batch_id)
        pipe.delete(batch_key(batch_id), jobs_key(batch_id))
        pipe.execute()


def cancel(conn: redis.Redis, batch_id: str, result_ttl: int) -> int:
    """Remove the batch's queued jobs from its queue (not those another live batch also holds); running jobs
    finish and deliver. Returns how many were removed."""
    current = state(conn, batch_id)  # raises BatchNotFound
    queue_name = conn.hget(batch_key(batch_id), "queue").decode()
    mine = {m.decode() for m in conn.smembers(jobs_key(batch_id))}
    conn.hset(batch_key(batch_id), "cancel_requested", 1)
    for other in listing(conn, current.project):
        if other.id != batch_id and other.state == "active" and not other.cancel_requested:
            mine -= {m.decode() for m in conn.smembers(jobs_key(other.id))}
    if not mine:
        return 0
    registry = q.registry(CanceledJobRegistry, queue_name, conn)
    removed = conn.eval(_CANCEL, 2, Queue.redis_queue_namespace_prefix + queue_name, registry.key,
                        int(q.redis_now(conn)) + result_ttl, *sorted(mine))
    return len(removed)


def _valid_id(batch_id: str) -> bool:
    return 0 < len(batch_id) <= 64 and all(c in "0123456789abcdef" for c in batch_id)


def table(states: list[BatchState]) -> str:
    """The batches as a text table (``hybridgl batches``)."""
    if not states:
        return "no batches (prelabel runs and Retrieve Predictions show here while their jobs' records last)"
    head = ("BATCH", "PROJECT", "KIND", "STATE", "JOBS", "QUEUED", "RUNNING", "DONE", "FAILED", "CANCELED",
            "PER MIN", "ETA")
    rows = [head]
    for b in states:
        eta = "-" if b.eta_seconds is None else _duration(b.eta_seconds)
        rows.append((b.id, b.project, b.kind, b.state, str(b.jobs), str(b.queued), str(b.running + b.retrying),
                     str(b.done), str(b.failed), str(b.canceled), f"{b.rate_per_minute:.1f}", eta))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    for b in states:
        for reason, n in b.failed_reasons.items():
            lines.append(f"{b.id} failed {n} x {reason}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
