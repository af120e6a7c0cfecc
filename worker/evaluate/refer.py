"""The REFER format (RefCOCO, RefCOCO+, RefCOCOg): ``refs(<splitBy>).p`` + COCO ``instances.json``."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

from worker.evaluate import EvaluateError
from worker.evaluate.samples import Sample

DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}


class _RefsUnpickler(pickle.Unpickler):
    """REFER's ``refs(*).p`` are pickles, and unpickling can run code. These files hold only lists,
    dicts, strings and numbers, which need no class lookup: every class lookup is refused, so a
    tampered file fails instead of running anything."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a REFER refs file holds only lists, dicts, strings and "
            "numbers (is this file really a REFER refs(*).p?)")


def _py2_text(obj: Any) -> Any:
    """Python 2 ``str`` arrive as bytes (loaded with ``encoding="bytes"``): decode them as UTF-8
    (latin-1 where that fails), keys included."""
    if isinstance(obj, bytes):
        try:
            return obj.decode("utf-8")
        except UnicodeDecodeError:
            return obj.decode("latin-1")
    if isinstance(obj, dict):
        return {_py2_text(k): _py2_text(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_py2_text(v) for v in obj]
    return obj


def load_refs(path: Path) -> list[dict]:
    """A REFER ``refs(<splitBy>).p``: a list of {ref_id, ann_id, image_id, split, sentences: [{sent,
    raw, tokens, sent_id}], category_id, file_name, ...}. Read without running code (see
    ``_RefsUnpickler``), Python 2 byte strings decoded."""
    with open(path, "rb") as f:
        try:
            refs = _RefsUnpickler(f, encoding="bytes").load()
        except pickle.UnpicklingError as exc:
            raise EvaluateError(f"{path}: {exc}") from None
    refs = _py2_text(refs)
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise EvaluateError(f"{path} is not a REFER refs file (expected a list of dicts)")
    return refs


def _refer_dir(data_dir: Path, dataset: str, split_by: str) -> Path:
    name = f"refs({split_by}).p"
    for d in (data_dir, data_dir / dataset):
        if (d / name).is_file() and (d / "instances.json").is_file():
            return d
    raise FileNotFoundError(
        f"no {name} and instances.json in {data_dir} or {data_dir / dataset}: --data-dir is the REFER "
        f"folder of {dataset} (see the README for where to get it)")


def load_refer(data_dir: Path, dataset: str, split_by: str, split: str, images: Path,
               sentence_field: str = "raw") -> list[Sample]:
    """REFER's files, read as its API does: refs whose ``split`` is ``split``, in file order; each
    ref's object is ``instances.json``'s annotation ``ann_id`` (its ``segmentation``), its image is
    the ``images`` entry ``image_id`` (``file_name``, ``height``, ``width``; the refs' own
    ``file_name`` carries an annotation suffix and is not a file). Every sentence of every ref is a
    sample; the text is the sentence's ``raw`` (or ``sent``). Samples come grouped by image, images
    in order of first appearance."""
    folder = _refer_dir(Path(data_dir), dataset, split_by)
    refs = load_refs(folder / f"refs({split_by}).p")
    with open(folder / "instances.json", encoding="utf-8") as f:
        instances = json.load(f)
    imgs = {img["id"]: img for img in instances.get("images", [])}
    anns = {ann["id"]: ann for ann in instances.get("annotations", [])}
    chosen = [r for r in refs if r.get("split") == split]
    if not chosen:
        splits = sorted({str(r.get("split")) for r in refs})
        raise EvaluateError(f"no refs with split {split!r} in {folder / f'refs({split_by}).p'}; "
                            f"its splits: {', '.join(splits)}")
    other = "sent" if sentence_field == "raw" else "raw"
    by_image: dict[Any, list[Sample]] = {}
    seen: set[str] = set()
    for ref in chosen:
        ann = anns.get(ref["ann_id"])
        img = imgs.get(ref["image_id"])
        if ann is None or img is None:
            raise EvaluateError(f"ref {ref.get('ref_id')}: annotation {ref.get('ann_id')} or image "
                                f"{ref.get('image_id')} is missing from {folder / 'instances.json'}")
        for sent in ref.get("sentences", []):
            key = str(sent["sent_id"])
            if key in seen:
                raise EvaluateError(f"sentence id {key} appears twice in split {split!r}")
            seen.add(key)
            text = sent.get(sentence_field)
            if text is None:
                text = sent.get(other, "")
            by_image.setdefault(img["id"], []).append(Sample(
                key=key, image=img["file_name"], image_path=Path(images) / img["file_name"],
                image_id=img["id"], expression=str(text), gt_key=f"ann:{ann['id']}", gt_kind="coco",
                gt_source=ann["segmentation"], size=(int(img["height"]), int(img["width"])),
                meta={"sent_id": sent["sent_id"], "ref_id": ref.get("ref_id"), "ann_id": ann["id"]}))
    return [s for group in by_image.values() for s in group]
