"""The files of a run: a resumable run folder (``run.json`` says what its ``results.jsonl`` lines were
computed with) for the benchmark and the instance mode, and atomic writes of the outputs."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from worker.evaluate import EvaluateError

RESULTS_FILE = "results.jsonl"
RUN_FILE = "run.json"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def read_results(path: Path) -> dict[str, dict]:
    """``results.jsonl`` -> {key: line} (a later line with the same key wins)."""
    records: dict[str, dict] = {}
    if not Path(path).is_file():
        return records
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise EvaluateError(f"{path} line {number} is not JSON: remove it to recompute it") from None
                records[str(record["key"])] = record
    return records


def repair_results(path: Path) -> None:
    """Drop a last line cut short by an interrupted run (it is then recomputed)."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


@dataclass
class RunFolder:
    """An ``--out`` folder opened for a run: what an earlier run there recorded, and its lines."""

    out: Path
    identity: dict  # what the lines are about (dataset, split, annotation file, ...): must match to resume
    previous: dict | None  # the earlier run's run.json
    done: dict[str, dict]  # its result lines by key

    @property
    def run_path(self) -> Path:
        return self.out / RUN_FILE

    @property
    def results_path(self) -> Path:
        return self.out / RESULTS_FILE

    def start(self, settings, model_version: str, **extra) -> dict:
        """Record the run about to append lines (after its model is loaded: the weights decide
        ``model_version``); refuses when the earlier run's model version differs."""
        if self.previous is not None and self.previous.get("model_version") != model_version:
            raise EvaluateError(f"{self.out} holds results of model_version {self.previous.get('model_version')}, "
                                f"these settings give {model_version}: use another --out for another configuration")
        info = {**self.identity, "model_version": model_version, "settings": dataclasses.asdict(settings), **extra,
                "started": (self.previous or {}).get("started") or time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_atomic(self.run_path, json.dumps(info, indent=1) + "\n")
        return info


def open_run(out: Path, identity: dict, settings) -> RunFolder:
    """Open ``out`` to add a run's lines to the ones there. Refuses (without loading a model) when the
    earlier run there was about something else, or computed with settings that change answers (the
    ``index`` and ``query`` scopes; a setting the earlier run did not record counts as changed)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_path = out / RUN_FILE
    previous = json.loads(run_path.read_text(encoding="utf-8")) if run_path.is_file() else None
    if previous is not None:
        differ = [k for k in identity if previous.get(k) != identity[k]]
        if differ:
            there = ", ".join(f"{k}={previous.get(k)!r}" for k in differ)
            now = ", ".join(f"{k}={identity[k]!r}" for k in differ)
            raise EvaluateError(f"{out} holds results of another run ({there} instead of {now}): use another --out")
        recorded = previous.get("settings")
        if recorded:
            changed = {k: (recorded.get(k), v) for k, v in settings.scoped("index", "query").items()
                       if recorded.get(k) != v}
            if changed:
                raise EvaluateError(f"{out} holds results computed with other settings "
                                    f"({', '.join(f'{k}={a!r} there, {b!r} now' for k, (a, b) in changed.items())}): "
                                    "use another --out for another configuration")
    results_path = out / RESULTS_FILE
    repair_results(results_path)
    return RunFolder(out, identity, previous, read_results(results_path))
