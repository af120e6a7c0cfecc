"""An annotator's interactive state per task: the current prompt and the clicks made on its suggestion.

Label Studio sends a smart click without the prompt it corrects, and each click alone. The web
process therefore keeps, per (project, task), in Redis under ``interactive:<project>:<task>``:
- ``prompt``: the last typed prompt (text and label). Typing a prompt, a new one or an earlier
  one again, makes it current and starts its clicks afresh;
- ``clicks``: the positive and negative clicks since then, in order (a click Label Studio sends
  twice counts once).
A click job carries the current prompt and all its clicks, so that the worker refines that
prompt's own mask with every click so far (and equal states join one job). The state lasts
``STATE_TTL`` after its last use; annotators of one task share it.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from backend.jobspec import PREFIX, project_key

STATE_TTL = 24 * 3600

# KEYS: state. ARGV: clicks json, ttl. -> the state json after adding the clicks not already in it
_ADD_CLICKS = """
local raw = redis.call('GET', KEYS[1])
local state = raw and cjson.decode(raw) or {clicks = {}}
if type(state.clicks) ~= 'table' then state.clicks = {} end
for _, click in ipairs(cjson.decode(ARGV[1])) do
  local seen = false
  for _, old in ipairs(state.clicks) do
    if old.x == click.x and old.y == click.y and old.positive == click.positive then seen = true end
  end
  if not seen then table.insert(state.clicks, click) end
end
local out = cjson.encode(state)
redis.call('SET', KEYS[1], out, 'EX', tonumber(ARGV[2]))
return out
"""


def state_key(project: Any, task_id: Any) -> str:
    return f"{PREFIX}:interactive:{project_key(project)}:{task_id}"


def start_prompt(conn: redis.Redis, project: Any, task_id: Any, prompt: dict) -> None:
    """A typed prompt becomes current, without clicks."""
    conn.set(state_key(project, task_id), json.dumps({"prompt": prompt, "clicks": []}), ex=STATE_TTL)


def add_clicks(conn: redis.Redis, project: Any, task_id: Any, clicks: list[dict]) -> tuple[dict | None, list[dict]]:
    """Add clicks to the task's state; returns (current prompt or None, every click since it was typed)."""
    # Sub-pixel rounding, so that a click sent twice compares equal after a round trip through Lua's JSON.
    clicks = [{**c, "x": round(float(c["x"]), 4), "y": round(float(c["y"]), 4)} for c in clicks]
    raw = conn.eval(_ADD_CLICKS, 1, state_key(project, task_id), json.dumps(clicks), STATE_TTL)
    state = json.loads(raw)
    prompt = state.get("prompt")
    return (prompt if isinstance(prompt, dict) else None), list(state.get("clicks") or [])
