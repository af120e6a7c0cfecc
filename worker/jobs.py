"""Job functions the RQ workers run (enqueued by name from the web process and `prelabel`).

Each job is one task: fetch its image, get the image index (memory, Redis or built), answer each
expression, turn masks into Label Studio results, and deliver them: return them, and for a task's
prediction store them for the delivery ledger (backend.delivery), writing them to Label Studio
when the task was handed off to this job.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass

import httpx
import numpy as np
import redis
from rq import get_current_job

from backend import delivery
from backend import jobspec as js
from backend import queue as q
from backend.config import ServeSettings
from backend.imagefetch import CLOUD_SCHEMES, ImageFetcher
from backend.labeling import LabelConfigError, parse_label_config
from backend.labelstudio import FetchPolicy, LabelStudioError, client_from
from backend.results import prediction, region_results
from worker.cache import IndexCache
from worker.hybridgl.images import ImageError, load_image
from worker.prefetch import Prefetcher

log = logging.getLogger(__name__)
# httpx logs each request's full URL at INFO: image URLs may carry secrets (presigned signatures, SAS
# tokens) that our own messages leave out. Failures are reported, without them, by the job's reason.
logging.getLogger("httpx").setLevel(logging.WARNING)

LABEL_STUDIO_PROBLEM = "labelstudio"  # /health's entry while workers cannot reach Label Studio
LABEL_STUDIO_PROBLEM_SECONDS = 300  # reported until a job reaches it again, or this long after the last failure
MEMORY_PROBLEM_SECONDS = 15 * 60  # how long /health mentions a job that ran out of memory


class JobFailed(Exception):
    """A job that cannot succeed as asked; the message tells the user why (no retry)."""


@dataclass
class Runtime:
    settings: ServeSettings
    conn: redis.Redis
    pipeline: object  # worker.hybridgl.pipeline.HybridGL
    cache: IndexCache
    prefetch: Prefetcher | None = None  # the next job's image, fetched while this one runs (worker.prefetch)

    @classmethod
    def create(cls, settings: ServeSettings | None = None, pipeline=None) -> "Runtime":
        from worker.hybridgl.pipeline import HybridGL

        settings = settings or ServeSettings.from_env()
        conn = q.connect(settings.redis_url)
        cache_conn = q.connect(settings.cache_url) if settings.cache_url else conn
        pipeline = pipeline or HybridGL()
        cache = IndexCache(pipeline, conn, cache_conn, memory_bytes=settings.memory_index_bytes,
                           index_bytes=settings.index_cache_bytes, embedding_bytes=settings.embedding_cache_bytes,
                           ttl=settings.index_ttl)
        return cls(settings, conn, pipeline, cache, Prefetcher(prefetch_image) if settings.prefetch else None)

    def labelstudio_access(self, payload: dict):
        """(client or None, why there is none): LABEL_STUDIO_URL with LABEL_STUDIO_API_KEY (else /setup's
        token), or else the address and token an authenticated /setup pinned (see backend.labelstudio.client_from
        and backend.queue.save_setup)."""
        s = self.settings
        hostname = token = problem = None
        project = payload.get("project")
        if project is not None and not (s.label_studio_url and s.label_studio_api_key):
            hostname, token, problem = q.load_setup(self.conn, project, s.secret_key)
        client = client_from(s.label_studio_url or None, s.label_studio_api_key or None, hostname, token,
                             policy=self.fetch_policy(), transport=DeadlineTransport(s.image_fetch_timeout))
        if client is not None:
            return client, None
        if not (s.label_studio_url or hostname):
            return None, ("Label Studio's address is unknown; set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY on "
                          "the workers")
        if not s.label_studio_url and s.label_studio_api_key and not problem:
            return None, ("LABEL_STUDIO_API_KEY is only sent to LABEL_STUDIO_URL, which is unset on the workers "
                          "(never to an address /setup named); set LABEL_STUDIO_URL to Label Studio's address")
        return None, problem or ("the workers have no Label Studio token; set LABEL_STUDIO_API_KEY on the "
                                 "workers")

    def fetch_policy(self) -> FetchPolicy:
        return FetchPolicy.from_settings(self.settings)


class DeadlineTransport(httpx.BaseTransport):
    """httpx's timeouts bound each connect and each read; this also bounds a whole response, so that
    a host dripping a byte at a time cannot hold a worker until the job's time limit."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        deadline = time.monotonic() + self.seconds
        response = self._inner.handle_request(request)
        return httpx.Response(response.status_code, headers=response.headers, extensions=response.extensions,
                              stream=_DeadlineStream(response.stream, deadline, self.seconds, request))

    def close(self) -> None:
        self._inner.close()


class _DeadlineStream(httpx.SyncByteStream):
    def __init__(self, inner, deadline: float, seconds: float, request: httpx.Request):
        self._inner, self._deadline, self._seconds, self._request = inner, deadline, seconds, request

    def __iter__(self):
        for chunk in self._inner:
            if time.monotonic() > self._deadline:
                raise httpx.ReadTimeout(f"the response took longer than {self._seconds:g} s", request=self._request)
            yield chunk

    def close(self) -> None:
        self._inner.close()


_runtime: Runtime | None = None


def runtime() -> Runtime:
    """The worker's models and connections, created once per process."""
    global _runtime
    if _runtime is None:
        _runtime = Runtime.create()
    return _runtime


def set_runtime(rt: Runtime) -> None:
    global _runtime
    _runtime = rt


def _fail(message: str) -> JobFailed:
    job = get_current_job()
    if job is not None:
        job.retries_left = 0  # retrying cannot fix bad input
    return JobFailed(message)


def _is_transient(exc: BaseException) -> bool:
    return bool(getattr(exc, "transient", False)) or isinstance(exc, (redis.ConnectionError, redis.TimeoutError,
                                                                      ConnectionError, TimeoutError))


def _load_task_image(rt: Runtime, payload: dict, prefetched: bool = True):
    """(decoded image, Label Studio client); the caller closes the client (None when unknown).
    ``prefetched``: take the image the worker fetched while the previous job ran, if it did."""
    client, missing = rt.labelstudio_access(payload)
    rgb = rt.prefetch.take(payload) if prefetched and rt.prefetch is not None else None
    if rgb is not None:
        _count(rt, payload.get("task_id"), "images_prefetched")
        return rgb, client
    ref = payload["image"]
    fetcher = client
    try:
        if fetcher is None:
            if _needs_labelstudio(ref):
                raise _fail(f"cannot fetch {ref[:200]!r}: {missing}")
            # Absolute URLs: allow-listed hosts need no Label Studio; other schemes are refused with their reason.
            fetcher = ImageFetcher("", None, rt.fetch_policy(),
                                   transport=DeadlineTransport(rt.settings.image_fetch_timeout))
            data = fetcher.fetch(ref, payload.get("task_id"))
        else:
            data = fetcher.fetch_image(ref, payload.get("task_id"))
        rgb = load_image(data, max_pixels=rt.settings.image_max_pixels)
    except LabelStudioError as exc:
        _close(fetcher)
        if exc.transient:
            raise
        raise _fail(str(exc)) from None
    except ImageError as exc:
        _close(fetcher)
        raise _fail(f"task {payload.get('task_id')}: {exc}") from None
    except BaseException:
        _close(fetcher)
        raise
    if fetcher is not client:
        _close(fetcher)
    return rgb, client


def prefetch_image(payload: dict):
    """The decoded image of a job not yet taken (the prefetch thread; see worker.prefetch)."""
    rgb, client = _load_task_image(runtime(), payload, prefetched=False)
    _close(client)
    return rgb


def _close(client) -> None:
    if client is not None:
        client.close()


def _needs_labelstudio(ref: str) -> bool:
    """Paths relative to Label Studio (/data/...) and cloud URIs, which Label Studio presigns."""
    scheme = ref.split(":", 1)[0].lower() if ":" in ref else ""
    return (ref.startswith(("/", "\\")) and not ref.startswith("//")) or scheme in CLOUD_SCHEMES


def predict(payload: dict) -> dict:
    """One task's prediction. Returns {"task_id", "prediction", "index"}."""
    rt = runtime()
    started = time.perf_counter()
    task_id = payload.get("task_id")
    client = None
    try:
        label_config = js.load_label_config(rt.conn, str(payload.get("label_config_digest")))
        if label_config is None:
            raise _fail(f"task {task_id}: this job's label config is no longer in Redis (kept "
                        f"{js.LABEL_CONFIG_TTL // 86400} days after its last use): ask for the prediction again")
        try:
            config = parse_label_config(label_config)
        except LabelConfigError as exc:
            raise _fail(str(exc)) from None
        rgb, client = _load_task_image(rt, payload)
        index, source = _index(rt, rgb, task_id, need_embedding=bool(payload.get("clicks")),
                               keep_embedding=config.interactive)
        pipeline = rt.pipeline
        try:
            regions = answer_expressions(pipeline, index, config, payload.get("expressions", []))
        except ValueError as exc:  # empty/over-long expression, no region
            raise _fail(f"task {task_id}: {exc}") from None
        results = regions.results
        if payload.get("clicks"):
            mask, label, score = _refine(rt, index, payload)
            results += region_results(mask, label, config, score=score)
            regions.scores.append(score)
        pred = prediction(results, regions.score, pipeline.model_version)
        _deliver(rt, payload, pred, client)
        if client is not None:
            q.clear_problem(rt.conn, LABEL_STUDIO_PROBLEM)  # reached it (image or prediction): not down
    except JobFailed as exc:
        log.warning("task %s failed: %s", task_id, exc)
        _count(rt, task_id, "jobs_failed")
        raise
    except Exception as exc:
        _report_unreachable(rt, exc)
        if not _is_transient(exc):
            log.exception("task %s failed", task_id)
            job = get_current_job()
            if job is not None:
                job.retries_left = 0
        raise
    finally:
        _close(client)
        job = get_current_job()
        queue_name = js.tier(job.origin) if job is not None else "direct"
        _count(rt, task_id, f"job_seconds_sum:{queue_name}", time.perf_counter() - started)
        _count(rt, task_id, f"job_count:{queue_name}")
    return {"task_id": task_id, "prediction": pred, "index": source, "thresholds": regions.thresholds}


@dataclass
class Regions:
    """A task's regions (Label Studio results) and what scores and explains them."""

    results: list[dict]
    scores: list[float]  # one per region
    doubt: float | None  # confidence of the least sure "absent" decision of the set answers
    thresholds: dict  # label or expression -> instance threshold in force (set answers only)

    @property
    def score(self) -> float:
        """The prediction's score: its least confident region, so that sorting the Data Manager by
        prediction score shows the doubtful tasks first; without regions, the confidence that
        nothing was missed (1 - the highest probability a rejected proposal had), else 1."""
        if self.scores:
            return float(min(self.scores))
        return float(self.doubt) if self.doubt is not None else 1.0


def answer_expressions(pipeline, index, config, items: list[dict]) -> Regions:
    """Label names and plural expressions ("all the cars") get every instance, in one classification
    of the image's proposals among all of them and the config's other labels; other expressions
    get HybridGL's single choice (after the sets' regions). Raises ValueError (bad expression, no region) with the reason."""
    labels = {label.casefold(): label for label in config.labels}
    sets, singles = [], []
    for item in items:
        text = item["text"]
        if text.strip().casefold() in labels or pipeline.parse(text).asks_for_set:
            sets.append(item)
        else:
            singles.append(item)
    out = Regions([], [], None, {})
    default = pipeline.settings.instance_threshold
    if sets:
        targets = [item["text"] for item in sets]
        # The targets' own labels are not competitors: "all the cars" labelled car must not split with "car".
        asked = {str(item.get("label") or item["text"]).strip().casefold() for item in sets}
        others = [label for label in config.labels if label.strip() and label.casefold() not in asked]
        thresholds = []
        for item in sets:
            own = config.threshold_for(item.get("label")) if item.get("label") else None
            if own is None:
                own = config.threshold_for(labels.get(item["text"].strip().casefold()))
            thresholds.append(default if own is None else own)
        answer = pipeline.instances(index, targets, others, thresholds)
        out.thresholds = dict(zip(targets, thresholds))
        out.doubt = answer.doubt
        for found in answer.instances:
            item = sets[found.target]
            out.results += region_results(index.masks[found.index].numpy(), item.get("label"), config,
                                          score=found.score)
            out.scores.append(found.score)
    for item in singles:
        answer = pipeline.query(index, item["text"])
        out.results += region_results(answer.mask, item.get("label"), config, score=answer.score)
        out.scores.append(answer.score)
    return out


def _count(rt: Runtime, task_id, name: str, amount: float = 1) -> None:
    """Count for /metrics; a Redis error loses the sample, never the job's outcome (or its real failure)."""
    try:
        q.count(rt.conn, name, amount)
    except redis.RedisError as exc:
        log.warning("task %s: could not count %s for /metrics: %s", task_id, name, exc)


def _index(rt: Runtime, rgb: np.ndarray, task_id, need_embedding: bool = False, keep_embedding: bool = False):
    """The image's index (cached or built). Running out of memory empties the worker's index cache and
    tries once more; a second time fails the job, without retry, with the reason. The worker frees what
    the attempts held and goes on with the next job."""
    for attempt in (1, 2):
        try:
            return rt.cache.get(rgb, need_embedding=need_embedding, keep_embedding=keep_embedding)
        except Exception as exc:  # noqa: BLE001 - only memory errors are handled here
            if not _is_out_of_memory(exc):
                raise
            asked = re.search(r"allocate (\d+) bytes|allocate ([\d.]+ [KMGT]i?B)", str(exc))
            detail = ("allocating " + (f"{int(asked[1]) / 2**20:.0f} MiB" if asked[1] else asked[2])
                      + " more failed" if asked else type(exc).__name__)
        # Outside the handler, so that the traceback (and the tensors its frames hold) is gone first.
        if attempt == 1:
            held = rt.cache.memory.bytes
            rt.cache.memory.clear()
            log.warning("task %s: out of memory (%s) with %d MiB of indexes cached in memory: emptied that cache, "
                        "trying again", task_id, detail, held // 2**20)
            _count(rt, task_id, "index_oom_retries")
        _free_memory(rt)
    h, w = rgb.shape[:2]
    budget = f"HYBRIDGL_JOB_MEMORY={rt.settings.job_memory} MiB" if rt.settings.job_memory else "the host's memory"
    job = get_current_job()
    worker = (job.worker_name if job is not None else None) or "a worker"
    q.report_problem(rt.conn, f"memory:{worker}", (
        f"{worker} ran out of memory on task {task_id} ({w}x{h} image, {budget}): lower IMAGE_MAX_PIXELS to refuse "
        "such images up front, or give workers more memory"), MEMORY_PROBLEM_SECONDS)
    raise _fail(f"task {task_id}: out of memory while processing its {w}x{h} image ({budget}; {detail}; also with "
                "the worker's index cache emptied): lower IMAGE_MAX_PIXELS so that such images are refused up "
                "front, or give the workers more memory (HYBRIDGL_JOB_MEMORY) and run the task again")


def _is_out_of_memory(exc: BaseException) -> bool:
    """numpy's MemoryError, torch's CPU allocator failing (RuntimeError) and CUDA's OutOfMemoryError."""
    text = str(exc)
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower() or "OutOfMemory" in type(exc).__name__))


def _free_memory(rt: Runtime) -> None:
    import gc

    gc.collect()
    device = getattr(getattr(rt.pipeline, "models", None), "device", None)
    if device is not None and getattr(device, "type", "") == "cuda":
        import torch

        torch.cuda.empty_cache()


def _report_unreachable(rt: Runtime, exc: Exception) -> None:
    if isinstance(exc, LabelStudioError) and exc.unreachable:
        try:
            q.report_problem(rt.conn, LABEL_STUDIO_PROBLEM, f"workers cannot reach Label Studio: {exc}; jobs are "
                             "retried (HYBRIDGL_JOB_RETRIES), then fail with this reason", LABEL_STUDIO_PROBLEM_SECONDS)
        except redis.RedisError:
            pass


def _refine(rt: Runtime, index, payload: dict):
    """(mask, label, SAM's quality estimate): the clicks since the current prompt was typed correct that
    prompt's mask (backend.interaction keeps them; Label Studio sends only the latest click)."""
    from worker.hybridgl.refine import refine_mask

    h, w = index.image_size
    clicks = payload["clicks"]
    points = np.array([[c["x"] * w / 100.0, c["y"] * h / 100.0] for c in clicks])
    labels = np.array([1 if c.get("positive", True) else 0 for c in clicks])
    label = next((c.get("label") for c in clicks if c.get("label")), None)
    previous = None
    prompt = payload.get("refine")
    try:
        if prompt:  # the prompt's own mask, found again (on an indexed image that is text encoding only)
            previous = index.masks[rt.pipeline.query(index, prompt["text"]).chosen].numpy()
            label = prompt.get("label") or label
        mask, score = refine_mask(rt.pipeline.models.sam, index, points, labels, previous)
    except ValueError as exc:
        raise _fail(f"task {payload.get('task_id')}: {exc}") from None
    return mask, label, score


def _deliver(rt: Runtime, payload: dict, pred: dict, client) -> None:
    """Store the answer for the ledger; write it to Label Studio when the task was handed off to this job."""
    job = get_current_job()
    if payload.get("deliver") != js.Delivery.LEDGER.value or job is None:
        return  # interactive: the answer goes back in the HTTP response only
    key = delivery.entry_key(payload.get("project"), payload["task_id"], str(payload.get("model_version")))
    ledger = delivery.Ledger(rt.conn, rt.settings.result_ttl)
    if not ledger.finish(key, job.id, pred):
        return  # a /predict response (or prelabel) delivers it, or already did
    write_prediction(client, payload["task_id"], pred)
    ledger.written(key, job.id)
    _count(rt, payload["task_id"], "predictions_written")


def write_prediction(client, task_id: int, pred: dict) -> None:
    """Create the prediction unless this task already has one of this model version (a write retried
    after the worker died between the ledger's decision and Label Studio's answer)."""
    if client is None:
        raise _fail("cannot write the prediction: Label Studio's address or token is unknown; set LABEL_STUDIO_URL "
                    "and LABEL_STUDIO_API_KEY on the workers (see GET /health)")
    if client.has_prediction(task_id, pred["model_version"]):
        return
    client.create_prediction(task_id, pred["result"], pred.get("score"), pred["model_version"])


def warm(payload: dict) -> dict:
    """Build (or find) an image's index ahead of the first prompt, unless the shared cache is full of
    entries used within HYBRIDGL_WARMUP_PROTECT_SECONDS (then skipped and counted: a guess must not
    evict what people use)."""
    rt = runtime()
    if rt.cache.full_of_recent(rt.settings.warmup_protect_seconds):
        _count(rt, payload.get("task_id"), "warmups_skipped")
        return {"task_id": payload.get("task_id"), "index": "skipped", "masks": None}
    try:
        rgb, client = _load_task_image(rt, payload)
    except LabelStudioError as exc:
        _report_unreachable(rt, exc)
        raise
    _close(client)
    index, source = _index(rt, rgb, payload.get("task_id"), keep_embedding=bool(payload.get("interactive")))
    return {"task_id": payload.get("task_id"), "index": source, "masks": len(index)}
