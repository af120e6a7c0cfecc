"""What a job is: the one place that names the job functions and builds their payloads and ids.

Every flow that asks for a prediction (/predict in either mode, the warm-up of a task open or a
webhook, `hybridgl prelabel`) builds its job here, so that two flows asking for the same answer
build the same job id and join one job instead of running (and delivering) it twice.

A job id is a digest of everything that changes the answer: the kind of job, the model version,
the project, the task, the image reference, the expressions and clicks, and the parts of the label
config that shape the result (image tag, output tags with their names, types and labels). An edited
task or config therefore never joins a job of the old one.

The label config itself is not copied into every payload: it is stored once in Redis under the
SHA-256 of its text (``label-config:<digest>``) and the payload carries the digest. Each use refreshes
its TTL, which outlives a job's queueing, its run and its retries. Payloads hold only JSON types.

Light like the rest of ``backend``: no torch, nothing from ``worker``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

import redis

from backend.labeling import LabelingConfig

PREFIX = "hybridgl"
PREDICT_JOB = "worker.jobs.predict"
WARM_JOB = "worker.jobs.warm"
INTERACTIVE, BATCH, WARMUP = "interactive", "batch", "warmup"
QUEUES = (INTERACTIVE, BATCH, WARMUP)  # the tiers, in the order workers serve them
# Batch work has one RQ queue per project (``batch-<project>``), so that workers can take the projects
# in turn (worker.runner) instead of one project's big batch holding everyone else's behind it.
BATCH_QUEUE_PREFIX = f"{BATCH}-"
# A stored label config outlives any job that names it: a week covers a long prelabel queue plus retries.
LABEL_CONFIG_TTL = 7 * 24 * 3600


class Delivery(str, Enum):
    """How a prediction job's answer reaches Label Studio."""

    RETURN = "return"  # interactive: only in the HTTP response (a suggestion, not a saved prediction)
    LEDGER = "ledger"  # a task's prediction: delivered once, as backend.delivery's ledger decides


@dataclass(frozen=True)
class JobSpec:
    queue: str
    func: str
    payload: dict
    job_id: str
    description: str


def project_id(project: Any) -> str:
    """The bare project id of a project key ('<id>.<created timestamp>' or '<id>'): for what people
    read (queue names, batches, metrics)."""
    return str(project).split(".", 1)[0] if project is not None else ""


def project_key(project: Any) -> str:
    """A project as Redis state keys it (job ids, the delivery ledger, interactive state): Label
    Studio's '<id>.<created timestamp>' uid, which /predict and /setup carry and prelabel builds with
    :func:`project_uid`. Two Label Studio instances sharing these workers (staging and production, or
    one reinstalled) both have a project 1 with a task 1; the timestamp keeps their jobs and deliveries
    apart. Where only the bare id is known, it is the key."""
    return str(project) if project is not None else ""


def project_uid(project: dict) -> str | None:
    """Label Studio's '<id>.<created timestamp>' uid of a project as its API (or a webhook) shows it:
    ``int(created_at.timestamp())``, as Label Studio computes it for /predict; None without ``created_at``."""
    from datetime import datetime

    created = project.get("created_at")
    if project.get("id") is None or not created:
        return None
    try:
        stamp = int(datetime.fromisoformat(str(created).replace("Z", "+00:00")).timestamp())
    except (ValueError, OverflowError, OSError):
        return None
    return f"{project['id']}.{stamp}"


def batch_queue(project: Any) -> str:
    """The batch queue of a project. A project id that is not a plain name (it comes from requests) is
    replaced by a digest, so that a queue name never carries odd characters into Redis keys."""
    pid = project_id(project) or "none"
    if not re.fullmatch(r"[A-Za-z0-9_]{1,40}", pid):
        pid = "x" + hashlib.sha256(pid.encode()).hexdigest()[:16]
    return BATCH_QUEUE_PREFIX + pid


def tier(queue_name: str) -> str:
    """The tier a queue belongs to: ``batch`` for every project's batch queue, else its own name."""
    return BATCH if queue_name.startswith(BATCH_QUEUE_PREFIX) else queue_name


def config_text_digest(label_config: str) -> str:
    return hashlib.sha256(label_config.encode()).hexdigest()


def shaping_digest(config: LabelingConfig) -> str:
    """Digest of what in a label config shapes a result: the image tag and the output tags (a header or
    a colour changes nothing; a renamed tag or an added label does)."""
    parts = [config.image_tag, config.image_key,
             [[o.name, o.to_name, o.result_type, list(o.labels)] for o in config.outputs]]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def label_config_key(digest: str) -> str:
    return f"{PREFIX}:label-config:{digest}"


def store_label_config(conn: redis.Redis, label_config: str) -> str:
    """Keep the config under its digest (refreshing its TTL) and return the digest."""
    digest = config_text_digest(label_config)
    conn.set(label_config_key(digest), label_config, ex=LABEL_CONFIG_TTL)
    return digest


def load_label_config(conn: redis.Redis, digest: str) -> str | None:
    """The stored config (its TTL refreshed), or None when it expired."""
    value = conn.getex(label_config_key(digest), ex=LABEL_CONFIG_TTL)
    return value.decode() if value is not None else None


def _job_id(kind: str, parts: list) -> str:
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return f"{kind}-{digest}"


def prediction_job(*, model_version: str | None, project: Any, task_id: Any, image: str | None,
                   expressions: list[dict], clicks: list[dict], config: LabelingConfig, config_digest: str,
                   interactive: bool, origin: str, refine: dict | None = None) -> JobSpec:
    """The job that predicts one task, for every flow. ``origin`` only describes it (web, prelabel).

    Interactive jobs (a typed prompt, clicks) return a suggestion; the others deliver the task's
    prediction through the ledger, whichever flow enqueued them first. ``refine`` is the prompt
    (text, label) whose mask the clicks correct (see backend.interaction).
    """
    delivery = Delivery.RETURN if interactive else Delivery.LEDGER
    payload = {"task_id": task_id, "project": project, "image": image, "label_config_digest": config_digest,
               "expressions": expressions, "clicks": clicks, "refine": refine, "deliver": delivery.value,
               "model_version": model_version}
    kind = "interactive" if interactive else "predict"
    job_id = _job_id(kind, [model_version, project_key(project), task_id, image, expressions, clicks, refine,
                            shaping_digest(config)])
    return JobSpec(INTERACTIVE if interactive else batch_queue(project), PREDICT_JOB, payload, job_id,
                   f"{'interactive' if interactive else 'predict'} task {task_id} ({origin})")


def warm_job(*, project: Any, task_id: Any, image: str, interactive: bool = False) -> JobSpec:
    """Build an image's index ahead of the first prompt (one job per image and project); ``interactive``:
    the config takes clicks, so SAM's embedding is shared too."""
    return JobSpec(WARMUP, WARM_JOB, {"task_id": task_id, "project": project, "image": image,
                                      "interactive": interactive},
                   _job_id("warm", [image, project_key(project)]), f"warm-up task {task_id}")
