"""The web process: Label Studio's ML-backend protocol, job status and metrics.

It never loads a model (no torch import): requests become RQ jobs that workers run. /health and
/setup only read Redis, so they answer in milliseconds whatever the workers are doing.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from rq.exceptions import NoSuchJobError
from starlette.exceptions import HTTPException as StarletteHTTPException

from backend import batches, cache_store, delivery, interaction
from backend import jobspec as js
from backend import queue as q
from backend.access import AccessGuard
from backend.config import ServeSettings
from backend.labeling import LabelConfigError, LabelingConfig, parse_label_config
from backend.labelstudio import prediction_versions
from backend.prompts import PredictionRequest, PromptError, build_request
from backend.protocol import (
    ErrorResponse,
    HealthResponse,
    JobStatusResponse,
    PredictRequest,
    PredictResponse,
    SetupRequest,
    SetupResponse,
    WebhookRequest,
    WebhookResponse,
)

log = logging.getLogger("hybridgl.backend")
PROVISIONAL_VERSION = "hybridgl-waiting-for-worker"
# /predict waits on at most this many of its first jobs (workers take them in order); the others of a
# big selection are handed off at once, so that waiting costs the same whatever the selection's size.
BATCH_WAITED = 256
ASSUMED_ENTRY_BYTES = 2**20  # an index's size in the shared cache before any is there to measure (README table)


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def create_app(settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings.from_env()
    conn = q.connect(settings.redis_url)
    # /health must stay fast even when Redis hangs: its own connection with short timeouts.
    health_conn = q.connect(settings.redis_url, socket_connect_timeout=0.3, socket_timeout=0.3, health_check_interval=0)
    cache_conn = q.connect(settings.cache_url) if settings.cache_url else conn
    cache_health_conn = (q.connect(settings.cache_url, socket_connect_timeout=0.3, socket_timeout=0.3, health_check_interval=0)
                         if settings.cache_url else health_conn)
    jobs = q.JobQueue(conn, settings.job_timeout, settings.result_ttl, settings.job_retries)
    ledger = delivery.Ledger(conn, settings.result_ttl)
    app = FastAPI(title="HybridGL ML backend for Label Studio", version="0.1.0",
                  description="Text-prompted segmentation (HybridGL: SAM + CLIP) served to Label Studio.",
                  responses={401: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
                             503: {"model": ErrorResponse}, 504: {"model": ErrorResponse}})
    app.state.settings = settings
    app.state.conn = conn

    # --- errors: always JSON {"error": "..."} ---------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return JSONResponse({"error": exc.message}, status_code=exc.status,
                            headers={"WWW-Authenticate": "Basic"} if exc.status == 401 else None)

    async def _bad_input(_: Request, exc: Exception):
        return JSONResponse({"error": str(exc)}, status_code=422)

    app.add_exception_handler(LabelConfigError, _bad_input)
    app.add_exception_handler(PromptError, _bad_input)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors()[:5]:
            if err.get("type") == "json_invalid":  # loc = ("body", <character offset>)
                offset = err.get("loc", ("body", "?"))[-1]
                reason = (err.get("ctx") or {}).get("error") or "JSON decode error"
                parts.append(f"the body is not valid JSON ({reason} at character {offset}): send a JSON object "
                             "such as {\"tasks\": [...], \"label_config\": \"<View>...</View>\"}")
                continue
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            parts.append(f"{where}: {err.get('msg')}")
        return JSONResponse({"error": "invalid request: " + "; ".join(parts)}, status_code=422)

    @app.exception_handler(redis.RedisError)
    async def _redis_down(_: Request, exc: redis.RedisError):
        log.error("Redis error: %s", exc)
        return JSONResponse({"error": f"the job queue (Redis) is unreachable: {type(exc).__name__}; check that "
                                      "Redis runs and REDIS_URL points at it"}, status_code=503)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        if exc.status_code == 400 and "parsing the body" in str(exc.detail):
            # FastAPI's answer to bodies json cannot read (bad UTF-8, nesting too deep): a 422 like any bad body
            return JSONResponse({"error": "invalid request: the body could not be parsed: send UTF-8 encoded "
                                          "JSON of reasonable depth"}, status_code=422)
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        # A bug: logged with its traceback; the client gets JSON without internals (they may hold secrets).
        log.error("unhandled error: %s", type(exc).__name__, exc_info=exc)
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); the backend's log has the details"},
                            status_code=500)

    # --- auth and body size: with BASIC_AUTH_USER set, every path (/docs and /openapi.json too) needs it
    app.add_middleware(AccessGuard, settings=settings)

    def model_version() -> str:
        return q.current_model_version(conn) or PROVISIONAL_VERSION

    # --- protocol ------------------------------------------------------------------------------
    @app.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def health():
        problems: list[str] = []
        try:
            state = q.snapshot(health_conn)
        except redis.RedisError as exc:
            body = HealthResponse(status="DOWN", redis=f"unreachable ({type(exc).__name__})",
                                  problems=["Redis is unreachable: no job can run until it is back"])
            return JSONResponse(body.model_dump(), status_code=503)
        workers, version = state.workers, state.model_version
        tokenless = [] if settings.label_studio_url and settings.label_studio_api_key else state.tokenless
        if not workers:
            problems.append("no worker is running: jobs wait in the queue until `hybridgl worker` starts")
        if tokenless:
            problems.append(f"{q.TOKEN_WITHHELD}; Label Studio sent a token in /setup for project(s) "
                            f"{', '.join(tokenless[:5])} but it is not kept in Redis without a secret key")
        versions = {w.get("model_version") for w in workers}
        if len(versions) > 1:
            problems.append(f"workers run different model versions: {sorted(versions)}")
        problems += state.problems  # what workers saw: Label Studio unreachable, a worker died, ...
        try:
            cache = {name: figures.to_dict() for name, figures in cache_store.read_stats(cache_health_conn).items()}
        except redis.RedisError as exc:
            cache = {}
            problems.append(f"the image-index cache's Redis (HYBRIDGL_CACHE_URL) is unreachable "
                            f"({type(exc).__name__}): workers build every index anew until it is back")
        return HealthResponse(status="DEGRADED" if problems else "UP", model_version=version, redis="ok",
                              workers=workers, queues=state.depths, problems=problems, cache=cache)

    @app.post("/setup", response_model=SetupResponse, responses={409: {"model": ErrorResponse}})
    def setup(body: SetupRequest):
        """A plain function: FastAPI runs it in its thread pool, off the event loop (it parses XML, reads Redis)."""
        if body.schema_:
            parse_label_config(body.schema_)  # a config we cannot serve fails here, visibly
        # Kept for the workers only from a /setup that passed the Basic auth (an open /setup would let anyone
        # name the host tokens go to), and only what LABEL_STUDIO_URL / _API_KEY leave open (a key without a
        # URL goes nowhere: then the token is /setup's). The token is kept only encrypted
        # (HYBRIDGL_SECRET_KEY); the first /setup of a project pins its address.
        if body.project and settings.basic_auth is not None and not (settings.label_studio_url
                                                                      and settings.label_studio_api_key):
            hostname = None if settings.label_studio_url else body.hostname
            if hostname or body.access_token:
                try:
                    q.save_setup(conn, body.project, hostname, body.access_token, settings.secret_key)
                except q.SetupPinned as exc:
                    log.warning("/setup refused: %s", exc)
                    raise ApiError(409, str(exc)) from None
        return SetupResponse(model_version=model_version())

    @app.post("/predict", response_model=PredictResponse)
    def predict(body: PredictRequest):
        if not body.tasks:
            raise ApiError(422, "invalid request: tasks is empty; send at least one task")
        config = parse_label_config(body.label_config)
        context = body.params.context
        if context and context.get("result"):
            return {"results": [_interactive(body, config, context)]}
        return {"results": _batch(body, config)}

    def _prediction_job(req: PredictionRequest, body: PredictRequest, config: LabelingConfig, digest: str,
                        version: str, interactive: bool) -> js.JobSpec:
        expressions = [{"text": e.text, "label": e.label} for e in req.expressions]
        clicks = [{"x": c.x, "y": c.y, "positive": c.positive, "label": c.label} for c in req.clicks]
        refine = None
        if interactive and expressions:
            interaction.start_prompt(conn, body.project, req.task_id, expressions[0])
        if interactive and clicks:  # they add to the clicks on the current prompt's suggestion
            refine, clicks = interaction.add_clicks(conn, body.project, req.task_id, clicks)
        return js.prediction_job(
            model_version=version, project=body.project, task_id=req.task_id, image=req.image,
            expressions=expressions, clicks=clicks, refine=refine, config=config, config_digest=digest,
            interactive=interactive, origin="web")

    def _interactive(body: PredictRequest, config: LabelingConfig, context: dict) -> Any:
        req = build_request(body.tasks[0], context, config, label_names_as_prompts=settings.label_names_policy())
        if not req.expressions and not req.clicks:
            if any(isinstance(r, dict) and str(r.get("type", "")).lower() == "textarea" for r in context["result"]):
                raise ApiError(422, f"task {req.task_id}: the prompt is empty (nothing but spaces): type what to "
                                    "segment, e.g. \"the dog on the left\"")
            return []
        digest = js.store_label_config(conn, body.label_config)
        job = jobs.enqueue(_prediction_job(req, body, config, digest, model_version(), interactive=True))
        outcome = jobs.wait([job.id], time.monotonic() + settings.interactive_timeout)[job.id]
        if outcome.status == "finished":
            return outcome.value["prediction"]
        if outcome.status == "failed":
            reason, prefix = str(outcome.error), f"task {req.task_id}: "  # reasons often name the task already
            raise ApiError(422, reason if reason.startswith(prefix) else prefix + reason)
        raise ApiError(504, f"no answer within {settings.interactive_timeout:.0f} s (job {job.id}): the workers are "
                            "busy or none is running; see GET /health and GET /jobs/" + job.id)

    def _batch(body: PredictRequest, config: LabelingConfig) -> list[Any]:
        """One entry per task: its prediction when this response is the one that delivers it (the
        ledger decides), else an empty list; jobs that outlive the budget are handed off to their worker."""
        entries: list[Any] = [[] for _ in body.tasks]
        waiting: dict[int, js.JobSpec] = {}
        version = model_version()
        view = ledger.view(jobs.job_lifetime)  # the body's tasks are Label Studio's view as of now
        digest: str | None = None
        for i, task in enumerate(body.tasks):
            try:
                req = build_request(task, None, config, label_names_as_prompts=settings.label_names_policy())
            except PromptError as exc:  # one bad task must not fail the others
                log.warning("task %s skipped: %s", task.get("id"), exc)
                q.count(conn, "tasks_rejected")
                continue
            if not req.expressions:
                if config.interactive and settings.warm_on_open and req.image:
                    _warm(req.image, req.task_id, body.project, interactive=True)
                continue
            if version in prediction_versions(task):
                continue  # Label Studio has this task's prediction already
            digest = digest or js.store_label_config(conn, body.label_config)
            waiting[i] = _prediction_job(req, body, config, digest, version, interactive=False)
            jobs.enqueue(waiting[i])
        if waiting:  # a batch anyone can see (GET /batches) and cancel
            batches.add_jobs(conn, batches.create(conn, body.project, batches.PREDICT),
                             [spec.job_id for spec in waiting.values()])
        waited = [spec.job_id for spec in list(waiting.values())[:BATCH_WAITED]]
        outcomes = jobs.wait(waited, time.monotonic() + settings.batch_budget)
        for i, spec in waiting.items():
            key = delivery.entry_key(body.project, spec.payload["task_id"], version)
            outcome = outcomes.get(spec.job_id) or jobs.outcome(spec.job_id)
            answer = outcome.value["prediction"] if outcome.status == "finished" else None
            if outcome.status in ("failed", "canceled"):
                log.warning("task %s %s: %s (job %s)", body.tasks[i].get("id"), outcome.status, outcome.error,
                            spec.job_id)
                continue
            if outcome.status == "pending":
                handed = ledger.hand_off(key, spec.job_id, view)
                if handed == delivery.HANDED:
                    q.count(conn, "tasks_handed_off")  # its worker writes the prediction when the job ends
                if handed != delivery.ANSWER:
                    continue
                answer = ledger.answer(spec.job_id)  # it ended as the budget ran out
            # An answer without regions (no instance of any label) is delivered too: it is the task's
            # prediction ("nothing here", with its score), as the worker writes it after a hand-off.
            if answer and ledger.take(key, spec.job_id, view):
                entries[i] = answer
        return entries

    def _warm(image: str, task_id: Any, project: str | None, interactive: bool) -> None:
        jobs.enqueue(js.warm_job(project=project, task_id=task_id, image=image, interactive=interactive))

    def warmup_room() -> int:
        """Warm-ups worth enqueueing now: what the shared cache can hold, less those already waiting
        (more would evict each other before anyone asks), at most HYBRIDGL_WARMUP_PER_IMPORT."""
        try:
            figures = cache_store.read_stats(cache_conn)[cache_store.INDEX]
        except redis.RedisError:
            figures = cache_store.StoreStats()
        capacity = ((settings.index_cache_bytes - cache_store.STRUCTURE_BYTES)
                    // int(figures.mean_entry_bytes or ASSUMED_ENTRY_BYTES))
        return max(0, min(settings.warmup_per_import, capacity - jobs.depths()[q.WARMUP]))

    @app.post("/webhook", response_model=WebhookResponse)
    def webhook(body: WebhookRequest):
        """Label Studio gives webhooks 1 s: acknowledge; TASKS_CREATED warms the new images' indexes, as many
        as the cache has room for (the rest are counted in hybridgl_warmups_not_enqueued_total)."""
        if body.action != "TASKS_CREATED" or not body.tasks or not body.project:
            return WebhookResponse(status="ignored")
        try:
            config = parse_label_config(body.project.get("label_config") or "")
        except LabelConfigError:
            return WebhookResponse(status="ignored")
        project = body.project.get("id")
        project_uid = js.project_uid(body.project)
        images = []
        for task in body.tasks:
            data = task.get("data")
            image = data.get(config.image_key) if isinstance(data, dict) else None
            if isinstance(image, str) and image:
                images.append((image, task.get("id")))
        room = warmup_room()
        for image, task_id in images[:room]:
            _warm(image, task_id, project_uid or project, config.interactive)
        if len(images) > room:
            q.count(conn, "warmups_not_enqueued", len(images) - room)
        return WebhookResponse(status="ok", enqueued=min(room, len(images)))

    # --- operations ----------------------------------------------------------------------------
    @app.get("/jobs/{job_id}", response_model=JobStatusResponse, responses={404: {"model": ErrorResponse}})
    def job_status(job_id: str):
        shown = job_id if len(job_id) <= 100 else job_id[:97] + "..."
        try:
            job = q.fetch_job(job_id, conn)
        except NoSuchJobError:
            raise ApiError(404, f"no job {shown}: it never existed or its record expired "
                                "(HYBRIDGL_RESULT_TTL)") from None
        except ValueError:  # RQ refuses ids with characters other than letters, digits, '-' and '_'
            raise ApiError(404, f"no job {shown!r}: job ids hold only letters, digits, '-' and '_'") from None
        outcome = jobs.outcome(job_id)
        status = job.get_status(refresh=False)
        return JobStatusResponse(
            id=job_id, status=str(status.value if hasattr(status, "value") else status), queue=job.origin,
            description=job.description, reason=outcome.error if outcome.status == "failed" else None,
            result=outcome.value if outcome.status == "finished" else None,
            enqueued_at=job.enqueued_at.isoformat() if job.enqueued_at else None,
            ended_at=job.ended_at.isoformat() if job.ended_at else None)

    @app.get("/batches")
    def list_batches(project: str | None = None):
        """Every prelabel run and /predict batch still visible, oldest first (``?project=ID`` for one project)."""
        return {"batches": [b.as_dict() for b in batches.listing(conn, project)]}

    def _batch_or_404(batch_id: str) -> batches.BatchState:
        try:
            return batches.state(conn, batch_id)
        except batches.BatchNotFound:
            shown = batch_id if len(batch_id) <= 100 else batch_id[:97] + "..."
            raise ApiError(404, f"no batch {shown!r}: see GET /batches for the batches still visible (a batch is "
                                "listed until its jobs' records expire, HYBRIDGL_RESULT_TTL after they end)") from None

    @app.get("/batches/{batch_id}", responses={404: {"model": ErrorResponse}})
    def get_batch(batch_id: str):
        return _batch_or_404(batch_id).as_dict()

    @app.delete("/batches/{batch_id}", responses={404: {"model": ErrorResponse}})
    def cancel_batch(batch_id: str):
        """Remove the batch's queued jobs; running ones finish and deliver their predictions."""
        _batch_or_404(batch_id)
        removed = batches.cancel(conn, batch_id, settings.result_ttl)
        return {"canceled": removed, "batch": batches.state(conn, batch_id).as_dict()}

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics():
        return PlainTextResponse(render_metrics(conn, jobs, cache_conn), media_type="text/plain; version=0.0.4")

    return app


def render_metrics(conn: redis.Redis, jobs: q.JobQueue, cache_conn: redis.Redis | None = None) -> str:
    """Prometheus text format."""
    from rq.registry import FailedJobRegistry, StartedJobRegistry

    lines = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
            lines.append(f"{name}{{{label_text}}} {value:g}" if label_text else f"{name} {value:g}")

    counters = q.metrics(conn)
    projects = q.project_depths(conn)
    queues_of = {n: [n] for n in js.QUEUES}
    queues_of[js.BATCH] = [js.batch_queue(p) for p in projects]

    def per_tier(registry) -> list[tuple[dict, float]]:
        return [({"queue": t}, float(sum(registry(n, connection=conn).count for n in names)))
                for t, names in queues_of.items()]

    metric("hybridgl_queue_depth", "gauge", "Jobs waiting per queue (batch: every project's batch queue).",
           [({"queue": name}, float(n)) for name, n in jobs.depths().items()])
    metric("hybridgl_project_queue_depth", "gauge", "Batch jobs waiting per project (see GET /batches).",
           [({"project": p}, float(n)) for p, n in projects.items()])
    metric("hybridgl_jobs_running", "gauge", "Jobs being run per queue.", per_tier(StartedJobRegistry))
    metric("hybridgl_jobs_failed", "gauge", "Failed jobs kept per queue (see /jobs/{id} for reasons).",
           per_tier(FailedJobRegistry))
    metric("hybridgl_workers", "gauge", "Workers alive (heartbeat within a minute).",
           [({}, float(len(q.live_workers(conn))))])
    metric("hybridgl_job_seconds_sum", "counter", "Seconds spent in jobs per queue.",
           [({"queue": n}, counters.get(f"job_seconds_sum:{n}", 0.0)) for n in js.QUEUES])
    metric("hybridgl_job_seconds_count", "counter", "Jobs run per queue.",
           [({"queue": n}, counters.get(f"job_count:{n}", 0.0)) for n in js.QUEUES])
    metric("hybridgl_index_lookups_total", "counter", "Image-index lookups by where the index came from.",
           [({"source": s}, counters.get(f"index_{s}", 0.0)) for s in ("memory", "redis", "built")])
    for name, key, help_text in (
        ("hybridgl_predictions_written_total", "predictions_written", "Predictions workers wrote to Label Studio."),
        ("hybridgl_tasks_handed_off_total", "tasks_handed_off", "Tasks whose job outlived the /predict budget."),
        ("hybridgl_tasks_rejected_total", "tasks_rejected", "Tasks refused for bad input."),
        ("hybridgl_job_failures_total", "jobs_failed", "Jobs that failed for bad input."),
        ("hybridgl_warmups_skipped_total", "warmups_skipped", "Warm-ups skipped: the cache was full of recently used entries."),
        ("hybridgl_warmups_not_enqueued_total", "warmups_not_enqueued", "Imported tasks not warmed: beyond the cache's room or HYBRIDGL_WARMUP_PER_IMPORT."),
        ("hybridgl_images_prefetched_total", "images_prefetched", "Jobs whose image their worker had fetched while the previous job ran (HYBRIDGL_PREFETCH)."),
        ("hybridgl_index_oom_retries_total", "index_oom_retries", "Jobs out of memory that emptied the worker's index cache and tried again."),
    ):
        metric(name, "counter", help_text, [({}, counters.get(key, 0.0))])
    try:
        stores = cache_store.read_stats(cache_conn if cache_conn is not None else conn)
    except redis.RedisError:
        stores = {}  # the cache's own Redis is down: /health says so; the queue's figures still count
    for suffix, kind, help_text in (
        ("bytes", "gauge", "Bytes the shared cache holds per store (index, embedding)."),
        ("budget", "gauge", "Byte budget of each store (HYBRIDGL_INDEX_CACHE_BYTES, HYBRIDGL_EMBEDDING_CACHE_BYTES)."),
        ("entries", "gauge", "Entries per store."),
        ("hits", "counter", "Lookups found in the shared cache."),
        ("misses", "counter", "Lookups not found in the shared cache."),
        ("evictions", "counter", "Entries evicted to stay within the budget."),
    ):
        metric(f"hybridgl_index_cache_{suffix}" + ("_total" if kind == "counter" else ""), kind, help_text,
               [({"store": name}, float(getattr(figures, suffix))) for name, figures in stores.items()])
    return "\n".join(lines) + "\n"
