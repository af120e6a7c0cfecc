"""The delivery ledger: who delivers a task's prediction, decided atomically in Redis.

The unit is (project, task, model_version), the project by its key (``jobspec.project_key``: Label
Studio's '<id>.<created timestamp>', so that two Label Studio instances sharing the workers never
share an entry). Label Studio saves every prediction it is given, so two deliveries for one task are
two predictions. Three parties may deliver one:
- a /predict response (Retrieve Predictions, a task open) that has the answer in hand;
- the worker that ran the job, when the task was handed off to it (the /predict budget ran out,
  or `hybridgl prelabel` asked for it);
- `hybridgl prelabel`, when the job had already finished before it handed the task off.

One Redis hash per task records ``state`` (``handoff``, ``returned``, ``writing``, ``written``),
``job`` and ``at`` (Redis ``TIME``, one clock for every host). Each decision is one Lua script, so
two parties never both win:
- :meth:`Ledger.take` (a party with the answer in hand): wins unless another party delivered;
- :meth:`Ledger.hand_off` (a party without it): marks the task for its job's worker to write,
  unless the answer is already stored (then the caller takes and delivers it itself);
- :meth:`Ledger.finish` (the worker, with the answer): stores the answer for the job, and writes
  it only if the task was handed off (or it is retrying its own interrupted write).

Label Studio is the record, the ledger the arbiter: a caller passes the time its view of Label
Studio was taken (a /predict body's tasks, prelabel's task listing). An entry older than that view
by ``settle`` seconds whose prediction the view does not show was deleted (or never saved): it no
longer counts, so a deleted prediction is predicted again on the next request. A ``writing`` entry
counts until its job's whole lifetime (time limit and retries) has passed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis

from backend.jobspec import PREFIX, project_key

HANDED, DELIVERED, ANSWER = "handed", "delivered", "answer"
RETURNED, WRITING, WRITTEN, HANDOFF = "returned", "writing", "written", "handoff"
SETTLE_SECONDS = 30  # a delivered prediction shows in Label Studio's view within this (save after a response)
DELIVERED_TTL = 24 * 3600  # after this Label Studio's own record suffices (predicted tasks are skipped)
HANDOFF_TTL = 7 * 24 * 3600  # a handed-off job may wait long in a big prelabel queue

# KEYS[1] entry; ARGV: settled_before, writing_before. Returns 1 when the entry no longer counts.
_STALE = """
local function stale(key, settled_before, writing_before)
  local entry = redis.call('HMGET', key, 'state', 'at')
  local state, at = entry[1], tonumber(entry[2])
  if not state or state == 'handoff' then return true end
  if state == 'writing' then return at < writing_before end
  return at < settled_before
end
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end
"""
# KEYS: entry. ARGV: job, state, settled_before, writing_before, ttl. -> {won, state in force}
_TAKE = _STALE + """
if not stale(KEYS[1], tonumber(ARGV[3]), tonumber(ARGV[4])) then
  return {0, redis.call('HGET', KEYS[1], 'state')}
end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'job', ARGV[1], 'at', tostring(now()))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
return {1, ARGV[2]}
"""
# KEYS: entry, answer. ARGV: job, settled_before, writing_before, ttl. -> handed | delivered | answer
_HAND_OFF = _STALE + """
local state = redis.call('HGET', KEYS[1], 'state')
if state and state ~= 'handoff' and not stale(KEYS[1], tonumber(ARGV[2]), tonumber(ARGV[3])) then
  return 'delivered'
end
if redis.call('EXISTS', KEYS[2]) == 1 then return 'answer' end
redis.call('HSET', KEYS[1], 'state', 'handoff', 'job', ARGV[1], 'at', tostring(now()))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
return 'handed'
"""
# KEYS: entry, answer. ARGV: job, answer json, answer ttl, ttl. -> 1 when the worker must write
_FINISH = _STALE + """
redis.call('SET', KEYS[2], ARGV[2], 'EX', tonumber(ARGV[3]))
local entry = redis.call('HMGET', KEYS[1], 'state', 'job')
if entry[1] == 'handoff' or (entry[1] == 'writing' and entry[2] == ARGV[1]) then
  redis.call('HSET', KEYS[1], 'state', 'writing', 'job', ARGV[1], 'at', tostring(now()))
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
  return 1
end
return 0
"""
# KEYS: entry. ARGV: job, ttl. -> 1 when recorded
_WRITTEN = _STALE + """
local entry = redis.call('HMGET', KEYS[1], 'state', 'job')
if entry[1] ~= 'writing' or entry[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'written', 'at', tostring(now()))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""


def entry_key(project: Any, task_id: Any, model_version: str) -> str:
    return f"{PREFIX}:delivery:{project_key(project)}:{task_id}:{model_version}"


def answer_key(job_id: str) -> str:
    return f"{PREFIX}:answer:{job_id}"


def redis_now(conn: redis.Redis) -> float:
    seconds, micros = conn.time()
    return seconds + micros / 1e6


@dataclass(frozen=True)
class View:
    """When the caller's view of Label Studio was taken, and how long a job may live (its writes with it)."""

    taken_at: float  # Redis TIME
    job_lifetime: float

    def cutoffs(self, settle: float) -> tuple[float, float]:
        return self.taken_at - settle, self.taken_at - self.job_lifetime


class Ledger:
    def __init__(self, conn: redis.Redis, answer_ttl: int, settle: float = SETTLE_SECONDS):
        self.conn = conn
        self.answer_ttl = answer_ttl
        self.settle = settle
        self._take = conn.register_script(_TAKE)
        self._hand_off = conn.register_script(_HAND_OFF)
        self._finish = conn.register_script(_FINISH)
        self._written = conn.register_script(_WRITTEN)

    def view(self, job_lifetime: float) -> View:
        """Call just after reading Label Studio's state (or receiving it in a request)."""
        return View(redis_now(self.conn), job_lifetime)

    def take(self, key: str, job_id: str, view: View, writing: bool = False) -> bool:
        """Deliver it yourself (in a response, or ``writing`` it to Label Studio)? True: yours alone."""
        won, _ = self._take(keys=[key], args=[job_id, WRITING if writing else RETURNED, *view.cutoffs(self.settle),
                                              HANDOFF_TTL if writing else DELIVERED_TTL])
        return bool(won)

    def hand_off(self, key: str, job_id: str, view: View) -> str:
        """Leave the delivery to the job: HANDED (its worker writes), DELIVERED (someone did), or
        ANSWER (it finished already: :meth:`take` and deliver :meth:`answer` yourself)."""
        outcome = self._hand_off(keys=[key, answer_key(job_id)], args=[job_id, *view.cutoffs(self.settle), HANDOFF_TTL])
        return outcome.decode() if isinstance(outcome, bytes) else str(outcome)

    def finish(self, key: str, job_id: str, answer: dict) -> bool:
        """The worker stores its answer; True when it must write it to Label Studio."""
        return bool(self._finish(keys=[key, answer_key(job_id)],
                                 args=[job_id, json.dumps(answer), self.answer_ttl, HANDOFF_TTL]))

    def written(self, key: str, job_id: str) -> None:
        """The write succeeded: from now on Label Studio shows it."""
        self._written(keys=[key], args=[job_id, DELIVERED_TTL])

    def answer(self, job_id: str) -> dict | None:
        raw = self.conn.get(answer_key(job_id))
        return json.loads(raw) if raw else None

    def state(self, key: str) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.conn.hgetall(key).items()}
