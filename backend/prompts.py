"""(task, context) -> what to segment: the image reference, the expressions, the clicks.

Light: no torch, nothing from ``worker``.

Where the expressions come from, first source that yields a non-blank one wins:

1. ``"context"``: the interactive context Label Studio sends from the editor
   (``params.context.result``): ``textarea`` results of the config's prompt TextArea (any
   textarea when the config has none) give one expression per text, stripped (Enter leaves a
   newline); smart ``keypointlabels`` results give clicks. Clicks without text give an interactive
   request with no expressions: the caller refines the task's last mask with them.
   ``context=None`` (task open) and ``{"result": []}`` (Submit) carry no prompt.
2. ``"task"``: the task's data: the key of the config's ``<Text value="$...">`` (``prompt_key``),
   else ``prompt``, else ``prompts``: a string, a list of strings, or a list of
   ``{"text", "label"}`` items. Explicit data, so it is used for interactive configs too.
3. ``"labels"``: each output label name becomes an expression labelled with itself. Used for
   non-interactive configs by default; for interactive configs (a prompt TextArea) only when
   ``label_names_as_prompts=True``, since Label Studio calls /predict with no context on every
   task open and guessing every label there would be wasted (and unwanted) work. The workers
   classify every region among all labels at once, so up to ``MAX_LABEL_PROMPTS`` labels work; a
   label with no words (blank) cannot be a prompt and is left out.
4. ``"none"``: nothing to segment.

An expression whose text is one of the config's label names (case-insensitive) asks the workers
for every instance of that label, as do plural expressions ("all the cars"); see
``worker/hybridgl/instances.py``.

The label of an expression: the one given in a ``{"text", "label"}`` item (must be one of the
config's labels); else the config's only label; else the label whose name equals the text
(case-insensitive); else the label of the first click that has one of the config's labels; else None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from backend.errors import UserError
from backend.labeling import LabelingConfig

__all__ = ["MAX_EXPRESSIONS", "MAX_EXPRESSION_CHARS", "MAX_LABEL_PROMPTS", "PromptError", "Expression", "Click",
           "PredictionRequest", "build_request"]

MAX_EXPRESSIONS = 100
MAX_EXPRESSION_CHARS = 1000
MAX_LABEL_PROMPTS = 1000  # label names are classified in one pass, so many more than expressions

_EXPECTED_SHAPE = ('a string, a list of strings, or a list of {"text": ..., "label": ...} items, '
                   'e.g. "the dog on the left" or [{"text": "the dog on the left", "label": "Dog"}]')


class PromptError(UserError, ValueError):
    """The task or context does not say what to segment in a usable way; the message says why."""


@dataclass(frozen=True)
class Expression:
    text: str
    label: str | None  # the label for the region


@dataclass(frozen=True)
class Click:
    x: float  # percent of the image width (0-100), as Label Studio sends
    y: float  # percent of the image height
    positive: bool
    label: str | None


@dataclass(frozen=True)
class PredictionRequest:
    task_id: int | None
    image: str  # the task's image reference (URL or path), untouched
    expressions: tuple[Expression, ...]
    clicks: tuple[Click, ...]
    source: str  # "context" | "task" | "labels" | "none"
    interactive: bool  # the context carried a prompt or clicks


def build_request(task: dict, context: dict | None, config: LabelingConfig, *,
                  label_names_as_prompts: bool | None = None) -> PredictionRequest:
    """What to segment for one task; raises PromptError on unusable input."""
    if not isinstance(task, dict):
        raise PromptError(f"a task must be a JSON object, got {type(task).__name__}")
    task_id = task.get("id")
    if task_id is not None and (isinstance(task_id, bool) or not isinstance(task_id, int)):
        raise PromptError(f"the task id must be an integer, got {task_id!r}")
    who = f"task {task_id}" if task_id is not None else "the task (no id)"

    data = task.get("data")
    if not isinstance(data, dict):
        raise PromptError(f"{who} has no 'data' object: a task looks like "
                          f'{{"data": {{"{config.image_key}": "<image URL>"}}}}')
    image = data.get(config.image_key)
    if image is None:
        raise PromptError(
            f"{who} has no '{config.image_key}' field in its data: the label config's "
            f'<Image name="{config.image_tag}" value="${config.image_key}"> reads the image URL '
            f"from it (the task's data has: {', '.join(map(repr, data)) or 'nothing'})")
    if not isinstance(image, str) or not image.strip():
        raise PromptError(f"{who}'s '{config.image_key}' must be an image URL or path (a "
                          f"non-empty string), got {image!r}")

    def make(expressions: list[Expression], clicks: list[Click], source: str,
             interactive: bool) -> PredictionRequest:
        return PredictionRequest(task_id=task_id, image=image, expressions=tuple(expressions),
                                 clicks=tuple(clicks), source=source, interactive=interactive)

    # (a) the interactive context
    texts, clicks = _from_context(context, config, who)
    if texts or clicks:
        click_label = next((c.label for c in clicks if c.label in config.labels), None)
        expressions = [Expression(text, _label_for(text, None, config, click_label, who))
                       for text in texts]
        return make(expressions, clicks, "context", True)

    # (b) the task's data
    for key in dict.fromkeys(k for k in (config.prompt_key, "prompt", "prompts") if k):
        if data.get(key) is None:
            continue
        items = _from_task_field(data[key], key, who)
        if items:
            expressions = [Expression(text, _label_for(text, label, config, None, who))
                           for text, label in items]
            return make(expressions, [], "task", False)

    # (c) the output tags' label names
    if label_names_as_prompts is None:
        label_names_as_prompts = not config.interactive
    prompts = [label for label in config.labels if label.strip()]
    if label_names_as_prompts and prompts:
        where = f"{who}: the label config's labels"
        if len(prompts) > MAX_LABEL_PROMPTS:
            raise PromptError(f"{where}: {len(prompts)} labels, more than the limit of {MAX_LABEL_PROMPTS} label "
                              "names used as prompts: split the labels across projects")
        for label in prompts:
            _check_text(label, where)
        return make([Expression(label, label) for label in prompts], [], "labels", False)

    return make([], [], "none", False)


def _check_text(text: str, where: str) -> None:
    if len(text) > MAX_EXPRESSION_CHARS:
        raise PromptError(f"{where}: an expression has {len(text)} characters, more than the "
                          f"limit of {MAX_EXPRESSION_CHARS}: shorten it")


def _check_count(count: int, where: str) -> None:
    if count > MAX_EXPRESSIONS:
        raise PromptError(f"{where}: {count} expressions, more than the limit of "
                          f"{MAX_EXPRESSIONS} per task: split them across tasks")


def _from_context(context: Any, config: LabelingConfig, who: str
                  ) -> tuple[list[str], list[Click]]:
    if context is None:
        return [], []
    if not isinstance(context, dict):
        raise PromptError(f"{who}: the interactive context must be an object like "
                          f'{{"result": [...]}}, got {type(context).__name__}')
    results = context.get("result")
    if results is None:
        return [], []
    if not isinstance(results, list):
        raise PromptError(f"{who}: the interactive context's 'result' must be a list of "
                          f"regions, got {type(results).__name__}")
    where = f"{who}, interactive prompt"
    texts: list[str] = []
    clicks: list[Click] = []
    for item in results:
        if not isinstance(item, dict):
            raise PromptError(f"{where}: each context result must be an object, got {item!r}")
        kind = str(item.get("type", "")).lower()
        from_name = item.get("from_name")
        value = item.get("value")
        if kind == "textarea":
            if config.prompt_tag is not None and from_name != config.prompt_tag:
                continue
            raw = value.get("text") if isinstance(value, dict) else None
            if isinstance(raw, str):
                raw = [raw]
            if not isinstance(raw, list) or not all(isinstance(t, str) for t in raw):
                raise PromptError(f'{where}: a textarea result\'s value must be {{"text": '
                                  f'["..."]}} (a list of strings), got {value!r}')
            for text in raw:
                text = text.strip()
                if text:
                    _check_text(text, where)
                    texts.append(text)
        elif kind in ("keypointlabels", "keypoint"):
            if config.keypoint_tag is not None and from_name != config.keypoint_tag:
                continue
            clicks.append(_click(item, where))
    _check_count(len(texts), where)
    return texts, clicks


def _number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _click(item: dict, where: str) -> Click:
    value = item.get("value")
    if not isinstance(value, dict) or not _number(value.get("x")) or not _number(value.get("y")):
        raise PromptError(f'{where}: a keypoint result\'s value must have numeric "x" and "y" '
                          f"(percent of the image), got {value!r}")
    positive = item.get("is_positive", True)
    if positive is None:
        positive = True
    if not isinstance(positive, bool):
        raise PromptError(f"{where}: a keypoint's is_positive must be true or false, "
                          f"got {positive!r}")
    label = None
    for key in ("keypointlabels", "labels"):
        names = value.get(key)
        if isinstance(names, list) and names and isinstance(names[0], str):
            label = names[0]
            break
    return Click(x=float(value["x"]), y=float(value["y"]), positive=positive, label=label)


def _from_task_field(raw: Any, key: str, who: str) -> list[tuple[str, str | None]]:
    """(text, given label) pairs from a task data field; blank texts dropped."""
    where = f"{who}, data field '{key}'"
    if isinstance(raw, str):
        entries: list[Any] = [raw]
    elif isinstance(raw, list):
        entries = raw
    else:
        raise PromptError(f"{where} must be {_EXPECTED_SHAPE}; got {type(raw).__name__} {raw!r}")
    items: list[tuple[str, str | None]] = []
    for index, entry in enumerate(entries):
        if isinstance(entry, str):
            text, label = entry, None
        elif isinstance(entry, dict):
            text, label = entry.get("text"), entry.get("label")
            if not isinstance(text, str):
                raise PromptError(f'{where}, item {index}: an object needs a "text" string '
                                  f"(and optionally a \"label\"), got {entry!r}")
            if label is not None and not isinstance(label, str):
                raise PromptError(f'{where}, item {index}: "label" must be a string, '
                                  f"got {label!r}")
        else:
            raise PromptError(f"{where}, item {index} must be a string or a "
                              f'{{"text", "label"}} object, got {type(entry).__name__} '
                              f"{entry!r}; expected {_EXPECTED_SHAPE}")
        text = text.strip()
        if text:
            _check_text(text, where)
            items.append((text, label))
    _check_count(len(items), where)
    return items


def _label_for(text: str, given: str | None, config: LabelingConfig, click_label: str | None,
               who: str) -> str | None:
    if given is not None:
        if given not in config.labels:
            valid = (", ".join(repr(label) for label in config.labels)
                     if config.labels else "none: the label config's output tags have no <Label>")
            raise PromptError(f"{who}: the label {given!r} of expression {text!r} is not in the "
                              f"label config; valid labels: {valid}")
        return given
    if len(config.labels) == 1:
        return config.labels[0]
    folded = text.casefold()
    match = next((label for label in config.labels if label.casefold() == folded), None)
    if match is not None:
        return match
    return click_label
