"""`hybridgl worker`: one RQ worker process that loads the models once and keeps them.

RQ's default worker forks a child per job, which would reload the models every time and break
CUDA; ``SimpleWorker`` runs jobs in this process, with RQ's job timeouts (SIGALRM) still applied.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

from rq import Queue, SimpleWorker

from backend import queue as q
from backend.config import ServeSettings

log = logging.getLogger(__name__)
HEARTBEAT_SECONDS = 20


def run_worker(serve: ServeSettings, method_settings, name: str | None = None, burst: bool = False) -> int:
    import torch

    from worker import jobs
    from worker.hybridgl.pipeline import HybridGL

    if serve.torch_threads > 0:
        torch.set_num_threads(serve.torch_threads)
    conn = q.connect(serve.redis_url)
    conn.ping()  # fail fast with a clear error when Redis is not there
    log.info("loading models (%s, %s)...", method_settings.sam_model, method_settings.clip_model)
    pipeline = HybridGL(method_settings)
    jobs.set_runtime(jobs.Runtime.create(serve, pipeline))
    name = name or f"hybridgl-{socket.gethostname()}-{os.getpid()}"
    info = {"name": name, "model_version": pipeline.model_version, "device": str(pipeline.models.device),
            "precision": str(pipeline.models.dtype).replace("torch.", ""), "queues": list(serve.queues),
            "sam_model": method_settings.sam_model, "clip_model": method_settings.clip_model}
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.is_set():
            try:
                q.register_worker(conn, name, info)
            except Exception as exc:  # noqa: BLE001 - Redis may come back; keep trying
                log.warning("worker heartbeat failed: %s", exc)
            stop.wait(HEARTBEAT_SECONDS)

    q.register_worker(conn, name, info)
    threading.Thread(target=heartbeat, name="heartbeat", daemon=True).start()
    log.info("worker %s ready: model_version %s, queues %s", name, pipeline.model_version, ",".join(serve.queues))
    worker = SimpleWorker([Queue(n, connection=conn) for n in serve.queues], connection=conn, name=name)
    try:
        worker.work(with_scheduler=True, burst=burst, logging_level="INFO")
    finally:
        stop.set()
        conn.delete(f"{q.PREFIX}:worker:{name}")
    return 0
