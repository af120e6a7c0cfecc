"""Settings of the serving side (web process, queue, workers' Label Studio access), from the environment.

The method's own settings are ``worker.hybridgl.settings.Settings`` (HYBRIDGL_*); these are the
ones a deployment sets around it. Light: the web process imports this.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from backend.errors import ConfigError


def _env(name: str, default: Any, help: str):
    return field(default=default, metadata={"env": name, "help": help})


@dataclass(frozen=True)
class ServeSettings:
    redis_url: str = _env("REDIS_URL", "redis://127.0.0.1:6379/0", "Redis that holds the queues and results (and the shared image-index cache unless HYBRIDGL_CACHE_URL names another).")
    label_studio_url: str = _env("LABEL_STUDIO_URL", "", "Label Studio's address, for images and for writing predictions: the only address tokens are sent to. Unset: the hostname of an authenticated /setup (Basic auth on), pinned per project, with that /setup's token only.")
    label_studio_api_key: str = _env("LABEL_STUDIO_API_KEY", "", "Legacy token or personal access token of a Label Studio user, sent only to LABEL_STUDIO_URL (else the token an authenticated /setup sends).")
    basic_auth_user: str = _env("BASIC_AUTH_USER", "", "With BASIC_AUTH_PASS: require HTTP Basic auth on every endpoint.")
    basic_auth_pass: str = _env("BASIC_AUTH_PASS", "", "Password for BASIC_AUTH_USER (`hybridgl serve` refuses an empty one and the example's).")
    max_body_bytes: int = _env("HYBRIDGL_MAX_BODY_BYTES", 32 * 2**20, "Largest request body the web process reads, in bytes (larger: HTTP 413).")
    secret_key: str = _env("HYBRIDGL_SECRET_KEY", "", "Any long random string, the same on backend and workers: encrypts the Label Studio token that /setup receives before it is kept in Redis for the workers. Unset: that token is not kept (workers then need LABEL_STUDIO_API_KEY).")
    host: str = _env("HYBRIDGL_HOST", "0.0.0.0", "Address `hybridgl serve` listens on.")
    port: int = _env("HYBRIDGL_PORT", 9090, "Port `hybridgl serve` listens on.")
    interactive_timeout: float = _env("HYBRIDGL_INTERACTIVE_TIMEOUT", 60.0, "Seconds an interactive /predict waits for its job (Label Studio gives up at 100).")
    batch_budget: float = _env("HYBRIDGL_BATCH_BUDGET", 30.0, "Seconds /predict without context waits; jobs still running then write their predictions to Label Studio themselves.")
    job_timeout: int = _env("HYBRIDGL_JOB_TIMEOUT", 600, "Seconds after which a worker abandons a job.")
    job_retries: int = _env("HYBRIDGL_JOB_RETRIES", 3, "Retries of a job that failed for a transient reason (network, Label Studio down) or whose worker died, after 2, 10, 30, then 60 s.")
    result_ttl: int = _env("HYBRIDGL_RESULT_TTL", 3600, "Seconds finished and failed jobs stay visible at /jobs/{id}.")
    cache_url: str = _env("HYBRIDGL_CACHE_URL", "", "Redis of the shared image-index cache (empty = REDIS_URL's). A Redis of its own should run with maxmemory above the cache budgets and maxmemory-policy volatile-lru (evicts the cache's values, never its bookkeeping); the queue's Redis keeps noeviction (our budgets bound the cache there).")
    index_cache_bytes: int = _env("HYBRIDGL_INDEX_CACHE_BYTES", 2**30, "Byte budget of the shared image-index cache in Redis (masks, features: what a new expression needs); least recently used entries are evicted beyond it. Size: images to keep x bytes per entry (README, Performance).")
    embedding_cache_bytes: int = _env("HYBRIDGL_EMBEDDING_CACHE_BYTES", 256 * 2**20, "Byte budget of the shared cache of SAM image embeddings (about 2 MB each, fp16), kept for interactive configs only: clicks need them.")
    index_ttl: int = _env("HYBRIDGL_INDEX_TTL", 7 * 24 * 3600, "Seconds an unused entry stays in the shared cache (each use starts the count again).")
    memory_index_bytes: int = _env("HYBRIDGL_MEMORY_INDEX_BYTES", 512 * 2**20, "Bytes of image indexes each worker keeps in memory (LRU; full-resolution masks take a byte per pixel per mask: 240 MB for 30 masks on an 8-megapixel photo). Counted in HYBRIDGL_JOB_MEMORY: keep it well below.")
    warmup_per_import: int = _env("HYBRIDGL_WARMUP_PER_IMPORT", 1000, "Most warm-up jobs one import (TASKS_CREATED webhook) enqueues; the shared cache's capacity bounds them too.")
    warmup_protect_seconds: float = _env("HYBRIDGL_WARMUP_PROTECT_SECONDS", 3600.0, "A warm-up is skipped (and counted) when its index would evict a cache entry used within this many seconds.")
    label_names_as_prompts: str = _env("HYBRIDGL_LABEL_NAMES_AS_PROMPTS", "auto", "Use label names as expressions when a task has no prompt: auto (not for interactive configs), true, false.")
    warm_on_open: bool = _env("HYBRIDGL_WARM_ON_OPEN", True, "Build an image's index when an annotator opens its task in an interactive config.")
    image_allowed_hosts: str = _env("IMAGE_ALLOWED_HOSTS", "", "Comma-separated hosts (or *.domain) images may be fetched from besides Label Studio.")
    image_allow_private: bool = _env("IMAGE_ALLOW_PRIVATE", False, "Let allow-listed hosts resolve to private or loopback addresses (Label Studio's own host always may).")
    image_max_bytes: int = _env("IMAGE_MAX_BYTES", 50 * 2**20, "Largest image download accepted, in bytes.")
    image_max_pixels: int = _env("IMAGE_MAX_PIXELS", 50_000_000, "Largest image accepted, in pixels (decompression-bomb guard).")
    image_fetch_timeout: float = _env("IMAGE_FETCH_TIMEOUT", 30.0, "Seconds a worker gives an image host to connect, to send each chunk, and to deliver a whole image.")
    torch_threads: int = _env("HYBRIDGL_TORCH_THREADS", 0, "CPU threads a worker's torch uses (0 = torch's default, all cores).")
    job_memory: int = _env("HYBRIDGL_JOB_MEMORY", 0, "MiB of memory a worker may allocate beyond what it holds once its models are loaded (Linux: RLIMIT_DATA; 0 = no limit). A job whose image needs more fails with 'out of memory' and the worker goes on, instead of the kernel killing it. Covers the in-memory index cache too.")
    prefetch: bool = _env("HYBRIDGL_PREFETCH", True, "While a worker runs a job, it downloads and decodes the image of the job it will most likely take next (at most two images held: 3 bytes x IMAGE_MAX_PIXELS each), so that it does not wait on the image host between jobs.")
    worker_heartbeat: float = _env("HYBRIDGL_WORKER_HEARTBEAT", 10.0, "Seconds between a worker's heartbeats. A worker silent for 3 of them is taken as dead: another worker retries the job it was running.")
    project_max_queued: int = _env("HYBRIDGL_PROJECT_MAX_QUEUED", 0, "Most batch jobs one project may have queued: `hybridgl prelabel` enqueues more only as the workers take them (0 = no cap). Keeps a huge run from filling Redis with job records; other projects are served in turn either way.")
    worker_queues: str = _env("HYBRIDGL_QUEUES", "interactive,batch,warmup", "Queues a worker listens on, highest priority first; batch stands for every project's batch queue, taken in turn.")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "ServeSettings":
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is None or raw == "":
                continue
            kind = type(f.default)
            try:
                if kind is bool:
                    word = raw.strip().lower()
                    if word not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                        raise ValueError
                    values[f.name] = word in ("1", "true", "yes", "on")
                else:
                    values[f.name] = kind(raw)
            except ValueError:
                raise ConfigError(f"{f.metadata['env']}={raw!r} is not a valid {kind.__name__}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def basic_auth(self) -> tuple[str, str] | None:
        return (self.basic_auth_user, self.basic_auth_pass) if self.basic_auth_user else None

    @property
    def allowed_hosts(self) -> tuple[str, ...]:
        return tuple(h.strip() for h in self.image_allowed_hosts.split(",") if h.strip())

    @property
    def queues(self) -> tuple[str, ...]:
        return tuple(q.strip() for q in self.worker_queues.split(",") if q.strip())

    def label_names_policy(self) -> bool | None:
        """None = decide per config (auto)."""
        value = self.label_names_as_prompts.strip().lower()
        return None if value == "auto" else value in ("1", "true", "yes", "on")


def serve_fields() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(ServeSettings)
