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
def register_worker(conn: redis.Redis, name: str, info: dict, heartbeat: float) -> None:
    """(Re)register a live worker; the key expires unless renewed within HEARTBEATS_TO_DEATH heartbeats."""
    conn.set(f"{PREFIX}:worker:{name}", json.dumps(info), px=max(1, int(heartbeat * HEARTBEATS_TO_DEATH * 1000)))
    conn.set(f"{PREFIX}:model_version", info["model_version"])


def live_workers(conn: redis.Redis) -> list[dict]:
    keys = list(conn.scan_iter(f"{PREFIX}:worker:*", count=100))
    values = conn.mget(keys) if keys else []
    return [json.loads(v) for v in values if v]


def current_model_version(conn: redis.Redis) -> str | None:
    value = conn.get(f"{PREFIX}:model_version")
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
    conn.set(setup_key(project), json.dumps(record))


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


def setups_without_token(conn: redis.Redis) -> list[str]:
    """Projects whose /setup token was not kept (no HYBRIDGL_SECRET_KEY)."""
    keys = list(conn.scan_iter(setup_key("*"), count=100))
    projects = []
    for key, raw in zip(keys, conn.mget(keys) if keys else []):
        try:
            if raw and json.loads(raw).get("token_withheld"):
                projects.append(key.decode().split(":", 2)[2])
        except (ValueError, AttributeError):
            continue
    return sorted(projects)


# --- problems /health reports: parts degraded now or recently --------------------------------
# One key per part (``labelstudio``, ``worker:<name>``, ...), expiring on its own, so that a part
# that recovers without anyone clearing it stops being reported.
def problem_key(part: str) -> str:
    return f"{PREFIX}:problem:{part}"


def report_problem(conn: redis.Redis, part: str, message: str, ttl: int) -> None:
    """Record that ``part`` is degraded; ``since`` keeps the first report of an ongoing problem."""
    key = problem_key(part)
    try:
        since = json.loads(conn.get(key) or "{}").get("since")
    except (ValueError, AttributeError):
        since = None
    conn.set(key, json.dumps({"message": message, "since": since or time.time()}), ex=ttl)


def clear_problem(conn: redis.Redis, part: str) -> None:
    conn.delete(problem_key(part))


def problems(conn: redis.Redis) -> list[str]:
    """Active problems, oldest first, each with the UTC time it began."""
    keys = sorted(conn.scan_iter(problem_key("*"), count=100))
    records = []
    for raw in conn.mget(keys) if keys else []:
        try:
            record = json.loads(raw) if raw else None
            records.append((float(record["since"]), str(record["message"])))
        except (ValueError, TypeError, KeyError):
            continue
    return [f"{message} (since {time.strftime('%H:%M:%S', time.gmtime(since))} UTC)"
            for since, message in sorted(records)]


# --- metrics -------------------------------------------------------------------------------
def count(conn: redis.Redis, name: str, amount: float = 1) -> None:
    conn.hincrbyfloat(f"{PREFIX}:metrics", name, amount)


def metrics(conn: redis.Redis) -> dict[str, float]:
    return {k.decode(): float(v) for k, v in conn.hgetall(f"{PREFIX}:metrics").items()}
