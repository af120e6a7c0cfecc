"""backend.results: masks -> Label Studio results, checked by decoding and rasterizing back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle

from backend.labeling import parse_label_config
from backend.results import mask_to_box, mask_to_polygon, prediction, region_results

REPO = Path(__file__).resolve().parents[1]

ALL_KINDS = parse_label_config(
    '<View><Image name="image" value="$image"/>'
    '<BrushLabels name="mask" toName="image"><Label value="Car"/><Label value="Person"/>'
    '</BrushLabels>'
    '<PolygonLabels name="poly" toName="image"><Label value="Car"/></PolygonLabels>'
    '<RectangleLabels name="box" toName="image"><Label value="Car"/><Label value="Person"/>'
    '<Label value="Tree"/></RectangleLabels></View>')


def decode(result: dict) -> np.ndarray:
    """A brush result's RLE back to a (height, width) array, as Label Studio's converter does."""
    height, width = result["original_height"], result["original_width"]
    return decode_rle(result["value"]["rle"]).reshape(height, width, 4)[:, :, 3]


def rasterize(points: list[list[float]], height: int, width: int) -> np.ndarray:
    """Pixels whose centre is inside the polygon (even-odd rule); vertices are on pixel edges."""
    xy = np.array(points) * [width / 100.0, height / 100.0]
    px, py = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    inside = np.zeros((height, width), bool)
    for (x1, y1), (x2, y2) in zip(xy, np.roll(xy, -1, axis=0)):
        crosses = (y1 > py) != (y2 > py)
        if y1 != y2:
            inside ^= crosses & (px < x1 + (x2 - x1) * (py - y1) / (y2 - y1))
    return inside


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


def blob_mask() -> np.ndarray:
    mask = np.zeros((48, 64), np.uint8)
    cv2.circle(mask, (20, 22), 12, 1, -1)
    mask[30:40, 40:60] = 1
    mask[5, 50] = 1
    return mask


# --- brush -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, on", [(np.uint8, 1), (np.uint8, 255), (bool, True),
                                       (np.float32, 0.7), (np.int64, 3)])
def test_brush_rle_decodes_back_to_the_mask_as_0_255(dtype, on):
    binary = blob_mask().astype(bool)
    mask = np.where(binary, on, 0).astype(dtype)
    (result,) = region_results(mask, "Car", SINGLE_BRUSH)
    decoded = decode(result)
    assert decoded.dtype == np.uint8
    assert set(np.unique(decoded)) == {0, 255}  # 0/1 would render invisible in Label Studio
    np.testing.assert_array_equal(decoded, binary.astype(np.uint8) * 255)


SINGLE_BRUSH = parse_label_config(
    '<View><Image name="image" value="$image"/>'
    '<BrushLabels name="mask" toName="image"><Label value="Car"/></BrushLabels></View>')


def test_brush_rle_of_a_large_mask_round_trips():
    rng = np.random.default_rng(0)
    mask = np.zeros((300, 401), bool)
    for _ in range(20):
        y, x = rng.integers(0, 300), rng.integers(0, 401)
        mask[y:y + rng.integers(1, 80), x:x + rng.integers(1, 80)] = True
    mask[0, 0] = mask[-1, -1] = True  # the first and the last pixel
    (result,) = region_results(mask, None, SINGLE_BRUSH)
    np.testing.assert_array_equal(decode(result) == 255, mask)


# --- full result shapes ------------------------------------------------------------------------


def test_result_shapes_for_every_tag_type():
    mask = np.zeros((40, 50), np.uint8)
    mask[10:30, 5:25] = 1  # a 20 x 20 square at x 5..24, y 10..29
    results = region_results(mask, "Car", ALL_KINDS, score=0.875, region_id="r1")
    assert [r["type"] for r in results] == ["brushlabels", "polygonlabels", "rectanglelabels"]

    brush, poly, box = results
    rle = brush["value"]["rle"]
    assert isinstance(rle, list) and all(type(v) is int and 0 <= v <= 255 for v in rle)
    assert brush == {
        "id": "r1-mask", "type": "brushlabels", "from_name": "mask", "to_name": "image",
        "original_width": 50, "original_height": 40, "image_rotation": 0,
        "value": {"format": "rle", "rle": rle, "brushlabels": ["Car"]}, "score": 0.875}
    np.testing.assert_array_equal(decode(brush), mask * 255)

    assert poly == {
        "id": "r1-poly", "type": "polygonlabels", "from_name": "poly", "to_name": "image",
        "original_width": 50, "original_height": 40, "image_rotation": 0,
        "value": {"points": poly["value"]["points"], "closed": True, "polygonlabels": ["Car"]},
        "score": 0.875}
    # a square simplifies to its four corners, on pixel edges: exactly the box
    corners = sorted(map(tuple, poly["value"]["points"]))
    assert corners == sorted([(10.0, 25.0), (10.0, 75.0), (50.0, 25.0), (50.0, 75.0)])

    assert box == {
        "id": "r1-box", "type": "rectanglelabels", "from_name": "box", "to_name": "image",
        "original_width": 50, "original_height": 40, "image_rotation": 0,
        "value": {"x": 10.0, "y": 25.0, "width": 40.0, "height": 50.0, "rotation": 0,
                  "rectanglelabels": ["Car"]},
        "score": 0.875}
    json.dumps(results)  # plain JSON types only


def test_label_none_uses_a_tags_only_label_else_an_empty_list():
    mask = np.ones((4, 4), bool)
    results = region_results(mask, None, ALL_KINDS, region_id="x")
    assert [r["value"][r["type"]] for r in results] == [[], ["Car"], []]


def test_label_of_another_tag_is_treated_as_none_for_this_tag():
    results = region_results(np.ones((4, 4), bool), "Tree", ALL_KINDS, region_id="x")
    # mask: Car/Person (no Tree, two labels) -> []; poly: only Car -> Car; box has Tree
    assert [r["value"][r["type"]] for r in results] == [[], ["Car"], ["Tree"]]
    results = region_results(np.ones((4, 4), bool), "Person", ALL_KINDS, region_id="x")
    assert [r["value"][r["type"]] for r in results] == [["Person"], ["Car"], ["Person"]]


def test_score_is_omitted_when_none_and_a_float_otherwise():
    (result,) = region_results(np.ones((3, 3)), "Car", SINGLE_BRUSH, region_id="a")
    assert "score" not in result
    (result,) = region_results(np.ones((3, 3)), "Car", SINGLE_BRUSH, score=np.float32(0.5))
    assert type(result["score"]) is float and result["score"] == 0.5


def test_region_ids_are_distinct_per_tag_and_random_when_not_given():
    first = region_results(np.ones((3, 3)), "Car", ALL_KINDS)
    second = region_results(np.ones((3, 3)), "Car", ALL_KINDS)
    ids = [r["id"] for r in first]
    assert len(set(ids)) == 3
    base = ids[0].rsplit("-", 1)[0]
    assert ids == [f"{base}-mask", f"{base}-poly", f"{base}-box"]
    assert 6 <= len(base) <= 16 and base.isalnum()
    assert ids[0] != second[0]["id"]


def test_empty_mask_gives_no_results():
    assert region_results(np.zeros((10, 10), np.uint8), "Car", ALL_KINDS) == []
    assert region_results(np.zeros((10, 10), bool), None, SINGLE_BRUSH, score=0.9) == []


def test_mask_must_be_2d():
    with pytest.raises(ValueError, match="2-D"):
        region_results(np.ones((4, 4, 3)), "Car", ALL_KINDS)
    with pytest.raises(ValueError, match="2-D"):
        mask_to_box(np.ones((0, 4)))


def test_prediction_entry():
    results = region_results(np.ones((3, 3)), "Car", SINGLE_BRUSH, region_id="a")
    entry = prediction(results, np.float64(0.25), "hybridgl-1")
    assert entry == {"result": results, "score": 0.25, "model_version": "hybridgl-1"}
    assert type(entry["score"]) is float
    assert prediction([], 0.0, "v") == {"result": [], "score": 0.0, "model_version": "v"}


# --- polygon -----------------------------------------------------------------------------------


def test_polygon_of_a_filled_rectangle_covers_it():
    mask = np.zeros((60, 80), np.uint8)
    mask[12:47, 20:71] = 1
    points = mask_to_polygon(mask)
    assert len(points) == 4
    assert iou(rasterize(points, 60, 80), mask.astype(bool)) > 0.95


def test_polygon_of_a_filled_circle_covers_it():
    mask = np.zeros((120, 100), np.uint8)
    cv2.circle(mask, (45, 60), 35, 1, -1)
    points = mask_to_polygon(mask)
    assert 8 <= len(points) < 200  # simplified, still round
    assert iou(rasterize(points, 120, 100), mask.astype(bool)) > 0.95
    assert all(0 <= x <= 100 and 0 <= y <= 100 for x, y in points)


def test_polygon_tolerance_zero_keeps_every_boundary_pixel_and_larger_simplifies_more():
    mask = np.zeros((120, 100), np.uint8)
    cv2.circle(mask, (45, 60), 35, 1, -1)
    exact, default, coarse = (mask_to_polygon(mask, t) for t in (0.0, 1.0, 5.0))
    assert len(exact) > len(default) > len(coarse) >= 3
    assert iou(rasterize(exact, 120, 100), mask.astype(bool)) > 0.99


def test_polygon_picks_the_largest_of_two_blobs():
    mask = np.zeros((50, 50), np.uint8)
    mask[2:8, 2:8] = 1  # small, found first in raster order
    mask[20:45, 15:45] = 1  # large
    points = mask_to_polygon(mask)
    xs = [x * 50 / 100 for x, _ in points]
    ys = [y * 50 / 100 for _, y in points]
    assert (min(xs), max(xs), min(ys), max(ys)) == (15, 45, 20, 45)  # pixel edges, like the box
    large = np.zeros_like(mask, bool)
    large[20:45, 15:45] = True
    assert iou(rasterize(points, 50, 50), large) > 0.95


def test_polygon_result_uses_the_largest_blob():
    (poly,) = [r for r in region_results(blob_mask(), "Car", ALL_KINDS) if r["type"] ==
               "polygonlabels"]
    circle = np.zeros((48, 64), np.uint8)
    cv2.circle(circle, (20, 22), 12, 1, -1)
    assert iou(rasterize(poly["value"]["points"], 48, 64), circle.astype(bool)) > 0.9


def _one_blob_masks(count: int, seed: int = 0):
    """Random single-blob masks without holes (unions of ellipses, holes filled), various sizes."""
    rng = np.random.default_rng(seed)
    made = 0
    while made < count:
        h, w = (int(v) for v in rng.integers(3, 70, 2))
        mask = np.zeros((h, w), np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            cv2.ellipse(mask, (int(rng.integers(0, w)), int(rng.integers(0, h))),
                        (int(rng.integers(0, w // 2 + 1)), int(rng.integers(0, h // 2 + 1))),
                        float(rng.integers(0, 180)), 0, 360, 1, -1)
        if cv2.connectedComponents(mask, connectivity=8)[0] != 2:
            continue
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(mask, contours, -1, 1, -1)  # fill holes
        made += 1
        yield mask.astype(bool)


def _shoelace(points: list[list[float]], h: int, w: int) -> float:
    xy = np.array(points) * np.array([w, h]) / 100.0
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def test_polygon_box_and_brush_cover_the_same_pixels_on_many_masks():
    """Issue 13 item 7: a polygon once ran through boundary pixel centres, about one pixel narrower and
    shorter than the box of the same mask. Now all three agree on 300 random masks."""
    for mask in _one_blob_masks(300):
        h, w = mask.shape
        results = {r["type"]: r for r in region_results(mask, "Car", ALL_KINDS)}
        brush = decode(results["brushlabels"]) > 0
        assert brush.sum() == mask.sum()
        exact = mask_to_polygon(mask, 0.0)
        assert _shoelace(exact, h, w) == pytest.approx(mask.sum())  # every pixel, nothing more
        xs, ys = [x for x, _ in exact], [y for _, y in exact]
        box = results["rectanglelabels"]["value"]
        assert (min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)) == pytest.approx(
            (box["x"], box["y"], box["width"], box["height"]))
        # the simplified polygon Label Studio gets stays within a pixel of the boundary
        simplified = results["polygonlabels"]["value"]["points"]
        perimeter = cv2.arcLength((np.array(exact) * np.array([w, h]) / 100).astype(np.float32), True)
        assert abs(_shoelace(simplified, h, w) - mask.sum()) <= perimeter * 1.0 + 1e-6


def test_polygon_of_degenerate_blobs_is_the_rectangle_around_their_pixels():
    mask = np.zeros((10, 20), np.uint8)
    mask[4, 5] = 1
    assert sorted(map(tuple, mask_to_polygon(mask))) == [(25.0, 40.0), (25.0, 50.0), (30.0, 40.0), (30.0, 50.0)]
    mask[4, 5:9] = 1  # a horizontal line of 4 pixels
    assert sorted(map(tuple, mask_to_polygon(mask))) == [(25.0, 40.0), (25.0, 50.0), (45.0, 40.0), (45.0, 50.0)]


def test_polygon_of_an_empty_mask():
    assert mask_to_polygon(np.zeros((5, 5))) == []


# --- box ---------------------------------------------------------------------------------------


def test_box_covers_the_mask_pixels():
    mask = np.zeros((50, 200), bool)
    mask[10:20, 30:40] = True
    mask[35, 150] = True
    x, y, w, h = mask_to_box(mask)
    # x 30..150 inclusive -> 121 px of 200; y 10..35 inclusive -> 26 px of 50
    assert (x, y, w, h) == pytest.approx((15.0, 20.0, 60.5, 52.0))


def test_box_of_a_full_mask_and_of_one_pixel():
    assert mask_to_box(np.ones((7, 9))) == pytest.approx((0.0, 0.0, 100.0, 100.0))
    mask = np.zeros((4, 8))
    mask[3, 7] = 1
    assert mask_to_box(mask) == pytest.approx((87.5, 75.0, 12.5, 25.0))


def test_box_of_an_empty_mask_raises():
    with pytest.raises(ValueError, match="empty"):
        mask_to_box(np.zeros((3, 3)))


# --- the web process stays light ---------------------------------------------------------------


def test_backend_modules_import_neither_torch_nor_worker_nor_eager_cv2():
    code = (
        "import sys, numpy as np\n"
        "from backend.labeling import parse_label_config\n"
        "from backend.prompts import build_request\n"
        "from backend import results\n"
        "assert 'cv2' not in sys.modules, 'cv2 imported eagerly'\n"
        "c = parse_label_config('<View><Image name=\"i\" value=\"$i\"/>"
        "<BrushLabels name=\"b\" toName=\"i\"/></View>')\n"
        "build_request({'id': 1, 'data': {'i': 'a.png', 'prompt': 'x'}}, None, c)\n"
        "results.region_results(np.ones((3, 3)), None, c)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'worker'))\n"
        "assert not bad, bad\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
