"""`hybridgl prelabel --preview N --out DIR` with a real Label Studio 1.23.2 and a real worker, and the
page it writes opened in headless Chromium (the screenshot is test-artifacts/preview_page.png).

Also records what Label Studio 1.23.2 does with the per-label threshold attribute
(``<Label hybridgl_threshold="...">``): it accepts the config and keeps the attribute.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from backend.preview import spread

from .services import DATA, REPO
from .test_e2e_browser import ARTIFACTS, Browser
from .test_e2e_labelstudio import ls, stack  # noqa: F401 - module fixtures: Label Studio, worker + backend

# Label names as prompts. With random CLIP weights which proposals a real label wins is chance, so the
# labels here are the default background prompts themselves: a prompt equal to a label is left out of
# the background, so every proposal is classified among these labels, and threshold 0 makes it an
# instance of its best label (one per object): the preview has several regions whatever the weights.
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image">
    <Label value="background" hybridgl_threshold="0" background="#ff0000"/>
    <Label value="a part of an object" hybridgl_threshold="0"/>
    <Label value="a texture" hybridgl_threshold="0"/>
    <Label value="an empty area" hybridgl_threshold="0.35"/>
  </BrushLabels>
  <PolygonLabels name="outline" toName="image"><Label value="background"/></PolygonLabels>
</View>"""
LABELS = ("background", "a part of an object", "a texture", "an empty area")


def test_spread_takes_first_last_and_evenly_between():
    assert spread([5, 6, 7, 8, 9], 3) == [5, 7, 9]
    assert spread([1, 2, 3, 4], 3) == [1, 3, 4]
    assert spread([1, 2], 5) == [1, 2]
    assert spread([4, 5, 6], 1) == [4]


def test_label_studio_keeps_the_threshold_attribute_on_labels(ls):  # noqa: F811
    """Finding (Label Studio 1.23.2): project creation accepts a custom attribute on <Label> and the
    stored config keeps it verbatim, so per-label thresholds live in the label config."""
    project = ls.create_project("threshold attribute", CONFIG)
    stored = ls.project(project["id"])["label_config"]
    assert 'hybridgl_threshold="0"' in stored and 'hybridgl_threshold="0.35"' in stored
    from backend.labeling import parse_label_config

    assert parse_label_config(stored).thresholds == (("background", 0.0), ("a part of an object", 0.0),
                                                     ("a texture", 0.0), ("an empty area", 0.35))
    # Label Studio itself does not check the value: a bad one is refused by the backend, with the reason.
    bad = ls.create_project("bad threshold", CONFIG.replace('"0.35"', '"2"'))
    assert 'hybridgl_threshold="2"' in ls.project(bad["id"])["label_config"]


def test_preview_writes_a_page_with_every_region_and_nothing_to_label_studio(ls, stack, tmp_path):  # noqa: F811
    shutil.copy(DATA / "dog.jpg", ls.images_dir / "dog.jpg")
    shutil.copy(DATA / "groceries.jpg", ls.images_dir / "groceries.jpg")
    project = ls.create_project("preview", CONFIG)
    ls.add_local_storage(project["id"])
    tasks = [{"image": ls.local_files_url("dog.jpg")}, {"image": ls.local_files_url("groceries.jpg")},
             {"image": ls.local_files_url("groceries.jpg")},
             {"image": ls.local_files_url("dog.jpg"), "prompt": "the dog on the left"}]
    ids = ls.import_tasks(project["id"], tasks)
    out = tmp_path / "preview"
    done = subprocess.run([sys.executable, "-m", "backend.prelabel", "--project", str(project["id"]), "--preview",
                           "3", "--out", str(out)], env=stack["env"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "nothing is written to Label Studio" in done.stdout
    assert all(ls.predictions(t) == [] for t in ids)  # a preview writes nothing

    report = json.loads((out / "preview.json").read_text())
    assert [t["task_id"] for t in report["tasks"]] == [ids[0], ids[2], ids[3]]  # spread, last included
    assert report["thresholds"] == {"background": 0.0, "a part of an object": 0.0, "a texture": 0.0,
                                    "an empty area": 0.35}
    regions = [r for t in report["tasks"] for r in t["regions"]]
    assert report["tasks"][2]["regions"] and len(report["tasks"][2]["regions"]) == 1  # HybridGL's single choice
    for t in report["tasks"][:2]:  # label names: a set of regions, each with one of the labels
        assert len(t["regions"]) >= 2 and {r["label"] for r in t["regions"]} <= set(LABELS)
    assert all(0.0 <= r["score"] <= 1.0 for r in regions)
    for t in report["tasks"]:
        if t["regions"]:
            assert t["score"] == pytest.approx(min(r["score"] for r in t["regions"]))

    browser = Browser()
    try:
        browser.goto((out / "index.html").resolve().as_uri())
        page = browser.evaluate("""(() => {
            const shown = [...document.querySelectorAll('g.region')].filter(g => {
                const b = g.getBoundingClientRect(); return b.width > 0 && b.height > 0; });
            return {shown: shown.length, labels: shown.map(g => g.dataset.label),
                    perTask: [...document.querySelectorAll('section.task')].map(s => [
                        Number(s.dataset.task), s.querySelectorAll('g.region').length]),
                    images: [...document.querySelectorAll('svg > image')].filter(i => i.getBBox().width > 0).length,
                    text: document.body.innerText};
        })()""")
        ARTIFACTS.mkdir(exist_ok=True)
        browser.call("Emulation.setDeviceMetricsOverride", width=1000, height=2400, deviceScaleFactor=1,
                     mobile=False)
        browser.screenshot().save(ARTIFACTS / "preview_page.png")
    finally:
        browser.close()
    assert page["shown"] == len(regions)
    assert page["perTask"] == [[t["task_id"], len(t["regions"])] for t in report["tasks"]]
    assert page["images"] == 3
    assert sorted(page["labels"]) == sorted(r["label"] for r in regions)
    assert "Thresholds in force" in page["text"] and "0.35" in page["text"]
