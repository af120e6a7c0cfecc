"""backend.prompts: what to segment, from the real Label Studio 1.23.2 requests and hand-made ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backend.labeling import parse_label_config
from backend.prompts import (
    MAX_EXPRESSION_CHARS,
    MAX_EXPRESSIONS,
    Click,
    Expression,
    PredictionRequest,
    PromptError,
    build_request,
)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "data" / "labelstudio-1.23.2"  # requests a real Label Studio 1.23.2 sent


def recorded(name: str) -> tuple[list[dict], dict | None, object]:
    """(tasks, params.context, parsed config) of a recorded /predict request."""
    body = json.loads((FIXTURES / name).read_text())
    return body["tasks"], body["params"]["context"], parse_label_config(body["label_config"])


# --- the recorded requests ---------------------------------------------------------------------


def test_interactive_textarea_prompt():
    tasks, context, config = recorded("predict_interactive_textarea.json")
    request = build_request(tasks[0], context, config)
    # labels are Person and Bus: "the bus on the left" is neither exactly, so no label is guessed
    assert request == PredictionRequest(
        task_id=49, image="/data/local-files/?d=images_tp/bus.png",
        expressions=(Expression("the bus on the left", None),), clicks=(), source="context",
        interactive=True)


def test_click_after_textarea_gives_clicks_only():
    tasks, context, config = recorded("predict_interactive_click_after_textarea.json")
    request = build_request(tasks[0], context, config)
    assert request == PredictionRequest(
        task_id=67, image="/data/local-files/?d=images_tp/bus.png", expressions=(),
        clicks=(Click(x=76.58157602663708, y=55.06104328523861, positive=True, label="Person"),),
        source="context", interactive=True)


def test_smart_keypoint_click_wins_over_the_task_data_prompt():
    tasks, context, config = recorded("predict_interactive_keypoint_click.json")
    assert tasks[0]["data"]["prompt"] == "green blob"
    request = build_request(tasks[0], context, config)
    assert request.source == "context" and request.interactive is True
    assert request.expressions == ()
    assert request.clicks == (Click(24.968789013732835, 29.941739492301288, True, "Object"),)
    assert request.image == "/data/local-files/?d=images/img1.png"
    assert request.task_id == 23


def test_task_open_uses_the_task_data_prompt_even_in_an_interactive_config():
    tasks, context, config = recorded("predict_on_task_open.json")
    assert context is None and config.interactive
    request = build_request(tasks[0], context, config)
    assert request == PredictionRequest(
        task_id=27, image="/data/local-files/?d=images/img2.png",
        expressions=(Expression("late", "Object"),), clicks=(), source="task", interactive=False)


def test_retrieve_predictions_batch():
    tasks, context, config = recorded("predict_retrieve_batch.json")
    requests = [build_request(task, context, config) for task in tasks]
    assert [(r.task_id, r.image, r.expressions, r.source, r.interactive) for r in requests] == [
        (22, "/data/local-files/?d=images/img0.png", (Expression("red blob", "Object"),),
         "task", False),
        (23, "/data/local-files/?d=images/img1.png", (Expression("green blob", "Object"),),
         "task", False),
        (24, "http://127.0.0.1:8082/images/img2.png",
         (Expression("blue blob (served by http.server)", "Object"),), "task", False),
        (26, "/data/upload/10/3c31a012-img3.png", (Expression("yellow blob (uploaded)", "Object"),),
         "task", False),
    ]


def test_submit_context_with_empty_result_is_no_interactive_prompt():
    tasks, _, config = recorded("predict_on_task_open.json")
    request = build_request(tasks[0], {"result": []}, config)
    assert request.source == "task" and request.interactive is False
    assert request.expressions == (Expression("late", "Object"),)


# --- hand-made configs -------------------------------------------------------------------------

INTERACTIVE = parse_label_config(
    '<View><Image name="image" value="$image"/>'
    '<TextArea name="prompt" toName="image" editable="true" rows="2" maxSubmissions="1" '
    'showSubmitButton="true"/>'
    '<BrushLabels name="mask" toName="image"><Label value="Person"/><Label value="Bus"/>'
    '</BrushLabels>'
    '<KeyPointLabels name="click" toName="image" smart="true"><Label value="Person" smart="true"/>'
    '<Label value="Bus" smart="true"/></KeyPointLabels></View>')

BATCH = parse_label_config(
    '<View><Image name="image" value="$image"/>'
    '<BrushLabels name="mask" toName="image"><Label value="Car"/><Label value="Person"/>'
    '</BrushLabels></View>')

SINGLE = parse_label_config(
    '<View><Image name="image" value="$image"/>'
    '<BrushLabels name="mask" toName="image"><Label value="Object"/></BrushLabels></View>')

UNLABELLED = parse_label_config(
    '<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image"/></View>')


def task(**data) -> dict:
    return {"id": 7, "data": {"image": "s3://bucket/a.jpg", **data}}


def textarea(*texts, from_name="prompt") -> dict:
    return {"type": "textarea", "from_name": from_name, "to_name": "image",
            "value": {"text": list(texts)}}


def keypoint(x, y, label=None, positive=None, from_name="click") -> dict:
    item = {"type": "keypointlabels", "from_name": from_name, "to_name": "image",
            "value": {"x": x, "y": y, "width": 0.3}}
    if label is not None:
        item["value"]["keypointlabels"] = [label]
    if positive is not None:
        item["is_positive"] = positive
    return item


def test_textarea_text_is_stripped_and_blanks_dropped():
    request = build_request(task(), {"result": [textarea("  the red car\n", "\n", "person ")]},
                            INTERACTIVE)
    assert request.expressions == (Expression("the red car", None), Expression("person", "Person"))
    assert request.source == "context" and request.interactive


def test_textarea_of_another_tag_is_ignored():
    request = build_request(task(prompt="dog"),
                            {"result": [textarea("not me", from_name="comment")]}, INTERACTIVE)
    assert request.source == "task"
    assert request.expressions == (Expression("dog", None),)


def test_any_textarea_counts_when_the_config_has_no_prompt_tag():
    request = build_request(task(), {"result": [textarea("the car", from_name="whatever")]}, BATCH)
    assert request.expressions == (Expression("the car", None),)
    assert request.source == "context" and request.interactive


def test_blank_textarea_falls_through_to_the_task_data():
    request = build_request(task(prompt="the car"), {"result": [textarea("  \n")]}, INTERACTIVE)
    assert request.source == "task" and request.interactive is False
    assert request.expressions == (Expression("the car", None),)


def test_text_with_clicks_takes_the_click_label():
    request = build_request(task(), {"result": [
        textarea("the one on the left"), keypoint(10, 20, "Bus", positive=False),
        keypoint(30.5, 40, "Person")]}, INTERACTIVE)
    assert request.expressions == (Expression("the one on the left", "Bus"),)
    assert request.clicks == (Click(10.0, 20.0, False, "Bus"), Click(30.5, 40.0, True, "Person"))


def test_label_matching_the_text_beats_the_click_label():
    request = build_request(task(), {"result": [textarea("BUS"), keypoint(1, 2, "Person")]},
                            INTERACTIVE)
    assert request.expressions == (Expression("BUS", "Bus"),)


def test_click_without_label_and_labels_key():
    item = keypoint(5, 6)
    item["value"]["labels"] = ["Bus"]
    request = build_request(task(), {"result": [item, keypoint(7, 8)]}, INTERACTIVE)
    assert request.clicks == (Click(5.0, 6.0, True, "Bus"), Click(7.0, 8.0, True, None))
    assert request.expressions == () and request.interactive


def test_clicks_of_another_keypoint_tag_are_ignored():
    request = build_request(task(), {"result": [keypoint(1, 2, "Bus", from_name="other")]},
                            INTERACTIVE)
    assert request.clicks == () and request.source == "none" and not request.interactive


def test_other_result_types_in_the_context_are_ignored():
    brush = {"type": "brushlabels", "from_name": "mask", "to_name": "image",
             "value": {"format": "rle", "rle": [1, 2], "brushlabels": ["Bus"]}}
    request = build_request(task(prompt="car"), {"result": [brush]}, BATCH)
    assert request.source == "task" and request.expressions == (Expression("car", "Car"),)


def test_prompts_list_of_strings():
    request = build_request(task(prompts=["a car", " ", "Person", "the car\n"]), None, BATCH)
    assert request.expressions == (Expression("a car", None), Expression("Person", "Person"),
                                   Expression("the car", None))
    assert request.source == "task" and request.clicks == ()


def test_prompts_list_of_text_label_items():
    request = build_request(task(prompts=[
        {"text": "the man in red", "label": "Person"},
        {"text": "car"},
        {"text": "the dark one", "label": None},
        "Person",
        {"text": "  ", "label": "Car"},
    ]), None, BATCH)
    assert request.expressions == (Expression("the man in red", "Person"), Expression("car", "Car"),
                                   Expression("the dark one", None),
                                   Expression("Person", "Person"))


def test_single_label_config_labels_every_expression():
    request = build_request(task(prompt="the dog on the left"), None, SINGLE)
    assert request.expressions == (Expression("the dog on the left", "Object"),)


def test_prompt_key_of_the_config_comes_first():
    config = parse_label_config(
        '<View><Text name="q" value="$query"/><Image name="image" value="$image"/>'
        '<BrushLabels name="mask" toName="image"><Label value="Object"/></BrushLabels></View>')
    assert config.prompt_key == "query"
    request = build_request(task(query="from query", prompt="from prompt"), None, config)
    assert request.expressions == (Expression("from query", "Object"),)
    # a missing or blank prompt_key field falls through to "prompt", then "prompts"
    request = build_request(task(query="   ", prompt="from prompt"), None, config)
    assert request.expressions == (Expression("from prompt", "Object"),)
    request = build_request(task(prompts=["from prompts"]), None, config)
    assert request.expressions == (Expression("from prompts", "Object"),)


def test_label_names_are_the_prompts_for_non_interactive_configs():
    request = build_request(task(), None, BATCH)
    assert request.expressions == (Expression("Car", "Car"), Expression("Person", "Person"))
    assert request.source == "labels" and request.interactive is False
    # a blank prompt falls through to the labels too
    assert build_request(task(prompt=" "), None, BATCH).source == "labels"
    # and can be turned off
    request = build_request(task(), None, BATCH, label_names_as_prompts=False)
    assert request.expressions == () and request.source == "none"


def test_label_names_are_not_guessed_on_task_open_in_interactive_configs():
    request = build_request(task(), None, INTERACTIVE)
    assert request.expressions == () and request.source == "none"
    assert request.interactive is False
    request = build_request(task(), {"result": []}, INTERACTIVE, label_names_as_prompts=True)
    assert request.expressions == (Expression("Person", "Person"), Expression("Bus", "Bus"))
    assert request.source == "labels"


def test_no_labels_no_prompt_is_none():
    request = build_request(task(), None, UNLABELLED)
    assert request.source == "none" and request.expressions == ()


def test_task_without_id():
    request = build_request({"data": {"image": "/data/upload/1/a.png", "prompt": "x"}}, None,
                            SINGLE)
    assert request.task_id is None and request.image == "/data/upload/1/a.png"


def test_image_reference_is_untouched():
    url = "/data/local-files/?d=images%20dir/a b.png"
    assert build_request({"id": 1, "data": {"image": url}}, None, SINGLE).image == url


# --- errors ------------------------------------------------------------------------------------


def error(task_, context=None, config=BATCH) -> str:
    with pytest.raises(PromptError) as info:
        build_request(task_, context, config)
    return str(info.value)


def test_missing_image_field():
    message = error({"id": 12, "data": {"img": "a.png", "prompt": "x"}})
    assert message.startswith("task 12 has no 'image' field in its data: ")
    assert "'img'" in message and "'prompt'" in message  # what the data has


def test_image_must_be_a_string():
    assert "must be an image URL or path" in error({"id": 1, "data": {"image": 5}})
    assert "must be an image URL or path" in error({"id": 1, "data": {"image": "  "}})


def test_task_without_data():
    assert "task 3 has no 'data' object" in error({"id": 3})
    assert "a task must be a JSON object" in error(["not", "a", "task"])


def test_unknown_label_names_the_valid_ones():
    message = error(task(prompts=[{"text": "the bike", "label": "Bike"}]))
    assert "'Bike'" in message
    assert "valid labels: 'Car', 'Person'" in message
    message = error(task(prompts=[{"text": "the bike", "label": "Bike"}]), config=UNLABELLED)
    assert "have no <Label>" in message


def test_label_is_case_sensitive_when_given():
    assert "valid labels" in error(task(prompts=[{"text": "x", "label": "car"}]))


@pytest.mark.parametrize("value, shape", [
    (42, "int"),
    ({"text": "a dog"}, "dict"),
    (True, "bool"),
])
def test_prompt_of_the_wrong_type(value, shape):
    message = error(task(prompt=value))
    assert "data field 'prompt' must be a string, a list of strings, or a list of" in message
    assert shape in message


def test_list_of_ints():
    message = error(task(prompts=[1, 2]))
    assert "item 0 must be a string or a" in message and "int" in message


def test_item_without_text():
    assert 'an object needs a "text" string' in error(task(prompts=[{"label": "Car"}]))
    assert 'an object needs a "text" string' in error(task(prompts=[{"text": 3}]))
    assert '"label" must be a string' in error(task(prompts=[{"text": "a", "label": 1}]))


def test_too_long_expression():
    assert build_request(task(prompt="a" * MAX_EXPRESSION_CHARS), None, BATCH).expressions
    message = error(task(prompt="a" * (MAX_EXPRESSION_CHARS + 1)))
    assert f"limit of {MAX_EXPRESSION_CHARS}" in message
    message = error(task(), {"result": [textarea("b" * (MAX_EXPRESSION_CHARS + 1))]},
                    INTERACTIVE)
    assert f"limit of {MAX_EXPRESSION_CHARS}" in message


def test_too_many_expressions():
    ok = build_request(task(prompts=[f"thing {i}" for i in range(MAX_EXPRESSIONS)] + [" "]),
                       None, BATCH)
    assert len(ok.expressions) == MAX_EXPRESSIONS
    message = error(task(prompts=[f"thing {i}" for i in range(MAX_EXPRESSIONS + 1)]))
    assert f"{MAX_EXPRESSIONS + 1} expressions, more than the limit of {MAX_EXPRESSIONS}" in message
    message = error(task(), {"result": [textarea(*[f"t{i}" for i in range(MAX_EXPRESSIONS + 1)])]},
                    INTERACTIVE)
    assert f"limit of {MAX_EXPRESSIONS}" in message


def test_malformed_context():
    assert "interactive context must be an object" in error(task(), ["x"])
    assert "'result' must be a list" in error(task(), {"result": "x"})
    assert 'value must be {"text"' in error(task(), {"result": [
        {"type": "textarea", "from_name": "prompt", "value": {"text": [1]}}]}, INTERACTIVE)
    assert 'numeric "x" and "y"' in error(task(), {"result": [keypoint("a", 2)]}, INTERACTIVE)
    assert "is_positive must be true or false" in error(
        task(), {"result": [keypoint(1, 2, positive="yes")]}, INTERACTIVE)


def test_prompt_error_is_a_value_error():
    assert issubclass(PromptError, ValueError)


def test_label_names_many_odd_and_blank():
    from backend.prompts import MAX_LABEL_PROMPTS

    def labels_config(names):
        return parse_label_config('<View><Image name="image" value="$image"/><BrushLabels name="mask" '
                                  'toName="image">' + "".join(f'<Label value="{n}"/>' for n in names)
                                  + "</BrushLabels></View>")

    # 200 labels are one classification in the workers: more than the 100-expression limit is fine
    many = [f"label {i}" for i in range(200)]
    request = build_request(task(), None, labels_config(many))
    assert [e.text for e in request.expressions] == many and request.source == "labels"
    # odd names are prompts like any other; a blank one cannot be and is left out
    odd = build_request(task(), None, labels_config(["???", "🙂", "x" * 500, " "]))
    assert [(e.text, e.label) for e in odd.expressions] == [("???", "???"), ("🙂", "🙂"), ("x" * 500, "x" * 500)]
    too_many = [f"l{i}" for i in range(MAX_LABEL_PROMPTS + 1)]
    assert f"more than the limit of {MAX_LABEL_PROMPTS} label names" in error(task(), None, labels_config(too_many))
