"""backend.labeling: label configs from real Label Studio 1.23.2 requests and hand-made ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backend.labeling import LabelConfigError, LabelingConfig, OutputTag, parse_label_config

REPO = Path(__file__).resolve().parents[1]
# Requests recorded from a real Label Studio 1.23.2 (see DESIGN.md).
FIXTURES = REPO / "tests" / "data" / "labelstudio-1.23.2"  # requests a real Label Studio 1.23.2 sent


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def config_of(name: str) -> str:
    body = fixture(name)
    return body["schema"] if name == "setup.json" else body["label_config"]


MASK_PERSON_BUS = OutputTag(name="mask", to_name="image", kind="brush",
                            result_type="brushlabels", labels=("Person", "Bus"))
MASK_OBJECT = OutputTag(name="mask", to_name="image", kind="brush", result_type="brushlabels",
                        labels=("Object",))
BOX_OBJECT = OutputTag(name="box", to_name="image", kind="rectangle",
                       result_type="rectanglelabels", labels=("Object",))

# The project whose config has a <Text value="$prompt">, a prompt TextArea, brush + box outputs and
# a smart KeyPointLabels (setup, task open, Retrieve Predictions and the click were sent for it).
PROJECT_9 = LabelingConfig(image_tag="image", image_key="image", outputs=(MASK_OBJECT, BOX_OBJECT),
                           prompt_tag="prompt", prompt_key="prompt", keypoint_tag="click",
                           labels=("Object",))

EXPECTED = {
    "setup.json": PROJECT_9,
    "predict_on_task_open.json": PROJECT_9,
    "predict_retrieve_batch.json": PROJECT_9,
    "predict_interactive_keypoint_click.json": PROJECT_9,
    "predict_interactive_textarea.json": LabelingConfig(
        image_tag="image", image_key="image", outputs=(MASK_PERSON_BUS,), prompt_tag="prompt",
        prompt_key=None, keypoint_tag=None, labels=("Person", "Bus")),
    "predict_interactive_click_after_textarea.json": LabelingConfig(
        image_tag="image", image_key="image", outputs=(MASK_PERSON_BUS,), prompt_tag="prompt",
        prompt_key=None, keypoint_tag="click", labels=("Person", "Bus")),
}


def test_every_fixture_is_covered():
    fixture("setup.json")
    assert sorted(p.name for p in FIXTURES.glob("*.json")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_label_configs(name):
    config = parse_label_config(config_of(name))
    assert config == EXPECTED[name]
    assert config.interactive is True  # every one of them has the prompt TextArea


def test_parse_is_cached_by_xml_string():
    xml = config_of("setup.json")
    assert parse_label_config(xml) is parse_label_config(xml)
    assert parse_label_config(xml) is not parse_label_config(xml + " ")  # another string


def make(body: str) -> str:
    return f"<View>{body}</View>"


IMAGE = '<Image name="img" value="$url"/>'


def test_minimal_brush_config_is_not_interactive():
    config = parse_label_config(make(
        IMAGE + '<BrushLabels name="b" toName="img"><Label value="Car"/><Label value="Person"/>'
                '</BrushLabels>'))
    assert config == LabelingConfig(
        image_tag="img", image_key="url",
        outputs=(OutputTag("b", "img", "brush", "brushlabels", ("Car", "Person")),),
        prompt_tag=None, prompt_key=None, keypoint_tag=None, labels=("Car", "Person"))
    assert config.interactive is False


def test_all_three_output_kinds_in_config_order_and_labels_deduplicated():
    config = parse_label_config(make(
        '<Header value="Segment it"/>'
        '<RectangleLabels name="r" toName="img"><Label value="Dog"/></RectangleLabels>'
        + IMAGE +
        '<PolygonLabels name="p" toName="img"><Label value="Cat"/><Label value="Dog"/>'
        '</PolygonLabels>'
        '<BrushLabels name="b" toName="img"><View><Label value="Bird"/></View>'
        '<Label value="Cat"/></BrushLabels>'))
    assert config.outputs == (
        OutputTag("r", "img", "rectangle", "rectanglelabels", ("Dog",)),
        OutputTag("p", "img", "polygon", "polygonlabels", ("Cat", "Dog")),
        OutputTag("b", "img", "brush", "brushlabels", ("Bird", "Cat")),  # nested <View> label
    )
    assert config.labels == ("Dog", "Cat", "Bird")


def test_output_tag_without_labels_is_allowed():
    config = parse_label_config(make(IMAGE + '<BrushLabels name="b" toName="img"/>'))
    assert config.outputs == (OutputTag("b", "img", "brush", "brushlabels", ()),)
    assert config.labels == ()


def test_label_alias_is_the_result_value():
    # Label Studio writes alias (when set) into results, and so does the SDK's parser.
    config = parse_label_config(make(
        IMAGE + '<BrushLabels name="b" toName="img"><Label value="Automobile" alias="car"/>'
                '</BrushLabels>'))
    assert config.labels == ("car",)


def test_first_image_with_an_output_tag_is_chosen():
    config = parse_label_config(make(
        '<Image name="reference" value="$ref"/>'
        '<Image name="photo" value="$photo"/>'
        '<Image name="other" value="$other"/>'
        '<BrushLabels name="b" toName="photo"><Label value="A"/></BrushLabels>'
        '<BrushLabels name="b2" toName="other"><Label value="B"/></BrushLabels>'
        '<TextArea name="note" toName="reference"/>'
        '<TextArea name="prompt" toName="photo"/>'))
    assert (config.image_tag, config.image_key) == ("photo", "photo")
    assert [o.name for o in config.outputs] == ["b"]  # b2 points at another image
    assert config.labels == ("A",)
    assert config.prompt_tag == "prompt"  # not the TextArea on the reference image


def test_unknown_tags_are_ignored():
    config = parse_label_config(make(
        IMAGE + '<Choices name="c" toName="img"><Choice value="x"/></Choices>'
                '<MadeUpTag name="z" toName="img" foo="bar"/>'
                '<BrushLabels name="b" toName="img"><Label value="A"/></BrushLabels>'))
    assert [o.name for o in config.outputs] == ["b"]
    assert config.labels == ("A",)


def test_per_region_textarea_is_not_a_prompt_and_non_smart_keypoints_are_not_clicks():
    config = parse_label_config(make(
        IMAGE + '<BrushLabels name="b" toName="img"><Label value="A"/></BrushLabels>'
                '<TextArea name="notes" toName="img" perRegion="true"/>'
                '<KeyPointLabels name="kp" toName="img"><Label value="A"/></KeyPointLabels>'))
    assert config.prompt_tag is None
    assert config.keypoint_tag is None
    assert config.interactive is False


def test_smart_only_keypoints_are_clicks():
    config = parse_label_config(make(
        IMAGE + '<BrushLabels name="b" toName="img"><Label value="A"/></BrushLabels>'
                '<KeyPointLabels name="kp" toName="img" smartOnly="true"><Label value="A"/>'
                '</KeyPointLabels>'))
    assert config.keypoint_tag == "kp"


def test_prompt_key_prefers_a_prompt_variable_then_text_tags():
    base = IMAGE + '<BrushLabels name="b" toName="img"><Label value="A"/></BrushLabels>'
    assert parse_label_config(make(
        '<Text name="t" value="$caption"/>' + base)).prompt_key == "caption"
    assert parse_label_config(make(
        '<Text name="title" value="$title"/><Text name="p" value="$expression_prompt"/>'
        + base)).prompt_key == "expression_prompt"
    # a TextArea pre-filled from the task data (value="$...") counts too
    assert parse_label_config(make(
        base + '<TextArea name="prompt" toName="img" value="$query"/>')).prompt_key == "query"
    # a static Text is not a data key
    assert parse_label_config(make('<Text name="t" value="Hello"/>' + base)).prompt_key is None


def test_lowercase_tag_names_are_accepted():
    config = parse_label_config(
        '<View><image name="img" value="$url"/>'
        '<brushlabels name="b" toName="img"><Label value="A"/></brushlabels></View>')
    assert config.outputs == (OutputTag("b", "img", "brush", "brushlabels", ("A",)),)


# --- errors ------------------------------------------------------------------------------------


def raises(xml) -> str:
    with pytest.raises(LabelConfigError) as info:
        parse_label_config(xml)
    return str(info.value)


def test_invalid_xml():
    message = raises("<View><Image name='img' value='$url'></View>")
    assert message.startswith("the label config is not valid XML")
    assert "fix the XML syntax" in message
    assert raises("not xml at all").startswith("the label config is not valid XML")


def test_empty_and_non_string_config():
    assert raises("").startswith("the label config is empty")
    assert raises("   \n").startswith("the label config is empty")
    assert "must be an XML string, got NoneType" in raises(None)


def test_no_image_tag():
    message = raises(make('<BrushLabels name="b" toName="img"><Label value="A"/></BrushLabels>'))
    assert message == ('the label config has no <Image> tag: add '
                       '<Image name="image" value="$image"/>')
    # an <Image> without a value is not usable either
    assert raises(make('<Image name="img"/><BrushLabels name="b" toName="img"/>')) == message


def test_no_supported_output_tag():
    message = raises(make(IMAGE + '<Choices name="c" toName="img"><Choice value="x"/></Choices>'
                                  '<Brush name="raw" toName="img"/>'))
    assert "has no BrushLabels, PolygonLabels or RectangleLabels tag" in message
    assert '<BrushLabels name="mask" toName="img">' in message  # what to add
    assert "supported output tags: BrushLabels, PolygonLabels, RectangleLabels" in message


def test_output_tag_pointing_at_a_missing_image_is_named():
    message = raises(make(IMAGE + '<PolygonLabels name="poly" toName="photo"/>'))
    assert '<PolygonLabels name="poly" toName="photo">' in message
    assert "points at no <Image>" in message


def test_image_value_must_be_a_variable():
    message = raises(make('<Image name="img" value="https://example.com/a.jpg"/>'
                          '<BrushLabels name="b" toName="img"/>'))
    assert 'use value="$image"' in message
    assert "https://example.com/a.jpg" in message


def test_errors_are_value_errors():
    assert issubclass(LabelConfigError, ValueError)


# --- per-label instance thresholds (issue 13) ------------------------------------------------------

def _labels(*labels: str) -> str:
    return ('<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image">'
            + "".join(labels) + "</BrushLabels></View>")


def test_thresholds_come_from_the_label_attribute():
    config = parse_label_config(_labels('<Label value="car" hybridgl_threshold="0.4"/>', '<Label value="dog"/>',
                                        '<Label value="cat" hybridgl_threshold=" 1 "/>'))
    assert config.thresholds == (("car", 0.4), ("cat", 1.0))
    assert config.threshold_for("car") == 0.4 and config.threshold_for("dog") is None
    assert config.threshold_for(None) is None


@pytest.mark.parametrize("raw", ["1.5", "-0.1", "high", "nan", ""])
def test_a_threshold_out_of_range_is_refused_with_what_to_write(raw):
    with pytest.raises(LabelConfigError) as info:
        parse_label_config(_labels(f'<Label value="car" hybridgl_threshold="{raw}"/>'))
    message = str(info.value)
    assert 'value="car"' in message and "between 0 and 1" in message and 'hybridgl_threshold="0.4"' in message


def test_two_thresholds_for_one_label_are_refused():
    xml = ('<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image">'
           '<Label value="car" hybridgl_threshold="0.4"/></BrushLabels><PolygonLabels name="poly" toName="image">'
           '<Label value="car" hybridgl_threshold="0.6"/></PolygonLabels></View>')
    with pytest.raises(LabelConfigError, match='"car" has two different hybridgl_threshold values'):
        parse_label_config(xml)
