"""``hybridgl evaluate``: the benchmark protocol on tiny datasets written here in the real file
formats (REFER refs(unc).p as Python 2 writes it + COCO instances.json; PhraseCut refer_test.json),
on real photos, with the expected IoUs computed independently (the pipeline's own answers against
ground truths built here); and the Label Studio export report on a hand-made export."""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from worker import evaluate
from worker.evaluate import benchmark, files
from worker.hybridgl.settings import add_settings_arguments, setting_fields

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"


# --- helpers ---------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridgl evaluate")
    evaluate.add_arguments(parser)
    add_settings_arguments(parser)
    return parser


def _settings_argv(settings) -> list[str]:
    """Every setting as a flag, so the run uses exactly these settings whatever the environment."""
    argv: list[str] = []
    for f in setting_fields():
        flag = "--" + f.name.replace("_", "-")
        value = getattr(settings, f.name)
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    return argv


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _py2_pickle(obj) -> bytes:
    """The bytes Python 2's ``cPickle.dump(obj, f, 2)`` writes for plain lists, dicts, str and int:
    str as (SHORT_)BINSTRING, i.e. bytes to Python 3, and no class references."""
    out: list[bytes] = [b"\x80\x02"]

    def put(o) -> None:
        if isinstance(o, dict):
            out.append(b"}")
            if o:
                out.append(b"(")
                for k, v in o.items():
                    put(k)
                    put(v)
                out.append(b"u")
        elif isinstance(o, list):
            out.append(b"]")
            if o:
                out.append(b"(")
                for v in o:
                    put(v)
                out.append(b"e")
        elif isinstance(o, int):
            if 0 <= o < 256:
                out.append(b"K" + bytes([o]))
            elif 0 <= o < 65536:
                out.append(b"M" + o.to_bytes(2, "little"))
            else:
                out.append(b"J" + o.to_bytes(4, "little", signed=True))
        elif isinstance(o, str):
            data = o.encode("utf-8")
            out.append(b"U" + bytes([len(data)]) + data if len(data) < 256
                       else b"T" + struct.pack("<i", len(data)) + data)
        else:
            raise TypeError(type(o))

    put(obj)
    out.append(b".")
    return b"".join(out)


def _rle_counts(mask: np.ndarray) -> list[int]:
    """COCO uncompressed RLE counts: column-major runs, the first a run of 0s."""
    flat = np.asarray(mask, dtype=np.uint8).T.ravel()
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    return [0] + counts if flat[0] else counts


def _rle_string(counts: list[int]) -> str:
    """COCO's compressed RLE string (cocoapi's rleToString, written independently of the decoder)."""
    out = bytearray()
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(c + 48)
    return out.decode("ascii")


def _box(h: int, w: int, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[rows[0]:rows[1], cols[0]:cols[1]] = True
    return m


def _iu(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    return int((pred & gt).sum()), int((pred | gt).sum())


# --- ground-truth rasterization ---------------------------------------------------------------------
# pycocotools 2.0.11, mask.decode(mask.frPyObjects([[2.3, 1.7, 10.6, 3.2, 4.1, 8.9]], 10, 12)):
TRIANGLE = [2.3, 1.7, 10.6, 3.2, 4.1, 8.9]
TRIANGLE_MASK = """
............
............
...####.....
...#######..
...######...
...#####....
....###.....
....##......
....#.......
............
"""
TRIANGLE_RLE = "P1463MO1O2N1O1Ob0"  # pycocotools' mask.encode of that mask


def test_coco_polygons_rasterize_as_pycocotools():
    # An integer rectangle covers exactly columns x0..x1-1 and rows y0..y1-1 (w*h pixels).
    rect = evaluate.coco_polygon_mask([10, 5, 20, 5, 20, 15, 10, 15], 30, 40)
    assert rect.sum() == 10 * 10
    assert np.array_equal(rect, _box(30, 40, (5, 15), (10, 20)))
    # A triangle with fractional vertices, pixel for pixel as pycocotools.
    expected = np.array([[c == "#" for c in row] for row in TRIANGLE_MASK.split()])
    assert np.array_equal(evaluate.coco_polygon_mask(TRIANGLE, 10, 12), expected)
    # RLE: our test encoder agrees with pycocotools' string; the decoder reads it back.
    assert _rle_string(_rle_counts(expected)) == TRIANGLE_RLE
    assert np.array_equal(evaluate.coco_segmentation_mask({"size": [10, 12], "counts": TRIANGLE_RLE}, 10, 12),
                          expected)
    assert np.array_equal(evaluate.coco_segmentation_mask({"size": [10, 12], "counts": _rle_counts(expected)},
                                                          10, 12), expected)
    # Several polygons: union, or (the authors' loader) only pixels covered once.
    two = [[0, 0, 6, 0, 6, 6, 0, 6], [3, 3, 9, 3, 9, 9, 3, 9]]
    a, b = _box(12, 12, (0, 6), (0, 6)), _box(12, 12, (3, 9), (3, 9))
    assert np.array_equal(evaluate.coco_segmentation_mask(two, 12, 12), a | b)
    assert np.array_equal(evaluate.coco_segmentation_mask(two, 12, 12, "single"), a ^ b)
    # Counts that do not cover the image are refused (pycocotools itself would decode the rest from
    # uninitialised memory), both uncompressed and compressed (the triangle's string is 10x12 pixels).
    with pytest.raises(ValueError, match="RLE"):
        evaluate.coco_segmentation_mask({"size": [5, 5], "counts": [3, 4]}, 5, 5)
    with pytest.raises(ValueError, match="RLE counts sum to 120, not 11x12"):
        evaluate.coco_segmentation_mask({"size": [11, 12], "counts": TRIANGLE_RLE}, 11, 12)


def test_phrasecut_polygons_rasterize_as_its_code():
    # PhraseCut truncates vertices with int() and fills with PIL, boundary included: 11 x 11 pixels.
    m = evaluate.phrasecut_mask([[[10.9, 10.2], [20, 10], [20.7, 20], [10, 20]], [[3, 3]]], 30, 40)
    assert m.sum() == 11 * 11
    assert np.array_equal(m, _box(30, 40, (10, 21), (10, 21)))


def test_metrics_arithmetic():
    m = evaluate.iou_metrics([(50, 100), (0, 0), (30, 60), (0, 40)])
    assert m["oIoU"] == pytest.approx(100 * 80 / 200)
    assert m["mIoU"] == pytest.approx(100 * (0.5 + 0 + 0.5 + 0) / 4)  # U = 0 counts 0
    assert (m["I"], m["U"], m["sentences"]) == (80, 200, 4)
    assert evaluate.iou_metrics([])["oIoU"] == 0.0
    recs = [{"image": "a", "relation": "left", "I_pure": 10, "U_pure": 20, "I_final": 20, "U_final": 20},
            {"image": "a", "relation": "none", "I_pure": 0, "U_pure": 10, "I_final": 5, "U_final": 10},
            {"image": "b", "relation": "left", "I_pure": 30, "U_pure": 30, "I_final": 0, "U_final": 30}]
    s = evaluate.summarize(recs, {"dataset": "refcoco", "settings": {"right_fires": False, "sticky_k": True}},
                           split_sentences=4)
    assert s["pure"]["oIoU"] == pytest.approx(100 * 40 / 60)
    assert s["final"]["mIoU"] == pytest.approx(100 * (1 + 0.5 + 0) / 3)
    assert list(s["by_relation"]) == ["none", "left"]
    assert s["by_relation"]["left"]["final"]["oIoU"] == pytest.approx(100 * 20 / 50)
    assert (s["sentences"], s["images"], s["complete"]) == (3, 2, False)
    assert s["release_switches"]["is_release"] is True
    assert "| relation left | 2 |" in evaluate.summary_markdown(s)


def test_refs_pickles_are_read_without_running_code(tmp_path):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(_py2_pickle([{"ref_id": 70000, "sentences": [{"raw": "café", "sent_id": 3}]}]))
    assert evaluate.load_refs(path) == [{"ref_id": 70000, "sentences": [{"raw": "café", "sent_id": 3}]}]
    path.write_bytes(pickle.dumps([{"ref_id": 1, "split": "val"}], protocol=2))  # Python 3 written
    assert evaluate.load_refs(path) == [{"ref_id": 1, "split": "val"}]
    marker = tmp_path / "ran"
    path.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    with pytest.raises(ValueError, match="refusing to load os.system"):
        evaluate.load_refs(path)
    assert not marker.exists()


def test_interrupted_line_is_dropped(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"key": "1", "I_pure": 1}\n{"key": "2", "I_p')
    files.repair_results(path)
    assert list(evaluate.read_results(path)) == ["1"]
    assert path.read_text().endswith("\n")


def test_phrasecut_gets_its_sam_preset_unless_one_is_chosen(monkeypatch):
    monkeypatch.delenv("HYBRIDGL_SAM_PRESET", raising=False)
    p = _parser()
    assert benchmark._benchmark_settings(p.parse_args([]), "phrasecut").sam_preset == "phrasecut"
    assert benchmark._benchmark_settings(p.parse_args([]), "refcocog").sam_preset == "refcoco"
    chosen = p.parse_args(["--sam-preset", "refcoco"])
    assert benchmark._benchmark_settings(chosen, "phrasecut").sam_preset == "refcoco"


# --- the benchmark end to end ------------------------------------------------------------------------
# image 1 = dog.jpg, image 2 = groceries.jpg; (sent_id, ref_id, text)
SENTENCES = {
    11: [(1001, "the dog on the left"), (1002, "a brown dog")],
    12: [(1003, "grass")],
    21: [(2001, "the bottle on the right")],
    22: [(2002, "a red apple"), (2003, "the bigger box below the shelf")],
}
ANN = {11: 101, 12: 102, 21: 201, 22: 202}  # ref -> annotation
RECT_101 = [100, 200, 400, 200, 400, 500, 100, 500]  # rows 200..499, columns 100..399
POLYS_202 = [[500, 100, 700, 100, 700, 300, 500, 300], [600, 200, 780, 200, 780, 400, 600, 400]]


@pytest.fixture(scope="module")
def bench(tiny_settings, tmp_path_factory):
    """The pipeline's own answers on the two photos (the expected values), and a REFER-format
    dataset whose ground truths are known pixel sets: rectangles, and for two objects exactly a mask
    the pipeline answers (stored as uncompressed and compressed RLE), so those IoUs are 100."""
    from worker.hybridgl.pipeline import HybridGL

    pipeline = HybridGL(tiny_settings)
    root = tmp_path_factory.mktemp("refcoco")
    images = root / "train2014"
    images.mkdir()
    names = {1: "COCO_train2014_000000000001.jpg", 2: "COCO_train2014_000000000002.jpg"}
    shutil.copy(DATA / "dog.jpg", images / names[1])
    shutil.copy(DATA / "groceries.jpg", images / names[2])
    rgbs = {i: _rgb(images / n) for i, n in names.items()}
    indexes = {i: pipeline.index(rgb) for i, rgb in rgbs.items()}
    (h1, w1), (h2, w2) = rgbs[1].shape[:2], rgbs[2].shape[:2]

    answers = {sid: pipeline.query(indexes[1 if ref < 20 else 2], text)
               for ref, sents in SENTENCES.items() for sid, text in sents}
    grass = answers[1003].mask  # ground truth 102 = the final answer to "grass"
    bottle = indexes[2].masks[answers[2001].pure].numpy()  # ground truth 201 = the pure answer
    gts = {101: _box(h1, w1, (200, 500), (100, 400)), 102: grass, 201: bottle,
           202: _box(h2, w2, (100, 300), (500, 700)) | _box(h2, w2, (200, 400), (600, 780))}
    instances = {
        "images": [{"id": i, "file_name": n, "height": rgbs[i].shape[0], "width": rgbs[i].shape[1]}
                   for i, n in names.items()],
        "annotations": [
            {"id": 101, "image_id": 1, "category_id": 1, "segmentation": [RECT_101], "iscrowd": 0,
             "area": 90000.0, "bbox": [100, 200, 300, 300]},
            {"id": 102, "image_id": 1, "category_id": 2, "iscrowd": 1, "area": float(grass.sum()),
             "bbox": [0, 0, 1, 1],
             "segmentation": {"size": [h1, w1], "counts": _rle_counts(grass)}},
            {"id": 201, "image_id": 2, "category_id": 3, "iscrowd": 1, "area": float(bottle.sum()),
             "bbox": [0, 0, 1, 1],
             "segmentation": {"size": [h2, w2], "counts": _rle_string(_rle_counts(bottle))}},
            {"id": 202, "image_id": 2, "category_id": 3, "segmentation": POLYS_202, "iscrowd": 0,
             "area": 1.0, "bbox": [500, 100, 280, 300]},
        ],
        "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "grass"}, {"id": 3, "name": "thing"}],
    }
    (root / "instances.json").write_text(json.dumps(instances))
    refs = []
    for ref_id, sents in SENTENCES.items():
        image_id = 1 if ref_id < 20 else 2
        refs.append({"ref_id": ref_id, "ann_id": ANN[ref_id], "image_id": image_id, "split": "val",
                     "category_id": 1, "file_name": names[image_id].replace(".jpg", f"_{ref_id}.jpg"),
                     "sent_ids": [s for s, _ in sents],
                     "sentences": [{"sent": text.lower(), "raw": text, "tokens": text.split(), "sent_id": sid}
                                   for sid, text in sents]})
    refs.append({"ref_id": 31, "ann_id": 101, "image_id": 1, "split": "testA", "category_id": 1,
                 "file_name": "x.jpg", "sent_ids": [3001],
                 "sentences": [{"sent": "ignored", "raw": "ignored", "tokens": ["ignored"], "sent_id": 3001}]})
    (root / "refs(unc).p").write_bytes(_py2_pickle(refs))

    expected = {}
    for ref_id, sents in SENTENCES.items():
        gt = gts[ANN[ref_id]]
        index = indexes[1 if ref_id < 20 else 2]
        for sid, _ in sents:
            r = answers[sid]
            ip, up = _iu(index.masks[r.pure].numpy(), gt)
            i_f, u_f = _iu(r.mask, gt)
            expected[str(sid)] = {"I_pure": ip, "U_pure": up, "I_final": i_f, "U_final": u_f,
                                  "relation": r.explanation["relation"], "chosen": r.chosen, "pure": r.pure,
                                  "gt_area": int(gt.sum())}
    # The index cache starts with image 2's index (the runs build image 1's themselves): it saves
    # a SAM pass, and the runs then exercise both a cache hit and a build.
    cache = tmp_path_factory.mktemp("index-cache")
    evaluate.save_index(evaluate.index_cache_path(cache, indexes[2].key), indexes[2])
    return {"pipeline": pipeline, "root": root, "images": images, "indexes": indexes, "rgbs": rgbs,
            "expected": expected, "cache": cache, "argv": _settings_argv(tiny_settings)}


def _image_of(key: str) -> int:
    return 1 if key.startswith("1") else 2


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_refcoco_benchmark_matches_the_pipeline_and_resumes(bench, tmp_path):
    out = tmp_path / "run"
    base = ["--dataset", "refcoco", "--data-dir", str(bench["root"]), "--images", str(bench["images"]),
            "--out", str(out), "--no-progress", "--index-cache", str(bench["cache"])] + bench["argv"]
    p = _parser()
    assert evaluate.run(p.parse_args(base + ["--limit", "2"])) == 0
    first = _lines(out / "results.jsonl")
    assert [json.loads(x)["key"] for x in first] == ["1001", "1002"]
    assert len(list(bench["cache"].glob("*.index.npz"))) == 2  # image 1's index, built by the run
    assert json.loads((out / "summary.json").read_text())["sentences"] == 2

    assert evaluate.run(p.parse_args(base)) == 0
    lines = _lines(out / "results.jsonl")
    assert lines[:2] == first  # not recomputed (same timestamps)
    records = [json.loads(x) for x in lines]
    assert [r["key"] for r in records] == ["1001", "1002", "1003", "2001", "2002", "2003"]  # testA left out
    expected = bench["expected"]
    for r in records:
        e = expected[r["key"]]
        assert {k: r[k] for k in e} == e, r["key"]
        assert r["error"] is None and r["proposals"] == len(bench["indexes"][_image_of(r["key"])])
    assert records[0]["ann_id"] == 101 and records[0]["ref_id"] == 11 and records[0]["sent_id"] == 1001
    assert records[0]["image"] == "COCO_train2014_000000000001.jpg"
    # The two objects whose ground truth is exactly a mask the pipeline answers.
    assert records[2]["I_final"] == records[2]["U_final"] > 0
    assert records[3]["I_pure"] == records[3]["U_pure"] > 0

    summary = json.loads((out / "summary.json").read_text())
    e = list(expected.values())
    assert summary["pure"]["oIoU"] == pytest.approx(100 * sum(x["I_pure"] for x in e) / sum(x["U_pure"] for x in e))
    assert summary["pure"]["mIoU"] == pytest.approx(100 * np.mean([x["I_pure"] / x["U_pure"] for x in e]))
    assert summary["final"]["oIoU"] == pytest.approx(100 * sum(x["I_final"] for x in e) / sum(x["U_final"] for x in e))
    assert summary["final"]["mIoU"] == pytest.approx(100 * np.mean([x["I_final"] / x["U_final"] for x in e]))
    relations = {}
    for x in e:
        relations[x["relation"]] = relations.get(x["relation"], 0) + 1
    assert {k: v["sentences"] for k, v in summary["by_relation"].items()} == relations
    assert (summary["sentences"], summary["split_sentences"], summary["images"], summary["complete"]) == (6, 6, 2, True)
    assert (summary["dataset"], summary["split"], summary["split_by"]) == ("refcoco", "val", "unc")
    assert summary["model_version"] == bench["pipeline"].model_version
    assert summary["settings"]["masking_block"] == 4 and summary["release_switches"]["is_release"] is False
    md = (out / "summary.md").read_text()
    assert "| all | 6 |" in md and f"{summary['final']['oIoU']:.2f}" in md

    # Nothing left to do: no model is loaded, nothing recomputed.
    before = (out / "results.jsonl").read_bytes()
    assert evaluate.run(p.parse_args(base)) == 0
    assert (out / "results.jsonl").read_bytes() == before
    # Results of another split or configuration never mix into this folder.
    with pytest.raises(ValueError, match="another run"):
        evaluate.run(p.parse_args(base + ["--split", "testA"]))
    with pytest.raises(ValueError, match="alpha=0.6 there, 0.5 now"):
        evaluate.run(p.parse_args(base + ["--alpha", "0.5"]))


def test_release_switches_reuse_cached_indexes(bench, tiny_settings, tmp_path):
    """The paper-comparison run (right_fires=false, sticky_k=true) answers from the index cache the
    first run filled, and is recorded as the release's behaviour."""
    from worker.hybridgl.pipeline import HybridGL

    out = tmp_path / "release"
    argv = ["--dataset", "refcoco", "--data-dir", str(bench["root"]), "--images", str(bench["images"]),
            "--out", str(out), "--no-progress", "--index-cache", str(bench["cache"])] + bench["argv"]
    argv += ["--no-right-fires", "--sticky-k"]
    # Fill the cache first when this test runs alone.
    benchmark.cached_index(bench["pipeline"], bench["rgbs"][1], bench["cache"])
    benchmark.cached_index(bench["pipeline"], bench["rgbs"][2], bench["cache"])
    assert len(list(bench["cache"].glob("*.index.npz"))) == 2
    assert evaluate.run(_parser().parse_args(argv)) == 0
    release = HybridGL(tiny_settings.replace(right_fires=False, sticky_k=True), bench["pipeline"].models)
    records = [json.loads(x) for x in _lines(out / "results.jsonl")]
    for r in records:
        text = next(t for sents in SENTENCES.values() for s, t in sents if str(s) == r["key"])
        a = release.query(bench["indexes"][_image_of(r["key"])], text)
        assert (r["chosen"], r["pure"], r["relation"]) == (a.chosen, a.pure, a.explanation["relation"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["release_switches"] == {"right_fires": False, "sticky_k": True, "is_release": True}
    assert summary["model_version"] == release.model_version != bench["pipeline"].model_version
    assert "(the release's behaviour)" in (out / "summary.md").read_text()


def test_phrasecut_benchmark(bench, tmp_path):
    root = tmp_path / "VGPhraseCut_v0"
    (root / "images").mkdir(parents=True)
    shutil.copy(DATA / "dog.jpg", root / "images" / "1.jpg")
    tasks = [
        {"task_id": "1__10", "image_id": 1, "phrase": "the dog on the left", "ann_ids": [10, 11],
         "instance_boxes": [[100, 200, 301, 301], [350, 250, 251, 51]],
         "Polygons": [[[[100.7, 200.2], [400, 200], [400, 500], [100, 500]]],
                      [[[350, 250], [600, 250], [600, 300], [350, 300]], [[5, 5]]]],
         "phrase_structure": {"name": "dog", "attributes": [], "relation_descriptions": [], "type": "name"}},
        {"task_id": "1__12", "image_id": 1, "phrase": "grass", "ann_ids": [12],
         "instance_boxes": [[0, 400, 800, 134]],
         "Polygons": [[[[0, 400], [799, 400], [799, 533], [0, 533]]]],
         "phrase_structure": {"name": "grass", "attributes": [], "relation_descriptions": [], "type": "name"}},
    ]
    (root / "refer_test.json").write_text(json.dumps(tasks))
    out = tmp_path / "pc"
    argv = ["--dataset", "phrasecut", "--data-dir", str(root), "--out", str(out), "--no-progress",
            "--index-cache", str(bench["cache"])] + bench["argv"]  # bench["argv"] pins --sam-preset refcoco
    assert evaluate.run(_parser().parse_args(argv)) == 0
    records = [json.loads(x) for x in _lines(out / "results.jsonl")]
    assert [r["key"] for r in records] == ["1__10", "1__12"]
    h, w = bench["rgbs"][1].shape[:2]
    # int() truncation and PIL's inclusive fill: the ground truths as pixel sets.
    gts = {"1__10": _box(h, w, (200, 501), (100, 401)) | _box(h, w, (250, 301), (350, 601)),
           "1__12": _box(h, w, (400, 534), (0, 800))}
    index = bench["indexes"][1]
    for r, task in zip(records, tasks):
        a = bench["pipeline"].query(index, task["phrase"])
        gt = gts[r["key"]]
        assert (r["I_pure"], r["U_pure"]) == _iu(index.masks[a.pure].numpy(), gt)
        assert (r["I_final"], r["U_final"]) == _iu(a.mask, gt)
        assert r["gt_area"] == gt.sum() and r["image"] == "1.jpg" and r["task_id"] == task["task_id"]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["dataset"], summary["split"], summary["sentences"]) == ("phrasecut", "test", 2)


def test_benchmark_input_errors(tmp_path):
    p = _parser()
    with pytest.raises(ValueError, match="--dataset"):
        evaluate.run(p.parse_args([]))
    with pytest.raises(FileNotFoundError, match=r"refs\(umd\)\.p"):
        evaluate.run(p.parse_args(["--dataset", "refcocog", "--data-dir", str(tmp_path), "--images", str(tmp_path),
                                   "--out", str(tmp_path / "o")]))
    (tmp_path / "refs(unc).p").write_bytes(_py2_pickle([{"ref_id": 1, "split": "train", "sentences": []}]))
    (tmp_path / "instances.json").write_text('{"images": [], "annotations": []}')
    with pytest.raises(ValueError, match="no refs with split 'val'.*train"):
        evaluate.run(p.parse_args(["--dataset", "refcoco", "--data-dir", str(tmp_path), "--images", str(tmp_path),
                                   "--out", str(tmp_path / "o")]))


# --- Label Studio export --------------------------------------------------------------------------
def _brush(rid: str, label: str, mask: np.ndarray) -> dict:
    from label_studio_sdk.converter.brush import mask2rle

    h, w = mask.shape
    return {"id": rid, "type": "brushlabels", "from_name": "tag", "to_name": "image", "original_width": w,
            "original_height": h, "image_rotation": 0,
            "value": {"format": "rle", "rle": [int(v) for v in mask2rle(mask.astype(np.uint8) * np.uint8(255))],
                      "brushlabels": [label]}}


def _polygon(rid: str, label: str, points: list[list[float]]) -> dict:
    return {"id": rid, "type": "polygonlabels", "from_name": "poly", "to_name": "image", "original_width": 100,
            "original_height": 100, "value": {"points": points, "closed": True, "polygonlabels": [label]}}


def _square(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def _export() -> list[dict]:
    """100 x 100 images, so percent = pixels. model A: one brush accepted unchanged, one polygon
    corrected (moved by half its width: IoU 1/3), one box deleted, one polygon added. Model B: one
    brush re-drawn identically under a new id (unchanged by IoU)."""
    dog = _box(100, 100, (10, 30), (10, 30))
    dog_b = _box(100, 100, (40, 60), (0, 20))
    box = {"id": "p3", "type": "rectanglelabels", "from_name": "box", "to_name": "image", "original_width": 100,
           "original_height": 100, "value": {"x": 80, "y": 80, "width": 10, "height": 10, "rotation": 0,
                                             "rectanglelabels": ["Dog"]}}
    return [
        {"id": 1, "data": {"image": "/data/1.jpg"},
         "predictions": [{"id": 11, "model_version": "hybridgl-A", "score": 0.9,
                          "result": [_brush("p1", "Dog", dog), _polygon("p2", "Cat", _square(50, 50, 69, 69)), box]}],
         "annotations": [
             {"id": 100, "was_cancelled": True, "ground_truth": False, "result": [],
              "created_at": "2024-05-02T10:00:00Z"},
             {"id": 101, "was_cancelled": False, "ground_truth": False, "parent_prediction": 11,
              "created_at": "2024-05-01T10:00:00Z",
              "result": [_brush("p1", "Dog", dog), _polygon("p2", "Cat", _square(60, 50, 79, 69)),
                         _polygon("a4", "Cat", _square(5, 70, 14, 79))]}]},
        {"id": 2, "data": {"image": "/data/2.jpg"},
         "predictions": [{"id": 21, "model_version": "hybridgl-B", "score": 0.8,
                          "result": [_brush("q1", "Dog", dog_b)]}],
         "annotations": [{"id": 201, "was_cancelled": False, "ground_truth": False,
                          "result": [_brush("redrawn", "Dog", dog_b),
                                     {"id": "c", "type": "choices", "from_name": "ok", "to_name": "image",
                                      "value": {"choices": ["yes"]}}]}]},
        {"id": 3, "data": {"image": "/data/3.jpg"},
         "predictions": [{"id": 31, "model_version": "hybridgl-B", "result": [_brush("q3", "Dog", dog_b)]}],
         "annotations": []},
        {"id": 4, "data": {"image": "/data/4.jpg"}, "predictions": [],
         "annotations": [{"id": 401, "was_cancelled": False, "result": [_brush("z", "Dog", dog)]}]},
    ]


def test_labelstudio_region_shapes():
    from label_studio_sdk.converter.brush import mask2rle

    mask = _box(30, 40, (3, 9), (5, 25))
    brush = {"format": "rle", "rle": [int(v) for v in mask2rle(mask.astype(np.uint8) * np.uint8(255))]}
    assert np.array_equal(evaluate.labelstudio_mask("brush", brush, 40, 30), mask)
    rect = evaluate.labelstudio_mask("rectangle", {"x": 10, "y": 20, "width": 30, "height": 40}, 100, 50)
    assert np.array_equal(rect, _box(50, 100, (10, 30), (10, 40)))
    # Rotated 90 degrees clockwise about its top-left corner (50, 10): PIL fill, boundary included.
    turned = evaluate.labelstudio_mask("rectangle", {"x": 50, "y": 10, "width": 20, "height": 10, "rotation": 90},
                                       100, 100)
    assert np.array_equal(turned, _box(100, 100, (10, 31), (40, 51)))
    poly = evaluate.labelstudio_mask("polygon", {"points": _square(50, 50, 69, 69)}, 100, 100)
    assert poly.sum() == 20 * 20 and np.array_equal(poly, _box(100, 100, (50, 70), (50, 70)))


def test_labelstudio_export_report(tmp_path):
    export = tmp_path / "export.json"
    export.write_text(json.dumps(_export()))
    out = tmp_path / "ls"
    # A separate process: this mode must not import torch.
    code = ("import sys, argparse; from worker import evaluate; p = argparse.ArgumentParser(); "
            "evaluate.add_arguments(p); "
            f"rc = evaluate.run(p.parse_args(['--labelstudio-export', {str(export)!r}, '--out', {str(out)!r}])); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Accepted unchanged" in proc.stdout

    report = json.loads((out / "labelstudio_summary.json").read_text())
    assert report["tasks"] == {"tasks": 4, "compared": 2, "without_prediction": 1, "without_annotation": 1}
    a = report["groups"]["model_version"]["hybridgl-A"]
    assert (a["predicted"], a["unchanged"], a["corrected"], a["deleted"], a["added"]) == (3, 1, 1, 1, 1)
    assert a["share_unchanged"] == a["share_corrected"] == a["share_deleted"] == pytest.approx(1 / 3)
    assert a["mean_iou_corrected"] == pytest.approx(1 / 3)  # 200 px shared of 600
    assert a["mean_iou"] == pytest.approx((1 + 1 / 3) / 2)
    assert (a["tasks"], a["tasks_untouched"]) == (1, 0)
    b = report["groups"]["model_version"]["hybridgl-B"]
    assert (b["predicted"], b["unchanged"], b["share_unchanged"], b["added"]) == (1, 1, 1.0, 0)
    assert (b["tasks"], b["tasks_untouched"], b["mean_iou"]) == (1, 1, 1.0)
    dog, cat = report["groups"]["label"]["Dog"], report["groups"]["label"]["Cat"]
    assert (dog["predicted"], dog["unchanged"], dog["deleted"], dog["added"]) == (3, 2, 1, 0)
    assert (cat["predicted"], cat["corrected"], cat["added"]) == (1, 1, 1)
    assert report["groups"]["model_version/label"]["hybridgl-A / Cat"]["share_corrected"] == 1.0
    o = report["overall"]
    assert (o["predicted"], o["unchanged"], o["corrected"], o["deleted"], o["added"]) == (4, 2, 1, 1, 1)

    regions = {(r["prediction_region"], r["annotation_region"]): r
               for r in map(json.loads, (out / "labelstudio_regions.jsonl").read_text().splitlines())}
    assert regions[("p1", "p1")]["matched_by"] == "id" and regions[("p1", "p1")]["status"] == "unchanged"
    assert regions[("p2", "p2")]["iou"] == pytest.approx(1 / 3) and regions[("p2", "p2")]["status"] == "corrected"
    assert regions[("p3", None)]["status"] == "deleted"
    assert regions[(None, "a4")]["status"] == "added"
    assert regions[("q1", "redrawn")]["matched_by"] == "iou" and regions[("q1", "redrawn")]["status"] == "unchanged"
    md = (out / "labelstudio_summary.md").read_text()
    row = "| hybridgl-A (0 of 1 tasks untouched) | 3 | 1 (33.3 %) | 1 (33.3 %) (0.333) | 1 (33.3 %) | 1 | 0.667 |"
    assert row in md
