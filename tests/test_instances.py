"""Sets of objects (issue 13): every instance of a label or plural expression, none when absent.

CLIP's weights are random here, so no test claims accuracy: the decision rules are tested on
constructed features whose right answer is known. Region features are set to (mixtures of) the
text features the real, random-weight text encoder gives each class, through the production
``HybridGL.text_features``; masks are drawn by hand.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backend.labeling import parse_label_config
from worker.hybridgl import instances as sets
from worker.hybridgl.image_index import ImageIndex, boxes_from_masks
from worker.hybridgl.pipeline import HybridGL
from worker.jobs import answer_expressions

H, W = 40, 60


# --- the rules on orthonormal features (pure) ---------------------------------------------------

def _basis(d: int = 8) -> np.ndarray:
    return np.eye(d)


def _rect(y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_every_instance_is_kept_and_an_absent_class_gives_nothing():
    e = _basis()
    classes = np.stack([e[0], e[1], e[2]])  # car, cat (absent), background
    regions = np.stack([e[0], e[0], e[2], e[0]])  # three cars in different places, one background
    masks = np.stack([_rect(0, 10, 0, 10), _rect(0, 10, 20, 30), _rect(20, 40, 0, 60), _rect(0, 10, 40, 50)])
    probs = sets.classify(regions, classes, 100.0)
    out = sets.decide(probs, 2, [0.5, 0.5], masks, 0.5)
    assert [(i.index, i.target) for i in out.instances] == [(0, 0), (1, 0), (3, 0)]
    assert not [i for i in out.instances if i.target == 1]  # cat is absent: no region
    assert out.decision == ["instance", "instance", "other class", "instance"]
    assert all(0.99 < i.score <= 1.0 for i in out.instances)
    assert out.doubt(2) is None  # no proposal came near a target


def test_a_whole_and_its_part_are_one_object_the_most_confident_wins():
    e = _basis()
    classes = np.stack([e[0], e[1]])  # car, background
    whole, part, other = _rect(0, 20, 0, 20), _rect(0, 5, 0, 5), _rect(25, 35, 30, 50)
    # the part is less typical of "car" than the whole; a second, separate car
    regions = np.stack([_unit(0.9 * e[0] + 0.1 * e[1]), e[0], e[0]])
    probs = sets.classify(regions, classes, 10.0)
    out = sets.decide(probs, 1, [0.5], np.stack([part, whole, other]), 0.5)
    assert [i.index for i in out.instances] == [1, 2]  # most confident first; the part is dropped
    assert out.decision[0] == "overlaps instance" and out.overlapped[0] == 1
    # IoU of part and whole is 25/400, yet they are one object: the rule is intersection over the smaller
    assert sets.overlap(part, whole) == 1.0
    # with the part the more confident one, the part is the object kept and the whole dropped
    flipped = sets.decide(probs, 1, [0.5], np.stack([whole, part, other]), 0.5)
    assert [i.index for i in flipped.instances] == [1, 2] and flipped.overlapped[0] == 1


def test_threshold_per_target_and_doubt():
    e = _basis()
    classes = np.stack([e[0], e[1], e[2]])  # car, dog, background
    regions = np.stack([_unit(e[0] + 0.8 * e[2]), _unit(e[1] + 0.2 * e[2])])
    masks = np.stack([_rect(0, 10, 0, 10), _rect(20, 30, 20, 30)])
    probs = sets.classify(regions, classes, 10.0)
    p_car, p_dog = probs[0, 0], probs[1, 1]
    assert 0.5 < p_car < p_dog < 1  # the car region is the doubtful one
    out = sets.decide(probs, 2, [p_car + 0.01, p_dog - 0.01], masks, 0.5)
    assert [(i.index, i.target) for i in out.instances] == [(1, 1)]
    assert out.decision[0] == "below threshold"
    assert out.doubt(2) == pytest.approx(1 - p_car)  # how sure "no car" is
    both = sets.decide(probs, 2, [p_car, p_dog], masks, 0.5)  # the threshold itself passes
    assert [i.score for i in both.instances] == pytest.approx([p_car, p_dog])


def test_a_region_belongs_to_its_most_probable_class_only():
    e = _basis()
    classes = np.stack([e[0], e[1], e[2]])  # car, truck, background
    regions = np.stack([_unit(e[0] + 1.1 * e[1])])  # a bit more truck than car
    probs = sets.classify(regions, classes, 10.0)
    assert probs[0, 0] > 0.3 and probs[0, 1] > probs[0, 0]
    out = sets.decide(probs, 2, [0.3, 0.3], np.stack([_rect(0, 5, 0, 5)]), 0.5)
    assert [(i.index, i.target) for i in out.instances] == [(0, 1)]


def test_decide_needs_one_threshold_per_target():
    with pytest.raises(ValueError, match="one threshold per target"):
        sets.decide(np.ones((1, 3)) / 3, 2, [0.5], np.zeros((1, H, W), bool), 0.5)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


# --- through the pipeline and the job's region building (real text encoder) ---------------------

@pytest.fixture(scope="module")
def pipeline(tiny_settings) -> HybridGL:
    return HybridGL(tiny_settings)


def _index(pipeline: HybridGL, masks: np.ndarray, features: torch.Tensor) -> ImageIndex:
    g = pipeline.settings.gem_size // 16
    gem = F.normalize(torch.randn(g * g, features.shape[1], generator=torch.Generator().manual_seed(0)), dim=-1)
    m = torch.from_numpy(masks)
    return ImageIndex(key="constructed", image_size=(H, W), masks=m, boxes=boxes_from_masks(m),
                      features=F.normalize(features.float(), dim=-1), gem_features=gem)


def _feature(pipeline: HybridGL, text: str) -> torch.Tensor:
    return pipeline.text_features([pipeline.parse(text)])[0]


@pytest.fixture(scope="module")
def street(pipeline):
    """Two cars (each also proposed as a part), a dog, and the road."""
    car, dog, road = (_feature(pipeline, t) for t in ("car", "dog", "background"))
    masks = np.stack([_rect(0, 10, 0, 20), _rect(2, 6, 2, 8), _rect(0, 10, 30, 50), _rect(15, 25, 5, 15),
                      _rect(30, 40, 0, 60)])
    features = torch.stack([car, 0.8 * car + 0.2 * road, car, dog, road])
    return _index(pipeline, masks, features)


CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image">'
          '<Label value="car"/><Label value="dog" hybridgl_threshold="0.9"/><Label value="cat"/>'
          '</BrushLabels><RectangleLabels name="box" toName="image"><Label value="car"/><Label value="dog"/>'
          '</RectangleLabels></View>')


def test_label_names_give_every_instance_and_nothing_for_an_absent_label(pipeline, street):
    config = parse_label_config(CONFIG)
    items = [{"text": label, "label": label} for label in config.labels]
    regions = answer_expressions(pipeline, street, config, items)
    brushes = [r for r in regions.results if r["type"] == "brushlabels"]
    found = sorted((r["value"]["brushlabels"][0], _bbox(r)) for r in brushes)
    # both cars once each (the part of the first is the same object), the dog; no cat
    assert found == [("car", (0, 0, 20, 10)), ("car", (30, 0, 20, 10)), ("dog", (5, 15, 10, 10))]
    boxes = [r for r in regions.results if r["type"] == "rectanglelabels"]
    assert sorted(r["value"]["rectanglelabels"][0] for r in boxes) == ["car", "car", "dog"]
    for r in regions.results:
        assert 0.0 <= r["score"] <= 1.0
    assert regions.score == min(r["score"] for r in regions.results)  # the least confident region
    assert regions.thresholds == {"car": pipeline.settings.instance_threshold, "dog": 0.9,
                                  "cat": pipeline.settings.instance_threshold}


def test_threshold_from_the_config_removes_a_doubtful_instance(pipeline, street):
    config = parse_label_config(CONFIG.replace('<Label value="car"/><Label value="dog"',
                                               '<Label value="car" hybridgl_threshold="1"/><Label value="dog"'))
    regions = answer_expressions(pipeline, street, config, [{"text": "car", "label": "car"}])
    assert regions.results == []  # no probability reaches 1 exactly...
    assert regions.doubt is not None and 0.0 <= regions.doubt < 0.5  # ...and "no car" is a doubtful answer
    assert regions.score == regions.doubt


def test_plural_expression_is_a_set_and_a_singular_one_keeps_hybridgls_choice(pipeline, street):
    config = parse_label_config(CONFIG)
    cars, dog = _feature(pipeline, "all the cars"), _feature(pipeline, "dog")
    masks = street.masks.numpy()[[0, 2, 3]]
    plural_index = _index(pipeline, masks, torch.stack([cars, cars, dog]))
    plural = answer_expressions(pipeline, plural_index, config, [{"text": "all the cars", "label": "car"}])
    brushes = [r for r in plural.results if r["type"] == "brushlabels"]
    assert sorted(_bbox(r) for r in brushes) == [(0, 0, 20, 10), (30, 0, 20, 10)]
    assert {r["value"]["brushlabels"][0] for r in brushes} == {"car"}
    singular = answer_expressions(pipeline, street, config, [{"text": "the car on the left", "label": "car"}])
    choice = pipeline.query(street, "the car on the left")
    [brush] = [r for r in singular.results if r["type"] == "brushlabels"]
    assert _bbox(brush) == tuple(int(v) + (1 if k >= 2 else 0) for k, v in enumerate(street.boxes[choice.chosen]))
    assert brush["score"] == pytest.approx(choice.score)


def test_instances_explanation_schema(pipeline, street):
    answer = pipeline.instances(street, ["car", "cat"], ["dog"])
    e = json.loads(json.dumps(answer.explanation))
    assert set(e) == {"targets", "other_labels", "background_prompts", "thresholds", "overlap", "instances", "masks"}
    assert e["targets"] == ["car", "cat"] and e["other_labels"] == ["dog"]
    assert e["background_prompts"] == ["background", "a part of an object", "a texture", "an empty area"]
    assert len(e["masks"]) == len(street)
    for record in e["masks"]:
        assert set(record) == {"index", "box", "area", "probabilities", "background", "best", "decision", "overlaps"}
        assert sum(record["probabilities"].values()) + record["background"] == pytest.approx(1.0)
    assert [m["decision"] for m in e["masks"]] == ["instance", "overlaps instance", "instance", "other class",
                                                   "other class"]
    assert e["masks"][1]["overlaps"] == 0 and e["masks"][3]["best"] == "dog"
    assert [(i["index"], i["target"]) for i in e["instances"]] == [(0, "car"), (2, "car")]


def test_a_label_with_no_words_is_refused_with_the_reason(pipeline, street):
    with pytest.raises(ValueError, match="empty"):
        pipeline.instances(street, [" "])


def test_odd_and_many_labels_do_not_break_the_classification(pipeline, street):
    labels = ["???", "🙂", "x" * 500, "car"] + [f"label {i}" for i in range(196)]
    answer = pipeline.instances(street, labels)
    assert len(answer.explanation["masks"][0]["probabilities"]) == 200
    assert {i.target for i in answer.instances} <= set(range(200))
    assert all(0.0 <= i.score <= 1.0 for i in answer.instances)


def test_no_proposals_give_no_instance(pipeline):
    empty = _index(pipeline, np.zeros((0, H, W), bool), torch.zeros(0, pipeline.models.clip.visual.output_dim))
    answer = pipeline.instances(empty, ["car"])
    assert answer.instances == [] and answer.doubt is None and answer.explanation["masks"] == []


def _bbox(result: dict) -> tuple[int, int, int, int]:
    from label_studio_sdk.converter.brush import decode_rle

    h, w = result["original_height"], result["original_width"]
    mask = decode_rle(result["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 0
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


def test_segment_command_writes_every_instance_and_the_explanation(tiny_settings, tmp_path):
    """``hybridgl segment IMAGE "all the dogs" --labels grass,dog``: with no background prompt and
    threshold 0, each of two disjoint proposals is an instance of its best label."""
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    data = Path(__file__).parent / "data"
    h, w = 534, 800
    proposals = np.zeros((2, h, w), dtype=bool)
    proposals[0, :200, :400] = True
    proposals[1, 300:, 450:] = True
    np.savez(tmp_path / "props.npz", masks=proposals)
    out = tmp_path / "out"
    s = tiny_settings
    cmd = [sys.executable, "-m", "worker.cli", "segment", str(data / "dog.jpg"), "all the dogs", "--labels",
           "grass,dog", "--out", str(out), "--proposals", str(tmp_path / "props.npz"), "--sam-model", "vit_t",
           "--sam-checkpoint", s.sam_checkpoint, "--clip-model", s.clip_model, "--clip-checkpoint",
           s.clip_checkpoint, "--weights-dir", s.weights_dir, "--device", "cpu", "--masking-block", "4",
           "--gem-blocks", "3", "--instance-threshold", "0", "--background-prompts", ""]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    labels = json.loads((out / "dog_labels.json").read_text())
    assert labels["targets"] == ["grass", "dog"] and labels["background_prompts"] == []
    assert sorted(i["index"] for i in labels["instances"]) == [0, 1]
    plural = json.loads((out / "dog_00_all-the-dogs.json").read_text())
    assert plural["asks_for_set"] is True and plural["targets"] == ["all the dogs"]
    assert [m["decision"] for m in plural["masks"]] == ["instance", "instance"]
    masks = sorted(out.glob("dog_00_all-the-dogs_*.mask.png"))
    assert len(masks) == 2
    found = {tuple(np.argwhere(np.asarray(Image.open(p)) == 255)[0]) for p in masks}
    assert found == {(0, 0), (300, 450)}  # the two proposals, pixel for pixel where they start
    assert len(list(out.glob("dog_labels_*.mask.png"))) == 2
