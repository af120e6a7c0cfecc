"""Prints the README's settings table (markdown) from the code's own settings definitions.

    .venv/bin/python scripts/settings_table.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.config import serve_fields  # noqa: E402
from worker.hybridgl.settings import env_name, setting_fields  # noqa: E402


def rows() -> list[tuple[str, str, str, str]]:
    """(variable, default, who reads it, what it does) for every setting."""
    out = [(f.metadata["env"], repr(f.default) if isinstance(f.default, str) else str(f.default),
            "backend, worker", f.metadata["help"]) for f in serve_fields()]
    scope = {"index": "worker (index key)", "query": "worker (results)", "runtime": "worker"}
    out += [(env_name(f.name), repr(f.default) if isinstance(f.default, str) else str(f.default),
             scope[f.metadata["scope"]], f.metadata["help"]) for f in setting_fields()]
    return out


def table() -> str:
    lines = ["| Variable | Default | Read by | What it does |", "|---|---|---|---|"]
    lines += [f"| `{v}` | `{d}` | {who} | {h} |" for v, d, who, h in rows()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
