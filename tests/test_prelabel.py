"""`hybridgl prelabel` end to end: a real Label Studio, a real Redis, a real worker, real photos.

The command runs as a subprocess (``python -m backend.prelabel``, what ``hybridgl prelabel`` calls)
with the environment the worker has (REDIS_URL, LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY).
Synchronisation polls Label Studio or Redis state with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from PIL import Image

from backend.jobspec import batch_queue
from backend.queue import batch_queue_names

from .services import DATA, REPO, wait_for
from .test_e2e_labelstudio import _drain, ls, stack  # noqa: F401 - module fixtures: Label Studio, worker + backend

CONFIG = (REPO / "label_config" / "batch_prompts.xml").read_text()
RUN_TIMEOUT = 600


# --- helpers ----------------------------------------------------------------------------------------
def _image(ls, base: str, tag: str) -> str:
    """A new image (its own content hash, so no cache hit) derived from a test photo: half size,
    one marker pixel that depends on ``tag``."""
    image = Image.open(DATA / base).convert("RGB")
    image = image.resize((image.width // 2, image.height // 2))
    digest = hashlib.sha256(tag.encode()).digest()
    image.putpixel((digest[0] % 8, digest[1] % 8), tuple(digest[2:5]))
    name = f"{Path(base).stem}-{tag}.png"
    image.save(ls.images_dir / name)
    return name


def _project(ls, name: str, tasks: list[dict]) -> tuple[int, list[int]]:
    project = ls.create_project(f"prelabel {name}", CONFIG)
    ls.add_local_storage(project["id"])
    return project["id"], ls.import_tasks(project["id"], tasks)


def _tasks(ls, images: list[str], prompt: str = "the dog") -> list[dict]:
    return [{"image": ls.local_files_url(name), "prompt": prompt} for name in images]


def _command(project: int, *extra: str, summary: Path | None = None) -> list[str]:
    args = [sys.executable, "-m", "backend.prelabel", "--project", str(project), "--no-progress", *extra]
    return args + (["--summary-json", str(summary)] if summary else [])


def _prelabel(stack, tmp_path: Path, project: int, *extra: str, env: dict | None = None):
    """Run to the end; return (exit code, stdout + stderr, summary JSON or None)."""
    summary = tmp_path / f"summary-{os.urandom(4).hex()}.json"
    done = subprocess.run(_command(project, *extra, summary=summary), env=env or stack["env"], cwd=REPO,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)
    data = json.loads(summary.read_text()) if summary.exists() else None
    return done.returncode, done.stdout + done.stderr, data


class Background:
    """A prelabel run in the background, its output in a file."""

    def __init__(self, stack, tmp_path: Path, project: int, *extra: str):
        self.log = tmp_path / f"prelabel-{os.urandom(4).hex()}.log"
        self.summary = self.log.with_suffix(".json")
        self._file = open(self.log, "wb")
        self.process = subprocess.Popen(_command(project, *extra, summary=self.summary), env=stack["env"], cwd=REPO,
                                        stdout=self._file, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def interrupt(self) -> int:
        self.process.send_signal(signal.SIGINT)
        code = self.process.wait(60)
        self._file.close()
        return code

    def wait(self) -> int:
        code = self.process.wait(RUN_TIMEOUT)
        self._file.close()
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._file.close()


def _predicted(ls, project: int) -> dict[int, int]:
    """task id -> number of predictions, in one request."""
    return {t["id"]: t["total_predictions"] for t in ls.tasks(project)}


def _versions(ls, task_ids: list[int]) -> dict[int, list[str]]:
    return {t: [p["model_version"] for p in ls.predictions(t)] for t in task_ids}


def _model_version(redis_url: str) -> str:
    return redis.Redis.from_url(redis_url).get("hybridgl:model_version").decode()


@contextmanager
def _worker_paused(stack):
    """Freeze the worker process (SIGSTOP): jobs stay queued, its registration stays (60 s TTL)."""
    pid = stack["worker"].process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _queued_tasks(redis_url: str) -> set[int]:
    """Tasks whose prediction job is queued (from the jobs' descriptions, "predict task ID (prelabel)")."""
    conn = redis.Redis.from_url(redis_url)
    tasks = set()
    for key in conn.scan_iter("rq:job:predict-*"):
        status, description = conn.hmget(key, "status", "description")
        if status == b"queued":
            tasks.add(int(description.decode().split()[2]))
    return tasks


def _lose_jobs(redis_url: str) -> None:
    """What a Redis restart without persistence does to the jobs: queue, job records, results, the
    ledger, stored answers and label configs gone."""
    conn = redis.Redis.from_url(redis_url)
    keys = [k for pattern in ("rq:job:predict-*", "rq:results:predict-*", "hybridgl:delivery:*", "hybridgl:answer:*",
                              "hybridgl:label-config:*")
            for k in conn.scan_iter(pattern)]
    conn.delete(*(f"rq:queue:{name}" for name in batch_queue_names(conn)), *keys)


def _one_prediction_each(ls, redis_url: str, task_ids: list[int]) -> None:
    version = _model_version(redis_url)
    assert _versions(ls, task_ids) == {t: [version] for t in task_ids}


# --- tests ------------------------------------------------------------------------------------------
def test_dry_run_then_run_then_rerun_skips_everything(ls, stack, redis_url, tmp_path):
    images = ["dog.jpg", "groceries.jpg", _image(ls, "dog.jpg", "full-1"), _image(ls, "groceries.jpg", "full-2"),
              _image(ls, "dog.jpg", "full-3")]
    tasks = _tasks(ls, images) + [{"image": ls.local_files_url("dog.jpg"), "prompt": 123}]
    project, ids = _project(ls, "full", tasks)
    good, bad = ids[:-1], ids[-1]
    conn = redis.Redis.from_url(redis_url)
    queue_key = f"rq:queue:{batch_queue(project)}"
    queued_before = conn.llen(queue_key)
    jobs_before = len(list(conn.scan_iter("rq:job:predict-*")))

    code, out, data = _prelabel(stack, tmp_path, project, "--dry-run")
    assert code == 0, out
    assert "dry run: nothing is enqueued or written" in out
    assert "would predict: 5" in out and "would fail: 1" in out
    assert "data field 'prompt' must be" in out and f"task {bad})" in out
    assert data["considered"] == 6 and data["planned"] == 5 and data["failed"] == 1 and data["skipped"] == 0
    assert _predicted(ls, project) == {t: 0 for t in ids}
    assert conn.llen(queue_key) == queued_before
    assert len(list(conn.scan_iter("rq:job:predict-*"))) == jobs_before

    code, out, data = _prelabel(stack, tmp_path, project)
    assert code == 1, out  # the task with an invalid prompt failed
    assert data["predicted"] == 5 and data["enqueued"] == 5 and data["failed"] == 1, out
    [(reason, count)] = data["failed_reasons"].items()
    assert count == 1 and "data field 'prompt' must be" in reason and "got int 123" in reason
    assert data["failed_tasks"][reason] == [bad]
    assert "images per minute" in out and "predicted: 5" in out and "failed: 1" in out
    assert data["images_per_minute"] > 0
    _one_prediction_each(ls, redis_url, good)
    assert ls.predictions(bad) == []
    [prediction] = ls.predictions(good[0])
    assert sorted(r["type"] for r in prediction["result"]) == ["brushlabels", "polygonlabels", "rectanglelabels"]

    code, out, data = _prelabel(stack, tmp_path, project)
    assert code == 1, out
    assert data["enqueued"] == 0 and data["joined"] == 0 and data["predicted"] == 0, out
    assert data["skipped"] == 5 and data["failed"] == 1
    assert f"5 x already predicted with {_model_version(redis_url)}" in out
    _one_prediction_each(ls, redis_url, good)

    code, out, data = _prelabel(stack, tmp_path, project, "--dry-run")
    assert code == 0 and "would predict: 0" in out and data["skipped"] == 5, out


def test_interrupt_in_the_middle_then_rerun(ls, stack, redis_url, tmp_path):
    images = [_image(ls, base, f"interrupt-{k}") for k, base in enumerate(["dog.jpg", "groceries.jpg"] * 2)]
    project, ids = _project(ls, "interrupt", _tasks(ls, images))
    run = Background(stack, tmp_path, project)
    try:
        def midway() -> bool:
            counts = _predicted(ls, project).values()
            return any(counts) and not all(counts)

        wait_for(midway, 300, "a first prediction while other tasks are pending")
        code = run.interrupt()
    finally:
        run.kill()
    out = run.output()
    assert code == 130, out
    assert "interrupted" in out and "Re-run the same command to finish the rest" in out
    data = json.loads(run.summary.read_text())
    assert data["interrupted"] and data["pending"] >= 1 and data["predicted"] < len(ids)
    assert f"still queued or running: {data['pending']} job(s)" in out
    assert "left to them: cancel with `hybridgl prelabel" in out  # no terminal: nothing was asked

    code, out, data = _prelabel(stack, tmp_path, project)
    assert code == 0, out
    # Every task had its prediction or a live job: nothing is enqueued twice.
    assert data["enqueued"] == 0 and data["joined"] + data["skipped"] == len(ids), out
    _one_prediction_each(ls, redis_url, ids)


def test_rerun_after_redis_lost_the_queue(ls, stack, redis_url, tmp_path):
    images = [_image(ls, base, f"lost-{k}") for k, base in enumerate(["dog.jpg", "groceries.jpg"] * 2)]
    project, ids = _project(ls, "lost queue", _tasks(ls, images))
    with _worker_paused(stack):
        run = Background(stack, tmp_path, project)
        try:
            wait_for(lambda: f"enqueued {len(ids)} task(s)" in run.output(), 60, "the jobs to be enqueued")
            code = run.interrupt()
        finally:
            run.kill()
        assert code == 130, run.output()
        assert f"still queued or running: {len(ids)} job(s)" in run.output()
        assert _queued_tasks(redis_url) == set(ids)
        _lose_jobs(redis_url)
    code, out, data = _prelabel(stack, tmp_path, project)
    assert code == 0, out
    assert data["enqueued"] == len(ids) and data["joined"] == 0 and data["predicted"] == len(ids), out
    _one_prediction_each(ls, redis_url, ids)


def test_jobs_lost_while_running_are_enqueued_again(ls, stack, redis_url, tmp_path):
    images = [_image(ls, "dog.jpg", "lost-0"), _image(ls, "groceries.jpg", "lost-1")]  # indexed by the test above
    project, ids = _project(ls, "lost midway", _tasks(ls, images))
    run = Background(stack, tmp_path, project)
    try:
        with _worker_paused(stack):
            wait_for(lambda: f"enqueued {len(ids)} task(s)" in run.output(), 60, "the jobs to be enqueued")
            assert _queued_tasks(redis_url) == set(ids)
            _lose_jobs(redis_url)
        assert run.wait() == 0, run.output()
    finally:
        run.kill()
    data = json.loads(run.summary.read_text())
    assert data["requeued"] == len(ids) and data["predicted"] == len(ids), run.output()
    assert "jobs vanished from Redis" in run.output()
    _one_prediction_each(ls, redis_url, ids)


def test_filters_tasks_unannotated_and_limit(ls, stack, redis_url, tmp_path):
    images = ["dog.jpg", "groceries.jpg", _image(ls, "dog.jpg", "full-1"), _image(ls, "groceries.jpg", "full-2"),
              _image(ls, "dog.jpg", "full-3")]  # indexed already: this test is about which tasks run
    project, ids = _project(ls, "filters", _tasks(ls, images))
    annotated = ids[2]
    ls.api("POST", f"/api/tasks/{annotated}/annotations/", json={"result": [], "was_cancelled": False})

    code, out, data = _prelabel(stack, tmp_path, project, "--tasks", f"{ids[0]},{ids[4]}")
    assert code == 0, out
    assert data["considered"] == 2 and data["predicted"] == 2, out
    assert _predicted(ls, project) == {t: int(t in (ids[0], ids[4])) for t in ids}

    code, out, data = _prelabel(stack, tmp_path, project, "--unannotated", "--limit", "1")
    assert code == 0, out
    assert data["predicted"] == 1 and data["limit_reached"] and data["left_out"] == 1, out
    assert "limit reached" in out
    assert _predicted(ls, project) == {t: int(t in (ids[0], ids[1], ids[4])) for t in ids}

    code, out, data = _prelabel(stack, tmp_path, project, "--unannotated")
    assert code == 0, out
    assert data["predicted"] == 1 and data["skipped"] == 3 and data["left_out"] == 1, out
    assert not data["limit_reached"]
    assert _predicted(ls, project) == {t: int(t != annotated) for t in ids}
    _one_prediction_each(ls, redis_url, [t for t in ids if t != annotated])

    missing = max(ids) + 1000
    code, out, data = _prelabel(stack, tmp_path, project, "--tasks", f"{ids[0]},{missing}")
    assert code == 1, out
    assert data["skipped"] == 1 and data["failed_tasks"] == {f"no such task in project {project}": [missing]}


def test_no_worker_fails_clearly_and_dry_run_still_counts(ls, stack, redis_url, tmp_path):
    project, ids = _project(ls, "no worker", _tasks(ls, ["dog.jpg", "groceries.jpg"]))
    conn = redis.Redis.from_url(redis_url)
    with _worker_paused(stack):  # its heartbeat cannot register it again meanwhile
        saved = {k: (conn.get(k), conn.pttl(k)) for k in conn.scan_iter("hybridgl:worker:*")}
        conn.delete(*saved)
        try:
            code, out, _ = _prelabel(stack, tmp_path, project)
            assert code == 2, out
            assert "no worker is running: start `hybridgl worker`" in out
            code, out, data = _prelabel(stack, tmp_path, project, "--dry-run")
            assert code == 0 and data["considered"] == 2, out
            assert "no worker is running now" in out and "would predict: 2" in out
        finally:
            for key, (value, ttl) in saved.items():
                conn.set(key, value, px=max(ttl, 1000))
    assert _predicted(ls, project) == {t: 0 for t in ids}


def test_configuration_errors_exit_2(stack, tmp_path):
    env = {k: v for k, v in stack["env"].items() if not k.startswith("LABEL_STUDIO_")}
    code, out, _ = _prelabel(stack, tmp_path, 1, env=env)
    assert code == 2 and "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY" in out, out
    code, out, _ = _prelabel(stack, tmp_path, 987654)
    assert code == 2 and "project 987654 does not exist" in out, out
    assert ls_token_absent(out, stack)
    bad = subprocess.run([sys.executable, "-m", "backend.prelabel", "--project", "1", "--tasks", "a-b"],
                         env=stack["env"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "is not a task id" in bad.stderr


def ls_token_absent(text: str, stack) -> bool:
    return stack["env"]["LABEL_STUDIO_API_KEY"] not in text


@pytest.mark.parametrize("text, ids", [("3", [3]), ("1,4-6, 9", [1, 4, 5, 6, 9])])
def test_task_id_lists(text, ids):
    from backend.prelabel import _task_ids

    assert _task_ids(text) == ids


def test_retrieve_overtakes_another_projects_run_which_is_then_canceled(ls, stack, redis_url, tmp_path):
    """Issue 15 through Label Studio: a 200-task prelabel run of one project is queued; another project's
    Retrieve Predictions on 5 tasks (pressed twice at once) is done after a few of the run's jobs (counted
    from the jobs' RQ records); then the run is canceled by `--cancel` and DELETE /batches at once: no job
    of it stays queued, and every task of it that was predicted has exactly one prediction. One image for
    every task: after the first job builds its index, jobs are short."""
    import threading

    import httpx
    from rq.job import Job

    from backend import batches

    conn = redis.Redis.from_url(redis_url)
    big, big_ids = _project(ls, "big run", _tasks(ls, ["dog.jpg"] * 200))
    small, small_ids = _project(ls, "small retrieve", _tasks(ls, ["dog.jpg"] * 5))
    ls.connect_ml_backend(small, stack["url"], is_interactive=False)
    run = Background(stack, tmp_path, big)
    try:
        wait_for(lambda: "enqueued 200 task(s)" in run.output() and _predicted(ls, big)
                 and any(_predicted(ls, big).values()), 300, "the run to be queued and running")
        [run_batch] = batches.listing(conn, big)
        callers = [threading.Thread(target=ls.retrieve_predictions, args=(small, small_ids)) for _ in range(2)]
        for c in callers:
            c.start()
        for c in callers:
            c.join()
        wait_for(lambda: all(_predicted(ls, small).values()), 300, "the small project's predictions")
        _one_prediction_each(ls, redis_url, small_ids)
        small_jobs = {m.decode() for b in batches.listing(conn, small) for m in conn.smembers(batches.jobs_key(b.id))}
        small_records = Job.fetch_many(sorted(small_jobs), connection=conn)
        last_small_end = max(job.ended_at for job in small_records)
        # From when the Retrieve's jobs reached the queue (Label Studio takes a moment to call /predict,
        # during which the run rightly goes on): the job then running, and one between each two of the five.
        arrived = min(job.enqueued_at for job in small_records).timestamp()
        run_jobs = [m.decode() for m in conn.smembers(batches.jobs_key(run_batch.id))]
        delayed = sum(1 for job in Job.fetch_many(run_jobs, connection=conn)
                      if job and job.started_at and job.started_at < last_small_end
                      and (job.ended_at is None or job.ended_at.timestamp() > arrived))
        print(f"run jobs started while the 5-task Retrieve was served: {delayed}")
        assert delayed <= 5, delayed  # first in, first out: every job the run had still queued

        outcome: dict = {}
        cancels = [threading.Thread(target=lambda: outcome.update(
                       command=subprocess.run(_command(big, "--cancel"), env=stack["env"], cwd=REPO,
                                              capture_output=True, text=True, timeout=120))),
                   threading.Thread(target=lambda: outcome.update(
                       http=httpx.delete(f"{stack['url']}/batches/{run_batch.id}", timeout=60)))]
        for c in cancels:
            c.start()
        for c in cancels:
            c.join()
        assert outcome["command"].returncode == 0, outcome["command"].stdout + outcome["command"].stderr
        assert outcome["http"].status_code == 200, outcome["http"].text
        assert run.wait() == 0, run.output()  # the run ends with its last running job
    finally:
        run.kill()
    data = json.loads(run.summary.read_text())
    _drain(redis_url)
    assert conn.llen(f"rq:queue:{batch_queue(big)}") == 0
    state = batches.state(conn, run_batch.id)
    assert state.queued == 0 and state.canceled > 0 and state.failed == 0, state
    predicted = _predicted(ls, big)
    assert set(predicted.values()) <= {0, 1}
    assert sum(predicted.values()) == state.done and state.done + state.canceled == 200, (state, predicted)
    assert data["canceled"] == state.canceled and data["predicted"] == state.done
    assert f"canceled: {state.canceled} queued job(s) of batch {run_batch.id}" in run.output()


def test_ctrl_c_at_a_terminal_asks_and_cancels_the_queued_jobs(ls, stack, redis_url, tmp_path):
    """A real pseudo-terminal: Ctrl-C asks whether to cancel; 'y' removes the run's queued jobs (the worker is
    frozen, so all of them are queued) and the summary says so. Without a terminal the jobs are left
    (test_interrupt_in_the_middle_then_rerun)."""
    import pty

    project, ids = _project(ls, "ctrl-c", _tasks(ls, [_image(ls, "dog.jpg", f"ctrl-c-{k}") for k in range(3)]))
    conn = redis.Redis.from_url(redis_url)
    with _worker_paused(stack):
        leader, follower = pty.openpty()
        process = subprocess.Popen(_command(project), env=stack["env"], cwd=REPO, stdin=follower, stdout=follower,
                                   stderr=follower, start_new_session=True)
        os.close(follower)
        seen = b""
        try:
            while b"enqueued 3 task(s)" not in seen:
                chunk = os.read(leader, 4096)
                assert chunk, seen
                seen += chunk
            process.send_signal(signal.SIGINT)
            while b"[y/N]" not in seen:
                seen += os.read(leader, 4096)
            os.write(leader, b"y\n")
            assert process.wait(60) == 130
            while True:
                try:
                    chunk = os.read(leader, 4096)
                except OSError:  # the terminal closed with the process
                    break
                if not chunk:
                    break
                seen += chunk
        finally:
            if process.poll() is None:
                process.kill()
            os.close(leader)
        out = seen.decode(errors="replace")
        assert "canceled: 3 queued job(s) of batch" in out, out
        assert conn.llen(f"rq:queue:{batch_queue(project)}") == 0
    assert _predicted(ls, project) == {t: 0 for t in ids}


def test_a_project_cap_holds_the_run_until_the_workers_take_its_jobs(ls, stack, redis_url, tmp_path):
    """HYBRIDGL_PROJECT_MAX_QUEUED=2 with the worker frozen: the run enqueues 2 jobs and waits (saying why);
    once the worker goes on, it enqueues the rest as jobs are taken and ends with one prediction each."""
    project, ids = _project(ls, "capped", _tasks(ls, ["dog.jpg"] * 5))
    conn = redis.Redis.from_url(redis_url)
    queue_key = f"rq:queue:{batch_queue(project)}"
    env = dict(stack["env"], HYBRIDGL_PROJECT_MAX_QUEUED="2")
    summary = tmp_path / "capped.json"
    log = tmp_path / "capped.log"
    with _worker_paused(stack), open(log, "wb") as out:
        process = subprocess.Popen(_command(project, summary=summary), env=env, cwd=REPO, stdout=out,
                                   stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: "HYBRIDGL_PROJECT_MAX_QUEUED" in log.read_text(), 120, "the run to wait for room")
            assert conn.llen(queue_key) == 2
        except BaseException:
            process.kill()
            raise
    assert process.wait(RUN_TIMEOUT) == 0, log.read_text()
    data = json.loads(summary.read_text())
    assert data["predicted"] == 5 and data["enqueued"] == 5
    _one_prediction_each(ls, redis_url, ids)
