"""RQ queues, job hand-off and the shared state web and workers keep in Redis.

Jobs are enqueued by dotted name (``worker.jobs.predict``), so this module, like the whole web
process, never imports the worker's code or torch.

Delivery of a /predict job is decided exactly once per job with one Redis key, ``claim``:
- the job, once its result is stored, sets it to ``web`` if it is still unset: the waiting web
  request (or the next /predict of the same task) returns the result;
- the web request, when its budget runs out, sets it to ``worker`` if still unset: the job then
  writes its prediction to Label Studio itself.
Whichever ``SET NX`` lands first decides; the loser reads the value and acts on it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Iterable

import redis
from rq import Queue, Retry
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.results import Result

PREFIX = "hybridgl"
INTERACTIVE, BATCH, WARMUP = "interactive", "batch", "warmup"
QUEUES = (INTERACTIVE, BATCH, WARMUP)
CLAIM_WEB, CLAIM_WORKER = "web", "worker"
CLAIM_TTL = 24 * 3600
RETRY_INTERVALS = [2, 10, 30, 60]  # seconds before each retry; later ones wait as long as the last
HEARTBEATS_TO_DEATH = 3  # a worker silent for this many heartbeat intervals is taken as dead


def connect(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=10, health_check_interval=30)


def claim_key(job_id: str) -> str:
    return f"{PREFIX}:claim:{job_id}"


def claim(conn: redis.Redis, job_id: str, who: str) -> str:
    """Set the delivery route if unset; return the route in force."""
    if conn.set(claim_key(job_id), who, nx=True, ex=CLAIM_TTL):
        return who
    value = conn.get(claim_key(job_id))
    return value.decode() if value else who


def job_id_for(kind: str, *parts: Any) -> str:
    """Deterministic job ids: the same request for the same task joins the job already running."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return f"{kind}-{digest}"


@dataclass
class JobOutcome:
    job_id: str
    status: str  # finished | failed | pending
    value: Any = None
    error: str | None = None


class JobQueue:
    def __init__(self, conn: redis.Redis, job_timeout: int = 600, result_ttl: int = 3600, retries: int = 2):
        self.conn = conn
        self.job_timeout = job_timeout
        self.result_ttl = result_ttl
        self.retries = retries
        self.queues = {name: Queue(name, connection=conn) for name in QUEUES}

    def enqueue(self, queue: str, func: str, payload: dict, job_id: str, description: str) -> Job:
        """Enqueue unless a live job with this id exists (then return that one)."""
        try:
            job = Job.fetch(job_id, connection=self.conn)
            if job.get_status(refresh=False) in (JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED,
                                                 JobStatus.SCHEDULED, JobStatus.FINISHED):
                return job
        except NoSuchJobError:
            pass
        self.conn.delete(claim_key(job_id))
        return self.queues[queue].enqueue(
            func, payload, job_id=job_id, description=description, job_timeout=self.job_timeout,
            result_ttl=self.result_ttl, failure_ttl=self.result_ttl,
            retry=Retry(max=self.retries, interval=RETRY_INTERVALS[: self.retries]) if self.retries else None,
        )

    def wait(self, job_ids: Iterable[str], deadline: float) -> dict[str, JobOutcome]:
        """Block until every job has an outcome or ``deadline`` (time.monotonic) passes.

        Waits on RQ's per-job result streams with XREAD, so Redis wakes us when a job ends.
        """
        pending = list(dict.fromkeys(job_ids))
        outcomes: dict[str, JobOutcome] = {}
        seen: dict[str, str] = {}
        while pending:
            for job_id in list(pending):
                key = Result.get_key(job_id)
                latest = self.conn.xrevrange(key, "+", "-", count=1)
                seen[key] = latest[0][0].decode() if latest else "0-0"
                outcome = self.outcome(job_id)
                if outcome.status != "pending":
                    outcomes[job_id] = outcome
                    pending.remove(job_id)
            remaining = deadline - time.monotonic()
            if not pending or remaining <= 0:
                break
            # Wakes on the next result entry of any pending job (a retried job's failure included).
            self.conn.xread({Result.get_key(j): seen[Result.get_key(j)] for j in pending},
                            block=max(1, int(min(remaining, 5.0) * 1000)), count=1)
        for job_id in pending:
            outcomes[job_id] = JobOutcome(job_id, "pending")
        return outcomes

    def outcome(self, job_id: str) -> JobOutcome:
        try:
            job = Job.fetch(job_id, connection=self.conn)
        except NoSuchJobError:
            return JobOutcome(job_id, "failed", error="the job is gone from Redis (expired, or Redis was restarted)")
        result = job.latest_result()
        if result is not None and result.type == Result.Type.SUCCESSFUL:
            return JobOutcome(job_id, "finished", value=result.return_value)
        status = job.get_status(refresh=False)
        if status in (JobStatus.QUEUED, JobStatus.STARTED, JobStatus.SCHEDULED, JobStatus.DEFERRED):
            return JobOutcome(job_id, "pending")  # running (again): an older failed result is history
        if status == JobStatus.FAILED or (result is not None and result.type == Result.Type.FAILED):
            return JobOutcome(job_id, "failed", error=job_error(job, result))
        return JobOutcome(job_id, "pending")

    def depths(self) -> dict[str, int]:
        return {name: q.count for name, q in self.queues.items()}


def job_error(job: Job, result: Result | None = None) -> str:
    """The user-facing reason of a failed job: the last line of its exception."""
    text = (result.exc_string if result is not None else None) or job.exc_info or "unknown error"
    lines = [line for line in text.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else text
    if ": " in last and last.split(": ", 1)[0].replace(".", "").replace("_", "").isalnum():
        last = last.split(": ", 1)[1]
    if "JobTimeoutException" in text:
        return "the job ran past its time limit (HYBRIDGL_JOB_TIMEOUT)"
    if "AbandonedJobError" in text:
        return ("the worker running it stopped without finishing (killed, crashed or out of memory), and no retry "
                "was left (HYBRIDGL_JOB_RETRIES): see the workers' logs and GET /health")
    return last


# --- workers and the model version -------------------------------------------------------
# Each worker has an info key that expires unless its heartbeat renews it, and an entry in one sorted
# set (score: when it expires) so that finding the live ones never scans the keyspace: /health reads
# them, and a keyspace holding thousands of job records would make a SCAN cost a round trip per 100 keys.
WORKERS_KEY = f"{PREFIX}:workers"
MODEL_VERSION_KEY = f"{PREFIX}:model_version"


def worker_key(name: str) -> str:
    return f"{PREFIX}:worker:{name}"


def register_worker(conn: redis.Redis, name: str, info: dict, heartbeat: float) -> None:
    """(Re)register a live worker; it counts as dead unless renewed within HEARTBEATS_TO_DEATH heartbeats."""
    ttl = heartbeat * HEARTBEATS_TO_DEATH
    with conn.pipeline(transaction=False) as pipe:
        pipe.set(worker_key(name), json.dumps(info), px=max(1, int(ttl * 1000)))
        pipe.zadd(WORKERS_KEY, {name: time.time() + ttl})
        pipe.zremrangebyscore(WORKERS_KEY, 0, time.time() - 24 * 3600)  # long-gone workers
        pipe.set(MODEL_VERSION_KEY, info["model_version"])
        pipe.execute()


def unregister_worker(conn: redis.Redis, name: str) -> None:
    with conn.pipeline(transaction=False) as pipe:
        pipe.delete(worker_key(name))
        pipe.zrem(WORKERS_KEY, name)
        pipe.execute()


def live_workers(conn: redis.Redis) -> list[dict]:
    return _worker_infos(conn, conn.zrangebyscore(WORKERS_KEY, time.time(), "+inf"))


def _worker_infos(conn: redis.Redis, names: list[bytes]) -> list[dict]:
    values = conn.mget([worker_key(n.decode()) for n in names]) if names else []
    return [json.loads(v) for v in values if v]


def current_model_version(conn: redis.Redis) -> str | None:
    value = conn.get(MODEL_VERSION_KEY)
    return value.decode() if value else None


# --- what Label Studio sent in /setup, for workers without LABEL_STUDIO_URL / _API_KEY --------
# Record: {"hostname": ..., and "token_encrypted": Fernet(HYBRIDGL_SECRET_KEY) token, or
# "token_withheld": true when Label Studio sent a token but no secret key was set to encrypt it}.
# The token is never kept in clear text.
TOKEN_WITHHELD = ("workers have no Label Studio token: set LABEL_STUDIO_API_KEY on the workers (and the "
                  "backend), or HYBRIDGL_SECRET_KEY on backend and workers (then Label Studio's /setup token is "
                  "kept, encrypted, for the workers)")


def setup_key(project: Any) -> str:
    return f"{PREFIX}:setup:{project}"


WITHHELD_KEY = f"{PREFIX}:setups-token-withheld"  # set of the projects whose /setup token was not kept


def _fernet(secret_key: str):
    import base64

    from cryptography.fernet import Fernet

    # Any string works as HYBRIDGL_SECRET_KEY: Fernet gets its SHA-256 as the 32-byte key.
    return Fernet(base64.urlsafe_b64encode(hashlib.sha256(secret_key.encode()).digest()))


def save_setup(conn: redis.Redis, project: str, hostname: str | None, token: str | None, secret_key: str) -> None:
    record: dict[str, Any] = {"hostname": hostname}
    if token:
        if secret_key:
            record["token_encrypted"] = _fernet(secret_key).encrypt(token.encode()).decode()
        else:
            record["token_withheld"] = True
    with conn.pipeline(transaction=False) as pipe:
        pipe.set(setup_key(project), json.dumps(record))
        (pipe.sadd if record.get("token_withheld") else pipe.srem)(WITHHELD_KEY, str(project))
        pipe.execute()


def load_setup(conn: redis.Redis, project: Any, secret_key: str) -> tuple[str | None, str | None, str | None]:
    """(hostname, token, why the token is missing) from a project's /setup record."""
    raw = conn.get(setup_key(project))
    try:
        record = json.loads(raw) if raw else {}
    except ValueError:
        record = {}
    if not isinstance(record, dict):
        record = {}
    hostname = record.get("hostname") if isinstance(record.get("hostname"), str) else None
    encrypted = record.get("token_encrypted")
    if record.get("token_withheld"):
        return hostname, None, TOKEN_WITHHELD
    if not isinstance(encrypted, str):
        return hostname, None, None
    if not secret_key:
        return hostname, None, ("the Label Studio token from /setup is encrypted, but this worker has no "
                                "HYBRIDGL_SECRET_KEY: set the backend's value on the workers")
    from cryptography.fernet import InvalidToken

    try:
        return hostname, _fernet(secret_key).decrypt(encrypted.encode()).decode(), None
    except (InvalidToken, ValueError):
        return hostname, None, ("the Label Studio token from /setup cannot be decrypted: HYBRIDGL_SECRET_KEY "
                                "differs between the backend and the workers")


# --- problems /health reports: parts degraded now or recently --------------------------------
# One hash field per part (``labelstudio``, ``worker:<name>``, ...), each with the time it stops being
# reported, so that a part that recovers without anyone clearing it drops out on its own.
PROBLEMS_KEY = f"{PREFIX}:problems"


def report_problem(conn: redis.Redis, part: str, message: str, ttl: int) -> None:
    """Record that ``part`` is degraded; ``since`` keeps the first report of an ongoing problem."""
    now = time.time()
    since = None
    try:
        old = json.loads(conn.hget(PROBLEMS_KEY, part) or "{}")
        if float(old.get("until", 0)) > now:
            since = old.get("since")
    except (ValueError, AttributeError, TypeError):
        pass
    with conn.pipeline(transaction=False) as pipe:
        pipe.hset(PROBLEMS_KEY, part, json.dumps({"message": message, "since": since or now, "until": now + ttl}))
        pipe.expire(PROBLEMS_KEY, max(ttl, int(conn.ttl(PROBLEMS_KEY) or 0)))
        pipe.execute()


def clear_problem(conn: redis.Redis, part: str) -> None:
    conn.hdel(PROBLEMS_KEY, part)


def problems(conn: redis.Redis) -> list[str]:
    return _active_problems(conn.hgetall(PROBLEMS_KEY))


def _active_problems(fields: dict) -> list[str]:
    """Problems still in force, oldest first, each with the UTC time it began."""
    now = time.time()
    records = []
    for raw in fields.values():
        try:
            record = json.loads(raw)
            if float(record["until"]) > now:
                records.append((float(record["since"]), str(record["message"])))
        except (ValueError, TypeError, KeyError):
            continue
    return [f"{message} (since {time.strftime('%H:%M:%S', time.gmtime(since))} UTC)"
            for since, message in sorted(records)]


# --- /health in two round trips ------------------------------------------------------------
@dataclass
class Snapshot:
    workers: list[dict]
    depths: dict[str, int]
    model_version: str | None
    tokenless: list[str]
    problems: list[str]


def snapshot(conn: redis.Redis) -> Snapshot:
    """What /health reports, read in one pipeline (plus one MGET of the live workers' infos)."""
    with conn.pipeline(transaction=False) as pipe:
        pipe.zrangebyscore(WORKERS_KEY, time.time(), "+inf")
        for name in QUEUES:
            pipe.llen(Queue.redis_queue_namespace_prefix + name)
        pipe.get(MODEL_VERSION_KEY)
        pipe.smembers(WITHHELD_KEY)
        pipe.hgetall(PROBLEMS_KEY)
        names, *rest = pipe.execute()
    lengths, (version, withheld, problem_fields) = rest[:len(QUEUES)], rest[len(QUEUES):]
    return Snapshot(workers=_worker_infos(conn, names), depths=dict(zip(QUEUES, lengths)),
                    model_version=version.decode() if version else None,
                    tokenless=sorted(m.decode() for m in withheld), problems=_active_problems(problem_fields))


# --- metrics -------------------------------------------------------------------------------
def count(conn: redis.Redis, name: str, amount: float = 1) -> None:
    conn.hincrbyfloat(f"{PREFIX}:metrics", name, amount)


def metrics(conn: redis.Redis) -> dict[str, float]:
    return {k.decode(): float(v) for k, v in conn.hgetall(f"{PREFIX}:metrics").items()}
