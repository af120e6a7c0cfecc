"""What a Label Studio label config asks for: the image, the output tags, the prompt source.

Parsed with label-studio-sdk's ``LabelInterface`` (the same parser Label Studio's ML backends
use). Light: no torch, nothing from ``worker``.

Rules:
- The image is the first ``<Image>`` (document order) that a BrushLabels, PolygonLabels or
  RectangleLabels tag points at (``toName``); its ``value`` must be a task data variable
  (``$image``), whose name is ``image_key``.
- ``outputs`` are every such output tag pointing at that image, in config order; an output tag
  without ``<Label>`` children is allowed (its ``labels`` are empty).
- ``prompt_tag`` is the first ``<TextArea toName="<image>">`` that is not ``perRegion`` (the
  interactive text prompt of Label Studio's text-prompt examples).
- ``prompt_key`` is the task data key of a ``<Text>``/``<TextArea>`` whose ``value`` is a
  ``$variable``: one whose key contains "prompt" first, then ``<Text>`` before ``<TextArea>``,
  then config order.
- ``keypoint_tag`` is the first ``<KeyPointLabels>`` (or ``<KeyPoint>``) pointing at the image
  with ``smart="true"`` or ``smartOnly="true"`` (clicks that Label Studio sends to /predict).
- ``thresholds``: a ``<Label value="Car" hybridgl_threshold="0.4"/>`` sets that label's least
  probability for a region to be an instance of it (``worker/hybridgl/instances.py``); labels
  without one use the workers' ``HYBRIDGL_INSTANCE_THRESHOLD``. Label Studio 1.23.2 accepts and
  keeps the attribute (tests/test_preview.py). A value that is not a number in
  [0, 1], or two different values for one label, make the config unusable, with the reason.
- Tag names are compared case-insensitively, as Label Studio's editor does. Other tags are ignored.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from backend.errors import UserError

__all__ = ["LabelConfigError", "OutputTag", "LabelingConfig", "parse_label_config",
           "OUTPUT_TAGS"]

# lower-cased tag -> (kind, result type)
OUTPUT_TAGS: dict[str, tuple[str, str]] = {
    "brushlabels": ("brush", "brushlabels"),
    "polygonlabels": ("polygon", "polygonlabels"),
    "rectanglelabels": ("rectangle", "rectanglelabels"),
}
_SUPPORTED = "BrushLabels, PolygonLabels or RectangleLabels"
_IMAGE_EXAMPLE = '<Image name="image" value="$image"/>'
THRESHOLD_ATTRIBUTE = "hybridgl_threshold"


class LabelConfigError(UserError, ValueError):
    """The label config cannot be used; the message says what is missing and what to add."""


@dataclass(frozen=True)
class OutputTag:
    name: str
    to_name: str
    kind: str  # "brush" | "polygon" | "rectangle"
    result_type: str  # "brushlabels" | "polygonlabels" | "rectanglelabels"
    labels: tuple[str, ...]


@dataclass(frozen=True)
class LabelingConfig:
    image_tag: str
    image_key: str
    outputs: tuple[OutputTag, ...]
    prompt_tag: str | None
    prompt_key: str | None
    keypoint_tag: str | None
    labels: tuple[str, ...]
    thresholds: tuple[tuple[str, float], ...] = ()  # (label, least instance probability) set in the config

    def threshold_for(self, label: str | None) -> float | None:
        """The label's threshold from the config, None when it sets none."""
        return dict(self.thresholds).get(label) if label is not None else None

    @property
    def interactive(self) -> bool:
        """The config has a text prompt the annotator types into (a TextArea on the image)."""
        return self.prompt_tag is not None


def parse_label_config(xml: str) -> LabelingConfig:
    """Parse a label config XML string; raises LabelConfigError. Cached by the XML string."""
    if not isinstance(xml, str):
        raise LabelConfigError(
            f"the label config must be an XML string, got {type(xml).__name__}: "
            f"send the project's label config (<View>...</View>)")
    if not xml.strip():
        raise LabelConfigError(
            "the label config is empty: send the project's label config, e.g. "
            f'<View>{_IMAGE_EXAMPLE}<BrushLabels name="mask" toName="image">'
            '<Label value="Object"/></BrushLabels></View>')
    return _parse(xml)


def _truthy(value: object) -> bool:
    return str(value).strip().lower() == "true"


def _lower(tag: object) -> str:
    return str(getattr(tag, "tag", "") or "").lower()


@functools.lru_cache(maxsize=256)
def _parse(xml: str) -> LabelingConfig:
    from label_studio_sdk.label_interface import LabelInterface

    try:
        interface = LabelInterface(xml)
    except Exception as exc:  # lxml syntax errors arrive wrapped in the SDK's own exception
        kind = type(exc).__name__
        if "xmlsyntax" in kind.lower():  # LabelStudioXMLSyntaxErrorSentryIgnored, lxml's own
            raise LabelConfigError(
                f"the label config is not valid XML ({exc}): fix the XML syntax") from exc
        raise LabelConfigError(f"the label config could not be parsed ({kind}: {exc})") from exc

    objects = list(interface.objects or [])
    controls = list(interface.controls or [])

    images = [o for o in objects if _lower(o) == "image"]
    if not images:
        raise LabelConfigError(f"the label config has no <Image> tag: add {_IMAGE_EXAMPLE}")

    all_outputs = [c for c in controls if _lower(c) in OUTPUT_TAGS]

    def points_at(control, image_name: str) -> bool:
        return image_name in [n.strip() for n in (control.to_name or [])]

    image = next((im for im in images if any(points_at(c, im.name) for c in all_outputs)), None)
    if image is None:
        image_names = ", ".join(f'"{im.name}"' for im in images)
        hint = ""
        if all_outputs:
            found = ", ".join(f'<{c.tag} name="{c.name}" toName="{",".join(c.to_name or [])}">'
                              for c in all_outputs)
            hint = f" (found {found}, which points at no <Image>)"
        first = images[0].name
        raise LabelConfigError(
            f"the label config has no {_SUPPORTED} tag whose toName is an <Image> "
            f"(images: {image_names}){hint}: add e.g. "
            f'<BrushLabels name="mask" toName="{first}"><Label value="Object"/></BrushLabels>; '
            f"supported output tags: BrushLabels, PolygonLabels, RectangleLabels")

    value = image.value or ""
    if not image.value_is_variable:
        raise LabelConfigError(
            f'the <Image name="{image.name}"> tag\'s value "{value}" is not a task data '
            f'variable: use value="$image" (the key of the image URL in each task\'s data)')
    image_key = value[1:]

    outputs: list[OutputTag] = []
    thresholds: dict[str, float] = {}
    for control in all_outputs:
        if not points_at(control, image.name):
            continue
        kind, result_type = OUTPUT_TAGS[_lower(control)]
        labels = tuple(dict.fromkeys(str(v) for v in (control.labels or [])))
        for label, tag in (getattr(control, "labels_attrs", None) or {}).items():
            raw = (tag.attr or {}).get(THRESHOLD_ATTRIBUTE)
            if raw is None:
                continue
            value = _threshold(str(label), raw)
            if thresholds.setdefault(str(label), value) != value:
                raise LabelConfigError(
                    f'label "{label}" has two different {THRESHOLD_ATTRIBUTE} values ({thresholds[str(label)]:g} and '
                    f"{value:g}) in different tags: give it one")
        outputs.append(OutputTag(name=control.name, to_name=image.name, kind=kind,
                                 result_type=result_type, labels=labels))

    prompt_tag = next(
        (c.name for c in controls
         if _lower(c) == "textarea" and points_at(c, image.name)
         and not _truthy(c.attr.get("perRegion", c.attr.get("perregion", "false")))),
        None)

    keypoint_tag = next(
        (c.name for c in controls
         if _lower(c) in ("keypointlabels", "keypoint") and points_at(c, image.name)
         and (_truthy(c.attr.get("smart", "false")) or _truthy(c.attr.get("smartOnly", "false")))),
        None)

    # Text/TextArea tags whose value is a $variable: the task data key that carries prompts.
    candidates: list[tuple[int, int, int, str]] = []
    for order, tag in enumerate(objects + controls):
        tag_name = _lower(tag)
        if tag_name not in ("text", "textarea"):
            continue
        raw = tag.attr.get("value") if tag.attr else None
        if not isinstance(raw, str) or not raw.startswith("$") or len(raw) < 2 \
                or any(ch in raw for ch in ", "):
            continue
        key = raw[1:]
        candidates.append((0 if "prompt" in key.lower() else 1,
                           0 if tag_name == "text" else 1, order, key))
    prompt_key = min(candidates)[3] if candidates else None

    labels = tuple(dict.fromkeys(label for out in outputs for label in out.labels))
    return LabelingConfig(image_tag=image.name, image_key=image_key, outputs=tuple(outputs),
                          prompt_tag=prompt_tag, prompt_key=prompt_key,
                          keypoint_tag=keypoint_tag, labels=labels,
                          thresholds=tuple((label, thresholds[label]) for label in labels if label in thresholds))


def _threshold(label: str, raw: object) -> float:
    try:
        value = float(str(raw).strip())
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise LabelConfigError(
            f'<Label value="{label[:100]}" {THRESHOLD_ATTRIBUTE}="{str(raw)[:50]}">: the threshold must be a probability '
            f'between 0 and 1 (the least confidence for a region to get this label), e.g. {THRESHOLD_ATTRIBUTE}="0.4"')
    return value
