"""oIoU and mIoU (HYBRIDGL.md section 7), and the summaries of a benchmark's result lines."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

# The order relation flags are reported in (worker/hybridgl/language.py RELATIONS).
RELATION_ORDER = ("none", "left", "right", "up", "down", "big", "small", "within")


def iou_metrics(pairs: Iterable[tuple[int, int]]) -> dict:
    """``pairs`` of (I, U) -> {sentences, I, U, oIoU = 100*sum(I)/sum(U), mIoU = 100*mean(I/U)}
    (``U = 0`` counts 0 in the mean; ``oIoU`` is 0 when ``sum(U) = 0``)."""
    total_i = total_u = 0
    ious: list[float] = []
    for i, u in pairs:
        total_i += int(i)
        total_u += int(u)
        ious.append(int(i) / int(u) if u else 0.0)
    return {"sentences": len(ious), "I": total_i, "U": total_u,
            "oIoU": 100.0 * total_i / total_u if total_u else 0.0,
            "mIoU": 100.0 * math.fsum(ious) / len(ious) if ious else 0.0}


def summarize(records: Iterable[dict], run_info: dict | None = None, split_sentences: int | None = None) -> dict:
    """The summary of result lines: pure and final (with guidance) metrics, overall and per
    relation flag, plus what the lines were computed with."""
    recs = list(records)
    info = dict(run_info or {})
    settings = info.get("settings") or {}

    def block(rs: list[dict]) -> dict:
        return {"sentences": len(rs),
                "pure": iou_metrics((r["I_pure"], r["U_pure"]) for r in rs),
                "final": iou_metrics((r["I_final"], r["U_final"]) for r in rs)}

    by_relation: dict[str, list[dict]] = {}
    for r in recs:
        by_relation.setdefault(r.get("relation") or "none", []).append(r)
    order = {name: i for i, name in enumerate(RELATION_ORDER)}
    summary = {
        "dataset": info.get("dataset"), "split": info.get("split"), "split_by": info.get("split_by"),
        "model_version": info.get("model_version"),
        "sentences": len(recs), "images": len({r.get("image") for r in recs}),
        "split_sentences": split_sentences,
        "complete": split_sentences is not None and len(recs) >= split_sentences,
        "errors": sum(1 for r in recs if r.get("error")),
        **{k: v for k, v in block(recs).items() if k != "sentences"},
        "by_relation": {name: block(by_relation[name])
                        for name in sorted(by_relation, key=lambda n: (order.get(n, len(order)), n))},
        "release_switches": {"right_fires": settings.get("right_fires"), "sticky_k": settings.get("sticky_k"),
                             "is_release": settings.get("right_fires") is False and settings.get("sticky_k") is True},
        "run": {k: v for k, v in info.items() if k not in ("settings", "model_version")},
        "settings": settings,
    }
    return summary


def summary_markdown(summary: dict) -> str:
    name = " ".join(str(x) for x in (summary.get("dataset"), summary.get("split_by"), summary.get("split")) if x)
    total = summary.get("split_sentences")
    sw = summary.get("release_switches") or {}
    lines = [
        f"## HybridGL on {name or 'a benchmark'}",
        "",
        f"{summary['sentences']}{f' of {total}' if total is not None else ''} sentences, "
        f"{summary['images']} image{'' if summary['images'] == 1 else 's'}; "
        f"model_version `{summary.get('model_version')}`; right_fires={_flag(sw.get('right_fires'))}, "
        f"sticky_k={_flag(sw.get('sticky_k'))}"
        + (" (the release's behaviour)" if sw.get("is_release") else "")
        + (f"; {summary['errors']} without an answer (counted as an empty mask)" if summary.get("errors") else ""),
        "",
        "| Subset | Sentences | Pure oIoU | Pure mIoU | Guided oIoU | Guided mIoU |",
        "|---|---:|---:|---:|---:|---:|",
        _md_row("all", summary["sentences"], summary["pure"], summary["final"]),
    ]
    for relation, block in summary["by_relation"].items():
        lines.append(_md_row(f"relation {relation}", block["sentences"], block["pure"], block["final"]))
    lines += ["", ("oIoU = 100·ΣI/ΣU, mIoU = 100·mean(I/U); Pure = argmax of the CLIP score, Guided = with "
                   "spatial guidance (relation + coherence); relation = the expression's relation flag."), ""]
    return "\n".join(lines)


def _flag(value: Any) -> str:
    return "?" if value is None else str(value).lower()


def _md_row(name: str, n: int, pure: dict, final: dict) -> str:
    return f"| {name} | {n} | {pure['oIoU']:.2f} | {pure['mIoU']:.2f} | {final['oIoU']:.2f} | {final['mIoU']:.2f} |"
