"""`hybridgl evaluate` instance mode (issue 13 item 6): the measures on known answers, a COCO-format
run on generated data (real MobileSAM, random-weight CLIP: the numbers check the plumbing, not
accuracy), and the same measures on a Label Studio export."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from worker import evaluate
from worker.evaluate import instances as ei
from worker.hybridgl.settings import add_settings_arguments

from .test_evaluate import _box, _brush, _rle_counts, _settings_argv

REPO = Path(__file__).resolve().parents[1]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridgl evaluate")
    evaluate.add_arguments(parser)
    add_settings_arguments(parser)
    return parser


def test_match_ap50_and_presence_on_known_answers():
    gt1, gt2 = _box(40, 40, (0, 10), (0, 10)), _box(40, 40, (20, 30), (20, 30))
    near2 = _box(40, 40, (22, 32), (20, 30))  # IoU 80/120 with gt2
    elsewhere = _box(40, 40, (0, 5), (30, 40))
    scored = ei.match([(0.8, elsewhere), (0.9, gt1), (0.7, near2)], [gt1, gt2])
    assert scored == [[0.9, 1], [0.8, 0], [0.7, 1]]  # most confident first
    # precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1: 51 recall points at 1, 50 at 2/3
    assert ei.ap50(scored, 2) == pytest.approx((51 + 50 * 2 / 3) / 101)
    assert ei.ap50([], 2) == 0.0 and ei.ap50(scored, 0) is None
    # a prediction on a crowd region is ignored, neither right nor wrong
    crowd = _box(40, 40, (0, 20), (25, 40))
    assert ei.match([(0.5, elsewhere)], [], [crowd]) == [[0.5, -1]]
    best = ei.best_f1_threshold(scored, 2)
    assert best == {"threshold": 0.7, "f1": pytest.approx(0.8), "precision": pytest.approx(2 / 3), "recall": 1.0}

    records = [{"labels": {"car": {"gt": 2, "pred": scored}, "cat": {"gt": 0, "pred": [[0.6, 0]]}}},
               {"labels": {"car": {"gt": 1, "pred": []}, "cat": {"gt": 0, "pred": []}}}]
    summary = ei.summarize(records)
    car, cat = summary["labels"]["car"], summary["labels"]["cat"]
    assert (car["true_regions"], car["predicted_regions"], car["true_positives"]) == (3, 3, 2)
    assert car["precision"] == pytest.approx(2 / 3) and car["recall"] == pytest.approx(2 / 3)
    assert (car["presence_precision"], car["presence_recall"]) == (1.0, 0.5)  # missed on image 2
    assert (cat["presence_precision"], cat["presence_recall"], cat["AP50"]) == (0.0, None, None)  # absent, yet found
    o = summary["overall"]
    assert o["mAP50"] == pytest.approx(car["AP50"]) and o["presence_precision"] == pytest.approx(1 / 2)
    assert "| car | 3 | 3 | 66.7 | 66.7 |" in ei.markdown(summary, "t")


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """Two generated scenes and their COCO annotations: polygons, uncompressed RLE, a crowd region."""
    root = tmp_path_factory.mktemp("coco")
    (root / "images").mkdir()
    h, w = 96, 128
    scenes = []
    for n, boxes in enumerate(([(10, 40, 10, 50), (50, 90, 70, 120)], [(20, 70, 30, 90)])):
        rgb = np.full((h, w, 3), (90, 140, 90), np.uint8)
        for k, (y0, y1, x0, x1) in enumerate(boxes):
            rgb[y0:y1, x0:x1] = (200, 30, 30) if k == 0 else (30, 30, 200)
        Image.fromarray(rgb).save(root / "images" / f"scene{n}.png")
        scenes.append(boxes)
    (y0, y1, x0, x1), (b0, b1, a0, a1) = scenes[0]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 1.0, "bbox": [0, 0, 1, 1],
         "segmentation": [[x0, y0, x1 - 1, y0, x1 - 1, y1 - 1, x0, y1 - 1]]},
        {"id": 2, "image_id": 1, "category_id": 2, "iscrowd": 0, "area": 1.0, "bbox": [0, 0, 1, 1],
         "segmentation": {"size": [h, w], "counts": _rle_counts(_box(h, w, (b0, b1), (a0, a1)))}},
        {"id": 3, "image_id": 2, "category_id": 1, "iscrowd": 1, "area": 1.0, "bbox": [0, 0, 1, 1],
         "segmentation": {"size": [h, w], "counts": _rle_counts(_box(h, w, (20, 70), (30, 90)))}},
    ]
    data = {"images": [{"id": i + 1, "file_name": f"scene{i}.png", "height": h, "width": w} for i in range(2)],
            "annotations": annotations,
            "categories": [{"id": 1, "name": "red box"}, {"id": 2, "name": "blue box"}, {"id": 3, "name": "cat"}]}
    (root / "instances.json").write_text(json.dumps(data))
    return root


def test_coco_instances_run_matches_the_pipeline_and_resumes(coco, tiny_settings, tmp_path):
    from worker.hybridgl.pipeline import HybridGL

    out = tmp_path / "run"
    settings = tiny_settings.replace(instance_threshold=0.0)  # keep every region CLIP ranks as a label
    base = ["--coco-instances", str(coco / "instances.json"), "--images", str(coco / "images"), "--out", str(out),
            "--no-progress"] + _settings_argv(settings)
    assert evaluate.run(_parser().parse_args(base + ["--limit", "1"])) == 0
    first = (out / "results.jsonl").read_text().splitlines()
    assert len(first) == 1
    assert evaluate.run(_parser().parse_args(base)) == 0
    lines = (out / "results.jsonl").read_text().splitlines()
    assert lines[0] == first[0] and len(lines) == 2  # resumed: the first image was not redone

    pipeline = HybridGL(settings)
    names = ["red box", "blue box", "cat"]
    for line, name in zip(map(json.loads, lines), ("scene0.png", "scene1.png")):
        answer = pipeline.instances(pipeline.index(coco / "images" / name), names)
        for k, label in enumerate(names):  # every instance the pipeline finds is counted, scored as it scores
            expected = sorted((round(i.score, 9) for i in answer.instances if i.target == k), reverse=True)
            assert [round(p[0], 9) for p in line["labels"][label]["pred"]] == expected
    assert [json.loads(x)["labels"]["red box"]["gt"] for x in lines] == [1, 0]  # the crowd region is no truth

    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"]["images"] == 2 and summary["overall"]["true_regions"] == 2
    for v in summary["labels"].values():
        assert v["AP50"] is None or 0.0 <= v["AP50"] <= 1.0
    assert summary["run"]["prompts"] == names
    assert "| red box |" in (out / "summary.md").read_text()

    with pytest.raises(ValueError, match="other settings"):
        evaluate.run(_parser().parse_args(base + ["--instance-threshold", "0.7"]))


def test_coco_instances_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    args = ["--coco-instances", str(bad), "--images", str(tmp_path), "--out", str(tmp_path / "o")]
    with pytest.raises(ValueError, match="lacks the list"):
        evaluate.run(_parser().parse_args(args))
    bad.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": " "}]}))
    with pytest.raises(ValueError, match="no name"):
        evaluate.run(_parser().parse_args(args))


def test_labelstudio_export_instances(tmp_path):
    """Predicted regions (with scores) against the corrected annotation: one accepted, one moved too far,
    one deleted (a false positive), one the annotator added (a miss)."""
    a, b, c, d = (_box(100, 100, r, r) for r in ((0, 20), (30, 50), (60, 80), (85, 95)))
    moved = _box(100, 100, (30, 50), (42, 62))  # IoU 8/32 with b: not a match

    def scored(region, score):
        return {**region, "score": score}

    export = [{"id": 1, "data": {"image": "/x.jpg"},
               "predictions": [{"id": 9, "score": 0.6, "result": [
                   scored(_brush("r1", "Car", a), 0.9), scored(_brush("r2", "Car", b), 0.6),
                   scored(_brush("r3", "Car", c), 0.7)]}],
               "annotations": [{"id": 5, "was_cancelled": False, "parent_prediction": 9, "result": [
                   _brush("r1", "Car", a), _brush("r2", "Car", moved), _brush("n", "Car", d)]}]}]
    path = tmp_path / "export.json"
    path.write_text(json.dumps(export))
    out = tmp_path / "out"
    code = ("import sys, argparse; from worker import evaluate; p = argparse.ArgumentParser(); "
            "evaluate.add_arguments(p); "
            f"rc = evaluate.run(p.parse_args(['--labelstudio-export', {str(path)!r}, '--instances', '--out', "
            f"{str(out)!r}])); assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    car = json.loads((out / "summary.json").read_text())["labels"]["Car"]
    assert (car["true_regions"], car["predicted_regions"], car["true_positives"]) == (3, 3, 1)
    assert car["precision"] == pytest.approx(1 / 3) and car["recall"] == pytest.approx(1 / 3)
    # ranked 0.9 (right), 0.7 (wrong), 0.6 (wrong): precision 1 up to recall 1/3
    assert car["AP50"] == pytest.approx(34 / 101)
    assert (car["presence_precision"], car["presence_recall"]) == (1.0, 1.0)
