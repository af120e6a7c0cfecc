"""RQ queues, enqueueing and waiting, and the shared state web and workers keep in Redis.

Jobs are enqueued by dotted name (``worker.jobs.predict``), so this module, like the whole web
process, never imports the worker's code or torch. What a job is (name, payload, id) is decided in
``backend.jobspec``; who delivers a task's prediction in ``backend.delivery``.

Whoever can write to Redis must not gain code execution on the workers: every queue, job,
registry and worker made here (and only here: use :func:`connect`, :func:`make_queue`,
:func:`fetch_job`, :func:`registry`) uses RQ's JSON serializer, not pickle, and
:class:`TrustedJob`, which runs only the functions in :data:`JOB_FUNCTIONS` and no callbacks.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Iterable

import redis
from rq import Queue, Retry
from rq.exceptions import DuplicateJobError, NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import CanceledJobRegistry, FailedJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer

from backend.jobspec import (  # noqa: F401 - re-exported
    BATCH,
    BATCH_QUEUE_PREFIX,
    INTERACTIVE,
    PREDICT_JOB,
    PREFIX,
    QUEUES,
    WARM_JOB,
    WARMUP,
    JobSpec,
    batch_queue,
    tier,
)

WAIT_BLOCK_SECONDS = 2.0  # longest single blocking read while waiting for job results
RETRY_INTERVALS = [2, 10, 30, 60]  # seconds before each retry; later ones wait as long as the last
HEARTBEATS_TO_DEATH = 3  # a worker silent for this many heartbeat intervals is taken as dead
# A job that ended without an answer (failed, stopped, canceled) is replaced by the next enqueue of its id.
_DISCARD_ENDED = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'failed' or status == 'stopped' or status == 'canceled' then
  redis.call('DEL', KEYS[1], KEYS[2])
  for i = 3, #KEYS do redis.call('ZREM', KEYS[i], ARGV[1]) end
  return 1
end
return 0
"""
RUNNING = (JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED)  # to run, or running
LIVE = RUNNING + (JobStatus.FINISHED,)  # an enqueue of the same id joins these


SERIALIZER = JSONSerializer
JOB_FUNCTIONS = frozenset({PREDICT_JOB, WARM_JOB})  # all that workers run


class UntrustedJob(Exception):
    """A job record names something other than a hybridgl job function (written to Redis by someone else)."""


class TrustedJob(Job):
    """An RQ job that only ever imports one of JOB_FUNCTIONS: RQ would import and call any dotted
    name (and callbacks) a job record in Redis names."""

    @property
    def func(self):
        if self.func_name not in JOB_FUNCTIONS or self.instance is not None:
            raise UntrustedJob(f"refusing to run {str(self.func_name)[:100]!r}: workers only run "
                               f"{', '.join(sorted(JOB_FUNCTIONS))}")
        if self._success_callback_name or self._failure_callback_name or self._stopped_callback_name:
            raise UntrustedJob("refusing a job with callbacks: hybridgl jobs have none")
        return super().func

    # Callbacks are never imported (RQ would import whatever name the record holds).
    success_callback = failure_callback = stopped_callback = property(lambda self: None)


def connect(url: str, **timeouts: float) -> redis.Redis:
    """A connection to REDIS_URL (redis://, rediss:// for TLS, with user and password in the URL)."""
    options = {"socket_connect_timeout": 2, "socket_timeout": 10, "health_check_interval": 30, **timeouts}
    return redis.Redis.from_url(url, **options)


def make_queue(name: str, conn: redis.Redis) -> Queue:
    return Queue(name, connection=conn, serializer=SERIALIZER, job_class=TrustedJob)


def fetch_job(job_id: str, conn: redis.Redis) -> Job:
    return TrustedJob.fetch(job_id, connection=conn, serializer=SERIALIZER)


def fetch_jobs(job_ids: list[str], conn: redis.Redis) -> list[Job | None]:
    return TrustedJob.fetch_many(job_ids, connection=conn, serializer=SERIALIZER)


def registry(kind: type, name: str, conn: redis.Redis):
    """An RQ job registry (StartedJobRegistry, FailedJobRegistry, ...) of queue ``name``."""
    return kind(name, connection=conn, serializer=SERIALIZER, job_class=TrustedJob)


@dataclass
class JobOutcome:
    job_id: str
    status: str  # finished | failed | canceled | pending
    value: Any = None
    error: str | None = None


class JobQueue:
    def __init__(self, conn: redis.Redis, job_timeout: int = 600, result_ttl: int = 3600, retries: int = 2):
        self.conn = conn
        self.job_timeout = job_timeout
        self.result_ttl = result_ttl
        self.retries = retries
        self._queues: dict[str, Queue] = {}

    def queue(self, name: str) -> Queue:
        if name not in self._queues:
            self._queues[name] = make_queue(name, self.conn)
        return self._queues[name]

    @property
    def job_lifetime(self) -> float:
        """The longest a started job can take, retries and their waits included."""
        waits = sum(RETRY_INTERVALS[: self.retries]) + RETRY_INTERVALS[-1] * max(0, self.retries - len(RETRY_INTERVALS))
        return self.job_timeout * (self.retries + 1) + waits

    def enqueue(self, spec: JobSpec) -> Job:
        """Enqueue ``spec`` unless a live job with its id exists (then return that one).

        Callers racing on one id get one job: RQ's unique enqueue is atomic, and the loser joins the
        winner's job. A job that ended without an answer is discarded (atomically, only while it is
        still ended) and enqueued again.
        """
        for _ in range(5):
            try:
                job = fetch_job(spec.job_id, self.conn)
                if job.get_status(refresh=False) in LIVE:
                    return job
                self._discard_ended(spec.job_id, job.origin or spec.queue)
            except NoSuchJobError:
                pass
            try:
                return self.queue(spec.queue).enqueue(
                    spec.func, spec.payload, job_id=spec.job_id, description=spec.description, unique=True,
                    job_timeout=self.job_timeout, result_ttl=self.result_ttl, failure_ttl=self.result_ttl,
                    retry=Retry(max=self.retries, interval=RETRY_INTERVALS[: self.retries]) if self.retries else None)
            except DuplicateJobError:
                continue  # another caller enqueued it first: join that job
        raise RuntimeError(f"job {spec.job_id} kept changing while being enqueued")

    def _discard_ended(self, job_id: str, queue_name: str) -> None:
        registries = [FailedJobRegistry(queue_name, connection=self.conn).key,
                      CanceledJobRegistry(queue_name, connection=self.conn).key]
        self.conn.eval(_DISCARD_ENDED, 2 + len(registries), Job.key_for(job_id), Result.get_key(job_id), *registries,
                       job_id)

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
            # Wakes on the next result entry of any pending job (a retried job's failure included). Blocks
            # at most WAIT_BLOCK_SECONDS: well inside any client's socket timeout (redis-py's default is 5 s).
            self.conn.xread({Result.get_key(j): seen[Result.get_key(j)] for j in pending},
                            block=max(1, int(min(remaining, WAIT_BLOCK_SECONDS) * 1000)), count=1)
        for job_id in pending:
            outcomes[job_id] = JobOutcome(job_id, "pending")
        return outcomes

    def outcome(self, job_id: str) -> JobOutcome:
        try:
            job = fetch_job(job_id, self.conn)
        except NoSuchJobError:
            return JobOutcome(job_id, "failed", error="the job is gone from Redis (expired, or Redis was restarted)")
        result = job.latest_result()
        if result is not None and result.type == Result.Type.SUCCESSFUL:
            return JobOutcome(job_id, "finished", value=result.return_value)
        status = job.get_status(refresh=False)
        if status in RUNNING:
            return JobOutcome(job_id, "pending")  # running (again): an older failed result is history
        if status == JobStatus.FAILED or (result is not None and result.type == Result.Type.FAILED):
            return JobOutcome(job_id, "failed", error=job_error(job, result))
        if status == JobStatus.CANCELED:
            return JobOutcome(job_id, "canceled", error="canceled before it ran (DELETE /batches or prelabel --cancel)")
        return JobOutcome(job_id, "pending")

    def depths(self) -> dict[str, int]:
        """Jobs waiting per tier (interactive, batch: every project's, warmup)."""
        return tier_depths(self.conn)


# --- the batch queues: one per project -------------------------------------------------------
# RQ records every queue it enqueues on in its ``rq:queues`` set (Queue.all() reads it): the batch queues
# are its members named ``batch-<project>``. Workers re-read the set before each dequeue (worker.runner),
# so a project's queue that appears after they started is served from its first job on. Members are
# never removed (RQ keeps them): the set grows with the number of projects, not of jobs.
_QUEUE_KEY_PREFIX = Queue.redis_queue_namespace_prefix
_BATCH_KEY_PREFIX = _QUEUE_KEY_PREFIX + BATCH_QUEUE_PREFIX
# KEYS[1]: rq:queues. ARGV[1]: key prefix of the batch queues. -> {name, length, name, length, ...}
_BATCH_DEPTHS = """
local out = {}
for _, key in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if string.sub(key, 1, #ARGV[1]) == ARGV[1] then
    table.insert(out, string.sub(key, #ARGV[2] + 1))
    table.insert(out, redis.call('LLEN', key))
  end
end
return out
"""


def batch_queue_names(conn: redis.Redis) -> list[str]:
    """Every project's batch queue, sorted by name."""
    keys = conn.smembers(Queue.redis_queues_keys)
    return sorted(k.decode()[len(_QUEUE_KEY_PREFIX):] for k in keys if k.decode().startswith(_BATCH_KEY_PREFIX))


def project_of(queue_name: str) -> str:
    return queue_name[len(BATCH_QUEUE_PREFIX):]


def _batch_depths_call(pipe_or_conn) -> Any:
    return pipe_or_conn.eval(_BATCH_DEPTHS, 1, Queue.redis_queues_keys, _BATCH_KEY_PREFIX, _QUEUE_KEY_PREFIX)


def _pairs(reply: list) -> dict[str, int]:
    return {reply[i].decode(): int(reply[i + 1]) for i in range(0, len(reply), 2)}


def project_depths(conn: redis.Redis) -> dict[str, int]:
    """Batch jobs waiting per project (one round trip whatever the number of projects)."""
    return {project_of(name): n for name, n in sorted(_pairs(_batch_depths_call(conn)).items())}


def tier_depths(conn: redis.Redis) -> dict[str, int]:
    with conn.pipeline(transaction=False) as pipe:
        pipe.llen(_QUEUE_KEY_PREFIX + INTERACTIVE)
        _batch_depths_call(pipe)
        pipe.llen(_QUEUE_KEY_PREFIX + WARMUP)
        interactive, batch, warmup = pipe.execute()
    return {INTERACTIVE: interactive, BATCH: sum(_pairs(batch).values()), WARMUP: warmup}


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


def redis_now(conn: redis.Redis) -> float:
    """Redis's clock: liveness is compared on one clock, whatever the hosts' clocks say."""
    seconds, micros = conn.time()
    return seconds + micros / 1e6


def register_worker(conn: redis.Redis, name: str, info: dict, heartbeat: float) -> None:
    """(Re)register a live worker; it counts as dead unless renewed within HEARTBEATS_TO_DEATH heartbeats."""
    ttl = heartbeat * HEARTBEATS_TO_DEATH
    now = redis_now(conn)
    with conn.pipeline(transaction=False) as pipe:
        pipe.set(worker_key(name), json.dumps(info), px=max(1, int(ttl * 1000)))
        pipe.zadd(WORKERS_KEY, {name: now + ttl})
        pipe.zremrangebyscore(WORKERS_KEY, 0, now - 24 * 3600)  # long-gone workers
        pipe.set(MODEL_VERSION_KEY, info["model_version"])
        pipe.execute()


def unregister_worker(conn: redis.Redis, name: str) -> None:
    with conn.pipeline(transaction=False) as pipe:
        pipe.delete(worker_key(name))
        pipe.zrem(WORKERS_KEY, name)
        pipe.execute()


def live_workers(conn: redis.Redis) -> list[dict]:
    with conn.pipeline(transaction=False) as pipe:
        pipe.time()
        pipe.zrange(WORKERS_KEY, 0, -1, withscores=True)
        now, entries = pipe.execute()
    return _worker_infos(conn, _alive(now, entries))


def _alive(now: tuple[int, int], entries: list[tuple[bytes, float]]) -> list[bytes]:
    """Names whose registration expires after Redis's ``now`` (the set holds only a day's workers)."""
    seconds = now[0] + now[1] / 1e6
    return [name for name, expires in entries if expires > seconds]


def _worker_infos(conn: redis.Redis, names: list[bytes]) -> list[dict]:
    values = conn.mget([worker_key(n.decode()) for n in names]) if names else []
    return [json.loads(v) for v in values if v]


def current_model_version(conn: redis.Redis) -> str | None:
    value = conn.get(MODEL_VERSION_KEY)
    return value.decode() if value else None


# --- what an authenticated /setup sent, for workers without LABEL_STUDIO_URL / _API_KEY -----
# Record: {"hostname": ..., and "token_encrypted": Fernet(HYBRIDGL_SECRET_KEY) token, or
# "token_withheld": true when Label Studio sent a token but no secret key was set to encrypt it}.
# The token is never kept in clear text. The hostname is pinned: the first /setup of a project
# decides it, and a /setup naming another origin is refused until an admin resets the record.
TOKEN_WITHHELD = ("workers have no Label Studio token: set LABEL_STUDIO_API_KEY on the workers (and the "
                  "backend), or HYBRIDGL_SECRET_KEY on backend and workers (then Label Studio's /setup token is "
                  "kept, encrypted, for the workers)")


def setup_key(project: Any) -> str:
    return f"{PREFIX}:setup:{project}"


WITHHELD_KEY = f"{PREFIX}:setups-token-withheld"  # set of the projects whose /setup token was not kept


class SetupPinned(Exception):
    """/setup named another Label Studio than the one pinned for the project."""


def _fernet(secret_key: str):
    import base64

    from cryptography.fernet import Fernet

    # Any string works as HYBRIDGL_SECRET_KEY: Fernet gets its SHA-256 as the 32-byte key.
    return Fernet(base64.urlsafe_b64encode(hashlib.sha256(secret_key.encode()).digest()))


def _origin(address: str) -> tuple[str, str, int | None]:
    from urllib.parse import urlsplit

    parts = urlsplit(address.strip() if "://" in address else "http://" + address.strip())
    try:
        port = parts.port
    except ValueError:
        port = None
    return parts.scheme.lower(), (parts.hostname or "").rstrip("."), port or {"http": 80, "https": 443}.get(parts.scheme)


def save_setup(conn: redis.Redis, project: str, hostname: str | None, token: str | None, secret_key: str) -> None:
    """Keep what an authenticated /setup sent. Raises SetupPinned when ``hostname`` is another
    origin than the project's pinned one (atomic: of concurrent /setups naming different origins,
    one pins and the others are refused)."""
    key = setup_key(project)

    def update(pipe) -> None:
        raw = pipe.get(key)
        try:
            old = json.loads(raw) if raw else {}
        except ValueError:
            old = {}
        pinned = old.get("hostname") if isinstance(old, dict) and isinstance(old.get("hostname"), str) else None
        if hostname and pinned and _origin(hostname) != _origin(pinned):
            raise SetupPinned(
                f"project {project} is pinned to Label Studio at {pinned}, and this /setup names {hostname}: its "
                f"token is not sent there. If Label Studio really moved, an admin resets the pin with "
                f"`redis-cli DEL {key}` (or sets LABEL_STUDIO_URL on backend and workers)")
        record: dict[str, Any] = {"hostname": pinned or hostname}
        if token:
            if secret_key:
                record["token_encrypted"] = _fernet(secret_key).encrypt(token.encode()).decode()
            else:
                record["token_withheld"] = True
        pipe.multi()
        pipe.set(key, json.dumps(record))
        (pipe.sadd if record.get("token_withheld") else pipe.srem)(WITHHELD_KEY, str(project))

    conn.transaction(update, key)


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
    now = redis_now(conn)
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
    with conn.pipeline(transaction=False) as pipe:
        pipe.time()
        pipe.hgetall(PROBLEMS_KEY)
        now, fields = pipe.execute()
    return _active_problems(now, fields)


def _active_problems(now_time: tuple[int, int], fields: dict) -> list[str]:
    """Problems still in force at Redis's ``now_time``, oldest first, each with the UTC time it began."""
    now = now_time[0] + now_time[1] / 1e6
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
        pipe.time()
        pipe.zrange(WORKERS_KEY, 0, -1, withscores=True)
        pipe.llen(_QUEUE_KEY_PREFIX + INTERACTIVE)
        _batch_depths_call(pipe)
        pipe.llen(_QUEUE_KEY_PREFIX + WARMUP)
        pipe.get(MODEL_VERSION_KEY)
        pipe.smembers(WITHHELD_KEY)
        pipe.hgetall(PROBLEMS_KEY)
        now, entries, interactive, batch, warmup, version, withheld, problem_fields = pipe.execute()
    names = _alive(now, entries)
    depths = {INTERACTIVE: interactive, BATCH: sum(_pairs(batch).values()), WARMUP: warmup}
    return Snapshot(workers=_worker_infos(conn, names), depths=depths,
                    model_version=version.decode() if version else None,
                    tokenless=sorted(m.decode() for m in withheld), problems=_active_problems(now, problem_fields))


# --- metrics -------------------------------------------------------------------------------
def count(conn: redis.Redis, name: str, amount: float = 1) -> None:
    conn.hincrbyfloat(f"{PREFIX}:metrics", name, amount)


def metrics(conn: redis.Redis) -> dict[str, float]:
    return {k.decode(): float(v) for k, v in conn.hgetall(f"{PREFIX}:metrics").items()}
