"""The interactive state per task (backend.interaction) on the real Redis, and the click jobs built from it."""

from __future__ import annotations

import threading

import pytest

from backend import interaction
from backend import jobspec as js
from backend.labeling import parse_label_config

CONFIG = """<View><Image name="image" value="$image"/>
<TextArea name="prompt" toName="image" editable="true"/>
<BrushLabels name="mask" toName="image"><Label value="Dog"/></BrushLabels>
<KeyPointLabels name="click" toName="image" smart="true"><Label value="Dog" smart="true"/></KeyPointLabels></View>"""
DOG = {"text": "the dog", "label": "Dog"}
GRASS = {"text": "the grass", "label": None}


def _click(x: float, positive: bool = True) -> dict:
    return {"x": x, "y": 50.0, "positive": positive, "label": "Dog"}


@pytest.fixture
def conn(clean_redis):
    return clean_redis


def test_clicks_accumulate_until_a_new_prompt(conn):
    interaction.start_prompt(conn, "7.1700000000", 1, DOG)
    assert interaction.add_clicks(conn, "7.1700000000", 1, [_click(10.123456789)]) == (DOG, [_click(10.1235)])
    prompt, clicks = interaction.add_clicks(conn, "7.1700000000", 1, [_click(20, positive=False)])
    assert prompt == DOG and clicks == [_click(10.1235), _click(20, positive=False)]
    # Label Studio sending the same click again (a retry) does not count it twice
    assert interaction.add_clicks(conn, "7.1700000000", 1, [_click(10.123456789)])[1] == clicks
    interaction.start_prompt(conn, "7.1700000000", 1, GRASS)  # a new prompt: its clicks start afresh
    assert interaction.add_clicks(conn, "7.1700000000", 1, [_click(30)]) == (GRASS, [_click(30)])
    interaction.start_prompt(conn, "7.1700000000", 1, DOG)  # an earlier prompt typed again is the current one
    assert interaction.add_clicks(conn, "7.1700000000", 1, [_click(40)]) == (DOG, [_click(40)])
    assert interaction.add_clicks(conn, "7.1700000000", 2, [_click(50)]) == (None, [_click(50)])  # another task: no prompt
    # Project 7 of another Label Studio sharing the workers has its own state
    assert interaction.add_clicks(conn, "7.1800000000", 1, [_click(60)]) == (None, [_click(60)])
    assert 0 < conn.ttl(interaction.state_key("7.1700000000", 1)) <= interaction.STATE_TTL


def test_concurrent_clicks_are_all_kept(conn):
    interaction.start_prompt(conn, "7", 3, DOG)
    threads = [threading.Thread(target=interaction.add_clicks, args=(conn, "7", 3, [_click(float(i))]))
               for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(c["x"] for c in interaction.add_clicks(conn, "7", 3, [])[1]) == [float(i) for i in range(20)]


def test_a_click_job_names_its_prompt_and_all_clicks():
    config = parse_label_config(CONFIG)

    def spec(refine, clicks):
        return js.prediction_job(model_version="v1", project="7", task_id=1, image="/a.png", expressions=[],
                                 clicks=clicks, refine=refine, config=config, config_digest="d", interactive=True,
                                 origin="web")

    one = spec(DOG, [_click(10)])
    assert one.queue == js.INTERACTIVE and one.payload["deliver"] == js.Delivery.RETURN
    assert one.payload["refine"] == DOG and one.payload["clicks"] == [_click(10)]
    assert spec(GRASS, [_click(10)]).job_id != one.job_id  # the same click on another prompt's mask
    assert spec(DOG, [_click(10), _click(20)]).job_id != one.job_id
