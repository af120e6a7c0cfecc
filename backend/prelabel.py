"""`hybridgl prelabel --project ID`: pre-label a Label Studio project through the workers.

Pages through the project's tasks, skips those that already have a prediction of the workers'
model_version, enqueues one ``batch`` job per remaining task (the same job, built by
``backend.jobspec``, that /predict would enqueue for it: they join each other) and hands each task
off to its job in the delivery ledger (``backend.delivery``): the worker writes the prediction,
unless a /predict response delivered it first. A job that had already finished has its answer
written by this command. Then it follows the jobs to the end with a progress bar and prints a summary.

Safe to interrupt and re-run at any point:
- job ids are deterministic, so a re-run joins the jobs still queued or running instead of
  enqueuing them again;
- tasks whose prediction was written are skipped by the re-run (Label Studio is the record);
- a job that vanished from Redis (a restart without persistence, an expired record) is
  re-enqueued, by a re-run and while following the jobs;
- the ledger lets one party deliver each task's prediction, whoever else asks at the same time.
Throughput grows with the workers: any ``hybridgl worker`` on any host that reaches the same
Redis takes jobs from the project's batch queue, in turn with the other projects' queues.

Each run is a batch (``backend.batches``) that `hybridgl batches` and GET /batches show and that
``--cancel`` (or DELETE /batches/{id}) cancels. Interrupted at a terminal, the command asks whether
to cancel the run's queued jobs; without one it leaves them to the workers. With
HYBRIDGL_PROJECT_MAX_QUEUED set, it enqueues a task only while the project's queue holds fewer jobs.

Light like the rest of ``backend``: no torch, nothing from ``worker``. Exit codes: 0 all done,
1 some tasks failed, 2 could not run (configuration, Label Studio or Redis), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
from rq.job import Job
from rq.queue import Queue
from rq.results import Result

from backend import batches, delivery
from backend import jobspec as js
from backend import queue as q
from backend.config import ServeSettings
from backend.errors import UserError
from backend.labeling import LabelConfigError, LabelingConfig, parse_label_config
from backend.labelstudio import FetchPolicy, LabelStudioClient, LabelStudioError, client_from, prediction_versions
from backend.prompts import PromptError, build_request

EXIT_OK, EXIT_FAILED, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130
POLL_SECONDS = 1.0  # how long one wait for outcomes blocks before the bar is refreshed
WINDOW = 256  # jobs watched at once (oldest first: workers take them in that order)
MAX_REQUEUES = 3  # a job that keeps vanishing from Redis counts as failed after this
WORKER_CHECK_SECONDS = 15.0
REDIS_PATIENCE_SECONDS = 120.0
ALREADY = "already predicted with {version}"
ALL_RUNS = "all"
NOTHING = "nothing to segment (no prompt in the task, and label names are not used as prompts)"


class PrelabelError(UserError):
    """The run cannot start or go on; the message says what to do."""


# --------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--project", type=int, required=True, metavar="ID", help="Label Studio project id")
    parser.add_argument("--tasks", type=_task_ids, metavar="IDS",
                        help="only these tasks: comma-separated ids and ranges, e.g. 12,15,20-40")
    parser.add_argument("--unannotated", action="store_true",
                        help="only tasks without a submitted annotation")
    parser.add_argument("--limit", type=_positive, metavar="N",
                        help="predict at most N tasks (tasks skipped or with invalid prompts do not count)")
    parser.add_argument("--dry-run", action="store_true",
                        help="say what would be done: enqueue nothing, write nothing")
    parser.add_argument("--preview", type=_positive, metavar="N",
                        help="predict N tasks spread over the project, write nothing to Label Studio, and write "
                             "a page (--out DIR/index.html) showing each image's regions, labels, scores and the "
                             "thresholds in force: tune thresholds before the full run")
    parser.add_argument("--out", metavar="DIR", help="folder for the --preview page")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--cancel", nargs="?", const=ALL_RUNS, metavar="BATCH",
                        help="cancel instead of running: remove the queued jobs of the project's batches (prelabel "
                             "runs and Retrieve Predictions), or of the one batch BATCH (see `hybridgl batches`); "
                             "running jobs finish and write their predictions")
    parser.add_argument("--summary-json", metavar="FILE",
                        help="also write the summary as JSON to FILE (for scripts)")
    parser.epilog = ("Label Studio's address and token come from LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY, Redis "
                     "from REDIS_URL, as for `hybridgl serve`; the workers need the same LABEL_STUDIO_* to write "
                     "predictions. Interrupt at any time and run the same command again to finish: predicted tasks "
                     "are skipped and queued jobs joined, so no task gets a second prediction. Exit codes: 0 done, "
                     "1 some tasks failed, 2 could not run, 130 interrupted.")


def _task_ids(text: str) -> list[int]:
    ids: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            if "-" in part.lstrip("-"):
                low, high = (int(x) for x in part.split("-", 1))
                if high < low or high - low > 1_000_000:
                    raise ValueError
                ids.extend(range(low, high + 1))
            else:
                ids.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not a task id or a range like 20-40") from None
    if not ids:
        raise argparse.ArgumentTypeError("no task id given")
    return ids


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive whole number")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hybridgl prelabel",
                                     description="Pre-label a Label Studio project with the HybridGL workers.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


# --------------------------------------------------------------------------------------------
# the run


@dataclass
class Tally:
    """What happened to each task; printed as the summary."""

    project: int
    model_version: str | None
    dry_run: bool = False
    considered: int = 0
    left_out: int = 0  # annotated tasks with --unannotated
    predicted: int = 0
    enqueued: int = 0  # new jobs
    joined: int = 0  # jobs already queued or running (an earlier run's)
    requeued: int = 0  # jobs that had vanished from Redis
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    failed: dict[str, list[Any]] = field(default_factory=dict)  # reason -> task ids
    pending: int = 0  # jobs not finished when the run ended
    canceled: int = 0  # queued jobs canceled (at the Ctrl-C question, or by --cancel / DELETE /batches)
    batch: str | None = None  # this run's batch id
    left_queued: bool = False  # interrupted, and its queued jobs left to the workers
    planned: int = 0  # tasks a dry run would predict
    unlisted: bool = False  # interrupted before every task was looked at
    limit_reached: bool = False
    started: float = field(default_factory=time.monotonic)
    first_enqueue: float | None = None
    finished: float | None = None
    interrupted: bool = False

    def fail(self, task_id: Any, reason: str) -> None:
        self.failed.setdefault(_general(reason, task_id), []).append(task_id)

    @property
    def failed_count(self) -> int:
        return sum(len(v) for v in self.failed.values())

    @property
    def seconds(self) -> float:
        start = self.first_enqueue if self.first_enqueue is not None else self.started
        return max((self.finished or time.monotonic()) - start, 1e-9)

    @property
    def per_minute(self) -> float:
        return self.predicted / self.seconds * 60.0

    def as_dict(self) -> dict:
        return {"project": self.project, "model_version": self.model_version, "dry_run": self.dry_run,
                "considered": self.considered, "left_out": self.left_out, "predicted": self.predicted,
                "enqueued": self.enqueued, "joined": self.joined, "requeued": self.requeued,
                "skipped": sum(self.skipped.values()), "skipped_reasons": dict(self.skipped),
                "failed": self.failed_count, "failed_reasons": {k: len(v) for k, v in self.failed.items()},
                "failed_tasks": {k: v for k, v in self.failed.items()}, "pending": self.pending,
                "canceled": self.canceled, "batch": self.batch, "left_queued": self.left_queued,
                "planned": self.planned,
                "interrupted": self.interrupted, "limit_reached": self.limit_reached,
                "seconds": round(self.seconds, 3), "images_per_minute": round(self.per_minute, 3)}


def _general(reason: str, task_id: Any) -> str:
    """A reason without the task it is about, so that equal reasons group ("task 7: ..." -> "...")."""
    reason = " ".join(str(reason).split())
    if task_id is not None:
        reason = re.sub(rf"^task {re.escape(str(task_id))}\s*[:,]\s*", "", reason)
    return reason or "unknown error"


@dataclass
class Planned:
    task_id: int
    spec: js.JobSpec
    view: delivery.View  # when this task's state was read from Label Studio
    requeues: int = 0

    @property
    def job_id(self) -> str:
        return self.spec.job_id


class Prelabel:
    def __init__(self, args: argparse.Namespace, settings: ServeSettings, client: LabelStudioClient,
                 conn: redis.Redis, out=None, err=None, inp=None):
        self.args = args
        self.settings = settings
        self.client = client
        self.conn = conn
        self.jobs = q.JobQueue(conn, settings.job_timeout, settings.result_ttl, settings.job_retries)
        self.ledger = delivery.Ledger(conn, settings.result_ttl)
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.inp = inp or sys.stdin
        self.bar = None  # the progress bar, while jobs are followed
        self.queue_name = js.batch_queue(args.project)
        self.project_id = int(args.project)
        self.project_key = str(self.project_id)  # Label Studio's uid once the project is read (execute)
        self.version: str | None = None
        self.tally = Tally(self.project_id, None, dry_run=bool(args.dry_run))
        self.watch: dict[str, Planned] = {}  # job id -> task, in enqueue order
        self.label_config = ""  # the project's, as its jobs name it by digest

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    # ---- setup

    def resolve_version(self) -> str | None:
        workers = q.live_workers(self.conn)
        published = q.current_model_version(self.conn)
        live = sorted({w.get("model_version") for w in workers if w.get("model_version")})
        if not workers:
            if self.args.dry_run:
                return published  # the last one published, if any: reported as such
            raise PrelabelError(
                "no worker is running: start `hybridgl worker` (on any host that reaches this Redis, with the same "
                f"REDIS_URL and LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY), then run this again; the workers publish the "
                f"model_version that decides which tasks are already pre-labelled ({_where(self.settings.redis_url)})")
        if published in live:
            version = published
        else:
            version = live[-1]
        if len(live) > 1:
            print(f"warning: workers run different model versions ({', '.join(live)}): predictions are written "
                  f"with the version of the worker that runs each job; skipping tasks predicted with {version}",
                  file=self.err, flush=True)
        return version

    def project(self) -> tuple[dict, LabelingConfig]:
        try:
            project = self.client.project(self.project_id)
        except LabelStudioError as exc:
            if exc.status == 404:
                raise PrelabelError(f"project {self.project_id} does not exist in Label Studio at {self.client.url} "
                                    "(or the token's user cannot see it)") from None
            raise PrelabelError(str(exc)) from None
        try:
            config = parse_label_config(project.get("label_config") or "")
        except LabelConfigError as exc:
            raise PrelabelError(f"project {self.project_id}'s label config cannot be pre-labelled: {exc}") from None
        return project, config

    # ---- planning: what each task needs

    def plan(self, config: LabelingConfig, label_config: str) -> Iterator[Planned]:
        """Tasks that need a job, in id order; tallies the rest (skipped, invalid, left out)."""
        args, tally = self.args, self.tally
        wanted = set(args.tasks) if args.tasks else None
        seen: set[int] = set()
        to_predict = 0
        policy = self.settings.label_names_policy()
        digest: str | None = None
        # Taken before any task is read, so that no delivery made after its task was read looks older than the
        # listing (pages are read as the run goes): a prediction missing from the listing was deleted only if
        # it was delivered before this.
        view = self.ledger.view(self.jobs.job_lifetime)
        for task in self.client.tasks(self.project_id, task_ids=args.tasks):
            task_id = task.get("id")
            if wanted is not None and task_id not in wanted:
                continue
            seen.add(task_id)
            if args.unannotated and int(task.get("total_annotations") or 0) > 0:
                tally.left_out += 1
                continue
            tally.considered += 1
            if self.version is not None and self.version in prediction_versions(task):
                tally.skipped[ALREADY.format(version=self.version)] += 1
                continue
            if self.version is None and args.dry_run and prediction_versions(task):
                tally.skipped["has predictions (their version cannot be checked: no worker is running)"] += 1
                continue
            try:
                req = build_request(task, None, config, label_names_as_prompts=policy)
            except PromptError as exc:
                tally.fail(task_id, str(exc))
                continue
            if not req.expressions:
                tally.skipped[NOTHING] += 1
                continue
            if args.dry_run:
                digest = digest or js.config_text_digest(label_config)  # nothing is stored by a dry run
            else:
                digest = digest or js.store_label_config(self.conn, label_config)
            spec = js.prediction_job(
                model_version=self.version, project=self.project_key, task_id=req.task_id, image=req.image,
                expressions=[{"text": e.text, "label": e.label} for e in req.expressions], clicks=[],
                config=config, config_digest=digest, interactive=False, origin="prelabel")
            if args.limit is not None and to_predict >= args.limit:
                tally.limit_reached = True  # this task and the ones after it are for the next run
                tally.considered -= 1
                break
            to_predict += 1
            yield Planned(req.task_id, spec, view)
        if wanted is not None and not tally.limit_reached:
            for task_id in sorted(wanted - seen):
                tally.fail(task_id, f"task {task_id}: no such task in project {self.project_id}")

    # ---- enqueueing

    def submit(self, item: Planned) -> None:
        """Enqueue the task's job (or join the live one of an earlier run, or of /predict) and hand the
        task off to it; a job that finished already has its answer written here."""
        joined = self._status(item.job_id) in q.LIVE
        if not joined:
            self.wait_for_room()
        if self.tally.batch is None:  # the first task to predict: the run becomes a batch
            self.tally.batch = batches.create(self.conn, self.project_id, batches.PRELABEL)
            self.say(f"batch {self.tally.batch}: see `hybridgl batches`; cancel with `hybridgl prelabel --project "
                     f"{self.project_id} --cancel {self.tally.batch}`")
        if self.tally.first_enqueue is None:
            self.tally.first_enqueue = time.monotonic()
        self.jobs.enqueue(item.spec)
        batches.add_jobs(self.conn, self.tally.batch, [item.job_id])
        if joined:
            self.tally.joined += 1
        else:
            self.tally.enqueued += 1
        key = self._entry(item)
        handed = self.ledger.hand_off(key, item.job_id, item.view)
        if handed == delivery.ANSWER:  # finished before: its worker did not see the hand-off
            answer = self.ledger.answer(item.job_id)
            if answer is not None and self.ledger.take(key, item.job_id, item.view, writing=True):
                if not self.client.has_prediction(item.task_id, answer["model_version"]):
                    self.client.create_prediction(item.task_id, answer["result"], answer.get("score"),
                                                  answer["model_version"])
                self.ledger.written(key, item.job_id)
        self.watch[item.job_id] = item
        self.progress_bar().total = len(self.watch) + self.progress_bar().n

    def wait_for_room(self) -> None:
        """With HYBRIDGL_PROJECT_MAX_QUEUED, wait (following the jobs) until the project's queue has room."""
        cap = self.settings.project_max_queued
        if cap <= 0:
            return
        told = False
        while self.conn.llen(Queue.redis_queue_namespace_prefix + self.queue_name) >= cap:
            if not told:
                self.progress_bar().write(f"project {self.project_id} has {cap} batch job(s) queued "
                                          f"(HYBRIDGL_PROJECT_MAX_QUEUED): enqueuing more as the workers take them")
                told = True
            if self.watch:
                self.poll()
            else:  # the queued jobs are other runs' of this project
                time.sleep(POLL_SECONDS)

    def _entry(self, item: Planned) -> str:
        return delivery.entry_key(self.project_key, item.task_id, str(self.version))

    def _status(self, job_id: str):
        try:
            return q.fetch_job(job_id, self.conn).get_status(refresh=False)
        except Exception:  # noqa: BLE001 - no such job (or an unreadable one): enqueue anew
            return None

    # ---- following the jobs

    def progress_bar(self):
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=0, desc="pre-labelling", unit="img", file=self.err, dynamic_ncols=True,
                            disable=bool(self.args.no_progress), smoothing=0.3, mininterval=0.5)
            self._next_worker_check = time.monotonic() + WORKER_CHECK_SECONDS
            self._warned_no_worker = False
            self._redis_down_since: float | None = None
        return self.bar

    def follow(self) -> None:
        try:
            while self.watch:
                self.poll()
        finally:
            self.close_bar()
        self.tally.finished = time.monotonic()

    def close_bar(self) -> None:
        self.tally.pending = len(self.watch)
        if self.bar is not None:
            self.bar.close()

    def poll(self) -> None:
        """Wait up to POLL_SECONDS for outcomes of the oldest jobs watched, and count them."""
        tally, bar = self.tally, self.progress_bar()
        window = list(self.watch)[:WINDOW]
        try:
            outcomes = self.jobs.wait(window, time.monotonic() + POLL_SECONDS)
            self._redis_down_since = None
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            now = time.monotonic()
            if self._redis_down_since is None:
                self._redis_down_since = now
                bar.write(f"Redis is unreachable ({type(exc).__name__}); retrying...")
            if now - self._redis_down_since > REDIS_PATIENCE_SECONDS:
                raise PrelabelError(
                    f"Redis has been unreachable for {REDIS_PATIENCE_SECONDS:.0f} s "
                    f"({_where(self.settings.redis_url)}): run the same command again when it is back; "
                    "it continues where this one stopped") from None
            time.sleep(1.0)
            return
        retrying: list[str] = []
        resolved = 0
        for job_id, outcome in outcomes.items():
            if outcome.status == "pending":
                continue
            item = self.watch[job_id]
            if outcome.status == "failed" and not Job.exists(job_id, connection=self.conn):
                if self._vanished(item, bar):
                    continue  # re-enqueued: still watched
            elif outcome.status == "failed" and self._status(job_id) in q.RUNNING:
                retrying.append(job_id)  # a retry is queued or running: an earlier attempt's failure
                continue
            elif outcome.status == "finished":
                tally.predicted += 1
            elif outcome.status == "canceled":
                tally.canceled += 1
            else:
                tally.fail(item.task_id, outcome.error or "unknown error")
                bar.set_postfix(failed=tally.failed_count, refresh=False)
            del self.watch[job_id]
            resolved += 1
            bar.update(1)
        if retrying and not resolved and len(retrying) == len(outcomes):
            # Only retries in the window: wait for their next result rather than spin.
            self.conn.xread({Result.get_key(j): "$" for j in retrying}, block=int(POLL_SECONDS * 1000))
        if time.monotonic() >= self._next_worker_check:
            self._next_worker_check = time.monotonic() + WORKER_CHECK_SECONDS
            alive = bool(q.live_workers(self.conn))
            if not alive and not self._warned_no_worker:
                bar.write("warning: no worker is running: the jobs wait in the queue until `hybridgl worker` "
                          "starts (or interrupt, and run this again later)")
            self._warned_no_worker = not alive

    def _vanished(self, item: Planned, bar) -> bool:
        """The job is gone from Redis. True when it was enqueued again (still to watch)."""
        if self.client.has_prediction(item.task_id, self.version):
            self.tally.predicted += 1  # it finished and its record expired since
            return False
        if item.requeues >= MAX_REQUEUES:
            self.tally.fail(item.task_id, f"its job vanished from Redis {item.requeues + 1} times")
            return False
        item.requeues += 1
        self.tally.requeued += 1
        if item.requeues == 1 and self.tally.requeued == 1:
            bar.write("jobs vanished from Redis (restarted without persistence?): enqueuing them again")
        js.store_label_config(self.conn, self.label_config)  # gone with the job, if Redis lost everything
        self.jobs.enqueue(item.spec)
        self.ledger.hand_off(self._entry(item), item.job_id, self.ledger.view(self.jobs.job_lifetime))
        return True

    # ---- the whole run

    def execute(self) -> int:
        args, tally = self.args, self.tally
        self.version = self.resolve_version()
        tally.model_version = self.version
        project, config = self.project()
        # The same key as /predict's body carries, so that both flows join one job and one ledger entry.
        self.project_key = js.project_uid(project) or self.project_key
        self.label_config = project["label_config"]
        title = project.get("title") or ""
        self.say(f"project {self.project_id} ({title!r}, {project.get('task_number', '?')} tasks) at "
                 f"{self.client.url}; model_version {self.version or 'unknown (no worker is running)'}")
        if args.preview:
            from backend.preview import run_preview

            return run_preview(self, config, project["label_config"])
        if args.dry_run:
            return self.dry_run(config, project["label_config"])
        try:
            tally.unlisted = True
            for item in self.plan(config, project["label_config"]):
                self.submit(item)
            tally.unlisted = False
            self.say(f"enqueued {tally.enqueued} task(s) on the queue {self.queue_name}"
                     + (f", joined {tally.joined} job(s) already queued or running" if tally.joined else "")
                     + f"; skipped {sum(tally.skipped.values())}, invalid {tally.failed_count}"
                     + (" (limit reached)" if tally.limit_reached else ""))
            self.follow()
        except KeyboardInterrupt:
            tally.interrupted = True
            self.close_bar()
            if self.watch:
                tally.left_queued = not self.ask_cancel()
                if not tally.left_queued:
                    removed = batches.cancel(self.conn, tally.batch, self.settings.result_ttl)
                    tally.canceled += removed
                    tally.pending -= removed
            self.summary()
            return EXIT_INTERRUPTED
        self.summary()
        return EXIT_FAILED if tally.failed_count else EXIT_OK

    def ask_cancel(self) -> bool:
        """At a terminal, ask whether to cancel the run's queued jobs; without one, leave them running."""
        if not (hasattr(self.inp, "isatty") and self.inp.isatty()):
            return False
        print(f"\ninterrupted: cancel this run's queued jobs (batch {self.tally.batch})? Running ones finish "
              "either way. [y/N] ", end="", file=self.err, flush=True)
        try:
            answer = self.inp.readline()
        except (KeyboardInterrupt, EOFError):
            return False
        return answer.strip().lower() in ("y", "yes")

    def dry_run(self, config: LabelingConfig, label_config: str) -> int:
        tally = self.tally
        joinable: list[int] = []
        todo: list[int] = []
        for item in self.plan(config, label_config):
            todo.append(item.task_id)
            if self.version is not None and self._status(item.job_id) in q.RUNNING:
                joinable.append(item.task_id)
        tally.planned = len(todo)
        self.say("dry run: nothing is enqueued or written")
        if self.version is None:
            self.say("  no worker is running and none has published a model_version: tasks with predictions of "
                     "any version are counted as skipped")
        elif not q.live_workers(self.conn):
            self.say(f"  no worker is running now: {self.version} is the model_version last published; start "
                     "`hybridgl worker` before the real run")
        self.say(f"  tasks considered: {tally.considered}"
                 + (f" ({tally.left_out} annotated left out)" if tally.left_out else "")
                 + (" (limit reached)" if tally.limit_reached else ""))
        self.say(f"  would predict: {len(todo)}" + (f" ({len(joinable)} already queued or running: would join)"
                                                    if joinable else ""))
        if todo:
            shown = ", ".join(map(str, todo[:20])) + (f", ... ({len(todo) - 20} more)" if len(todo) > 20 else "")
            self.say(f"    tasks: {shown}")
        self._skipped_lines("would skip")
        self._failed_lines("would fail")
        self._write_json()
        return EXIT_OK

    # ---- summary

    def _skipped_lines(self, head: str) -> None:
        self.say(f"  {head}: {sum(self.tally.skipped.values())}")
        for reason, n in self.tally.skipped.most_common():
            self.say(f"    {n} x {reason}")

    def _failed_lines(self, head: str) -> None:
        self.say(f"  {head}: {self.tally.failed_count}")
        for reason, ids in sorted(self.tally.failed.items(), key=lambda kv: -len(kv[1])):
            shown = ", ".join(map(str, ids[:10])) + (", ..." if len(ids) > 10 else "")
            self.say(f"    {len(ids)} x {reason} (task{'s' if len(ids) > 1 else ''} {shown})")

    def summary(self) -> None:
        tally = self.tally
        self.say("interrupted" if tally.interrupted else "summary")
        self.say(f"  predicted: {tally.predicted}")
        self._skipped_lines("skipped")
        self._failed_lines("failed")
        if tally.canceled:
            self.say(f"  canceled: {tally.canceled} queued job(s) of batch {tally.batch}; run the same command again "
                     "to predict those tasks")
        if tally.requeued:
            self.say(f"  re-enqueued: {tally.requeued} job(s) that had vanished from Redis")
        if tally.left_out:
            self.say(f"  left out: {tally.left_out} annotated task(s) (--unannotated)")
        if tally.limit_reached:
            self.say(f"  limit reached (--limit {self.args.limit}): run again to continue with the next tasks")
        self.say(f"  {tally.predicted} image(s) in {tally.seconds:.1f} s: {tally.per_minute:.1f} images per minute")
        if tally.interrupted:
            self.say(f"  still queued or running: {tally.pending} job(s); the workers finish them and write their "
                     "predictions"
                     + (f" (left to them: cancel with `hybridgl prelabel --project {self.project_id} --cancel "
                        f"{tally.batch}`)" if tally.left_queued else "")
                     + ("; some tasks were not looked at yet" if tally.unlisted else ""))
            self.say("Re-run the same command to finish the rest: tasks already predicted are skipped and queued "
                     "jobs are joined, so no task gets a second prediction.")
        self._write_json()

    def _write_json(self) -> None:
        if self.args.summary_json:
            with open(self.args.summary_json, "w") as handle:
                json.dump(self.tally.as_dict(), handle, indent=1)


def _where(redis_url: str) -> str:
    """Redis's address for messages, without credentials."""
    try:
        kwargs = redis.connection.parse_url(redis_url)
    except Exception:  # noqa: BLE001
        return "REDIS_URL"
    if kwargs.get("path"):
        return f"Redis at {kwargs['path']}"
    return f"Redis at {kwargs.get('host', '?')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


def cancel(args: argparse.Namespace, settings: ServeSettings, conn: redis.Redis, out=None) -> int:
    """`--cancel [BATCH]`: remove the queued jobs of the project's batches, or of one batch."""
    out = out or sys.stdout
    project = str(args.project)
    if args.cancel == ALL_RUNS:
        chosen = [b for b in batches.listing(conn, project) if b.state == "active"]
    else:
        try:
            chosen = [batches.state(conn, args.cancel)]
        except batches.BatchNotFound:
            raise PrelabelError(f"no batch {args.cancel!r}: `hybridgl batches --project {project}` lists the "
                                "project's batches") from None
        if chosen[0].project != project:
            raise PrelabelError(f"batch {args.cancel} belongs to project {chosen[0].project}, not {project}: "
                                "nothing canceled")
    if not chosen:
        print(f"project {project} has no batch with work left: nothing to cancel", file=out)
    for batch in chosen:
        removed = batches.cancel(conn, batch.id, settings.result_ttl)
        after = batches.state(conn, batch.id)
        print(f"batch {batch.id} ({batch.kind}, project {project}): canceled {removed} queued job(s); "
              f"{after.running + after.retrying} running finish and write their predictions", file=out)
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    """Run `hybridgl prelabel` with parsed arguments; returns the exit code."""
    try:
        if getattr(args, "preview", None) and not getattr(args, "out", None):
            raise PrelabelError("--preview needs --out DIR: the folder the preview page is written to")
        settings = ServeSettings.from_env()
        if args.cancel:
            conn = q.connect(settings.redis_url)
            try:
                return cancel(args, settings, conn)
            except redis.RedisError as exc:
                raise PrelabelError(f"{_where(settings.redis_url)} is unreachable ({type(exc).__name__})") from None
        policy = FetchPolicy.from_settings(settings)
        client = client_from(settings.label_studio_url or None, settings.label_studio_api_key or None, policy=policy)
        if client is None:
            raise PrelabelError("Label Studio's address or token is not set: set LABEL_STUDIO_URL and "
                                "LABEL_STUDIO_API_KEY (as for `hybridgl serve` and the workers)")
        conn = q.connect(settings.redis_url)
        try:
            conn.ping()
        except redis.RedisError as exc:
            raise PrelabelError(f"{_where(settings.redis_url)} is unreachable ({type(exc).__name__}): start Redis "
                                "or point REDIS_URL at the one the workers use") from None
        runner = Prelabel(args, settings, client, conn)
        try:
            return runner.execute()
        except KeyboardInterrupt:  # during setup
            print("interrupted before anything was enqueued", file=sys.stderr)
            return EXIT_INTERRUPTED
        except (LabelStudioError, redis.RedisError, PrelabelError) as exc:
            if runner.watch or runner.tally.predicted:  # it had started: say where it stopped
                runner.tally.interrupted = True
                runner.tally.pending = len(runner.watch)
                runner.summary()
            if isinstance(exc, PrelabelError):
                raise
            raise PrelabelError(f"{exc}; run the same command again to continue") from None
    except (PrelabelError, ValueError) as exc:
        print(f"hybridgl prelabel: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
