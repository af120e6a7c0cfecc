"""The method end to end: ``index(image)`` once per image, ``query(index, expression)`` per expression.

``index`` does everything that depends on the image alone (SAM proposals, hybrid region features,
GEM patch features); ``query`` does text-side work only. ``segment`` is both in one call and gives
exactly the same answer. ``instances(index, targets)`` answers label names and plural expressions
with every instance (``instances.py``) instead of HybridGL's single choice.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from . import guidance, instances as sets
from .clip_ops import encode_text_raw
from .errors import InputError
from .gem import gem_patch_features, heat_map
from .image_index import ImageIndex, boxes_from_masks
from .images import ImageError, image_hash, load_image
from .language import ParsedExpression, load_spacy, parse_expression
from .proposals import MaskProposer
from .regions import ViewBuilder, hybrid_features, mask_weights
from .settings import Settings

TEXT_CACHE_SIZE = 4096


class NoRegionError(InputError):
    """SAM found no region in the image (the release crashes here)."""


@dataclass
class QueryResult:
    chosen: int  # index of the answer among the proposals
    pure: int  # the answer of pure HybridGL (argmax s)
    mask: np.ndarray  # (H, W) bool
    score: float  # the chosen mask's p (softmax of s over all masks), in [0, 1]
    parsed: ParsedExpression
    explanation: dict = field(repr=False)


@dataclass
class InstancesResult:
    targets: tuple[str, ...]  # what was asked for, in order
    instances: list[sets.Instance]  # every instance kept, per target in target order, most confident first
    doubt: float | None  # confidence of the least sure "absent" decision (None: no proposal came near)
    explanation: dict = field(repr=False)


class HybridGL:
    """Models loaded once; then any number of images and expressions.

    Thread-safe for queries; index builds are serialized by a lock (they saturate the device).
    """

    def __init__(self, settings: Settings | None = None, models=None):
        from .models import load_models  # heavy: only when a pipeline is built

        self.settings = settings or Settings.from_env()
        self.models = models or load_models(self.settings)
        self.nlp = load_spacy(self.settings.spacy_model)
        self.proposer = MaskProposer(self.models.sam, self.settings.sam_preset, self.settings.sam_points_per_batch)
        self._index_lock = threading.Lock()
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._text_lock = threading.Lock()
        self._sticky_k = [self.settings.k1, self.settings.k2]  # only used with sticky_k (release bug)
        # Parses are small (expressions are at most 1000 characters), so a count bounds their bytes.
        self._parse_cached = functools.lru_cache(maxsize=TEXT_CACHE_SIZE)(self._parse)

    # --- identity ----------------------------------------------------------------------
    @property
    def index_fingerprint(self) -> str:
        return self.settings.index_fingerprint(self.models.identity)

    @property
    def model_version(self) -> str:
        """Changes whenever a model or a setting that changes results changes."""
        s = self.settings
        return f"hybridgl-{s.sam_model}-{s.clip_model}-{s.results_fingerprint(self.models.identity)[:10]}"

    def index_key(self, image_digest: str, proposals_digest: str | None = None) -> str:
        key = f"{image_digest}:{self.index_fingerprint}"
        return f"{key}:{proposals_digest}" if proposals_digest else key

    # --- image side --------------------------------------------------------------------
    def index(self, image, proposals: np.ndarray | None = None, timings: dict | None = None) -> ImageIndex:
        """Everything that depends on the image alone.

        ``proposals`` (N, H, W) bool replaces SAM's masks (users' own mask generators).
        ``timings``, when given, receives seconds per step.
        """
        rgb = load_image(image)
        h, w = rgb.shape[:2]
        digest = image_hash(rgb)
        s = self.settings
        clip = self.models.clip
        timings = {} if timings is None else timings
        with self._index_lock:
            t0 = time.perf_counter()
            embedding, input_size = None, None
            if proposals is None:
                props = self.proposer(rgb)
                masks, boxes = props.masks, props.boxes
                embedding, input_size = props.embedding, props.input_size
                proposals_digest = None
            else:
                masks = _check_proposals(proposals, (h, w))
                boxes = boxes_from_masks(masks)
                proposals_digest = image_hash(np.packbits(masks.numpy(), axis=-1)[..., None])[:16]
            t1 = time.perf_counter()
            timings["proposals"] = t1 - t0
            if len(masks) == 0:
                features = torch.zeros((0, clip.visual.output_dim))
                timings["views"] = timings["regions"] = 0.0
            else:
                local, global_ = ViewBuilder(rgb, s.view_size, s.blur_kernel, s.normalization).views(masks)
                weights = mask_weights(masks, clip.visual.grid_size[0])
                t2 = time.perf_counter()
                timings["views"] = t2 - t1
                features = hybrid_features(clip.visual, local, global_, weights, s.masking_block, s.fusion_weight,
                                           self.models.dtype).cpu()
                timings["regions"] = time.perf_counter() - t2
            t3 = time.perf_counter()
            gem = gem_patch_features(clip.visual, rgb, s.gem_size, s.gem_blocks, s.gem_ss_iters,
                                     self.models.dtype).cpu()
            timings["gem"] = time.perf_counter() - t3
        index = ImageIndex(
            key=self.index_key(digest, proposals_digest), image_size=(h, w), masks=masks.cpu(),
            boxes=np.asarray(boxes, dtype=np.float64), features=features, gem_features=gem,
            sam_embedding=embedding.cpu() if embedding is not None else None, sam_input_size=input_size,
        )
        return index.rounded(s.index_dtype)

    # --- text side ---------------------------------------------------------------------
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Raw CLIP text features E(x), cached per string."""
        with self._text_lock:
            missing = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if missing:
            clip = self.models.clip
            tokens = self.models.tokenizer(missing).to(self.models.device)
            feats = encode_text_raw(clip, tokens).float().cpu()
            with self._text_lock:
                for t, f in zip(missing, feats):
                    self._text_cache[t] = f
                while len(self._text_cache) > TEXT_CACHE_SIZE:
                    self._text_cache.popitem(last=False)
        with self._text_lock:
            for t in texts:
                self._text_cache.move_to_end(t)
            return torch.stack([self._text_cache[t] for t in texts])

    def parse(self, expression: str) -> ParsedExpression:
        """The parse of ``expression``; cached (like the text features): label names are parsed for every
        image, and 200 of them take seconds to parse."""
        return self._parse_cached(expression)

    def _parse(self, expression: str) -> ParsedExpression:
        return parse_expression(self.nlp, expression, right_fires=self.settings.right_fires)

    def text_features(self, parsed: list[ParsedExpression]) -> torch.Tensor:
        """HybridGL's text feature t = normalize(0.5·E(text) + 0.5·E(phrase)) per parsed expression (as query's)."""
        raw = self.encode_texts([x for p in parsed for x in (p.text, p.noun_phrase)]).reshape(len(parsed), 2, -1)
        return F.normalize(0.5 * raw[:, 0] + 0.5 * raw[:, 1], dim=-1)

    def query(self, index: ImageIndex, expression: str) -> QueryResult:
        """The mask ``expression`` refers to, with every intermediate value in the explanation."""
        s = self.settings
        parsed = self.parse(expression)
        n = len(index.masks)
        if n == 0:
            raise NoRegionError("no region found: SAM proposed no mask for this image "
                                "(try the phrasecut preset, or another image)")
        gem_text = s.gem_prompt.format(parsed.noun_phrase)
        nouns = [f"a photo of {chunk}" for chunk in parsed.other_nouns]
        raw = self.encode_texts([parsed.text, parsed.noun_phrase, gem_text, *nouns])
        t = F.normalize(0.5 * raw[0] + 0.5 * raw[1], dim=-1)
        f = index.features.float()
        s_scores = (s.logit_scale * (f @ t)).double().numpy()
        p = guidance.softmax(s_scores)
        pure = guidance.first_argmax(s_scores)

        if s.sticky_k:  # the release's bug: the clipped k's persist across images
            k1, k2 = self._sticky_k = [min(self._sticky_k[0], n), min(self._sticky_k[1], n)]
        else:
            k1, k2 = min(s.k1, n), min(s.k2, n)
        candidates = guidance.stable_top_k(p, k1)
        q = None
        if nouns:
            o = F.normalize(raw[3:].mean(0), dim=-1)
            q = guidance.softmax((s.logit_scale * (f @ o)).double().numpy())
            references, ref_weights = guidance.stable_top_k(q, k2), q
        else:
            references, ref_weights = candidates, p

        relation = parsed.relation
        t_raw = guidance.relation_scores(relation, candidates, references, p, ref_weights, index.boxes)
        t_soft = guidance.softmax(t_raw)

        h, w = index.image_size
        heat = heat_map(index.gem_features, F.normalize(raw[2], dim=-1), (h, w), s.gem_size)
        prior = guidance.column_prior(parsed.direction if s.position_prior else "none", w, h, s.vertical_prior)
        heat = guidance.normalized_heat(heat, prior)
        beta = {"big": s.beta_big, "small": s.beta_small}.get(relation, s.beta)
        gem = guidance.gem_scores(heat, index.masks, index.boxes, index.pixel_area, beta)

        # A switched-off step contributes nothing; both off leaves the pure answer.
        final = np.zeros(len(candidates))
        if s.relation_guidance:
            final += (1 - s.alpha) * t_soft
        if s.coherence:
            final += s.alpha * gem[candidates]
        if s.relation_guidance or s.coherence:
            chosen = int(candidates[guidance.first_argmax(final)])
        else:
            chosen = pure

        explanation = _explanation(parsed, index, s_scores, p, q, candidates, references, t_soft, gem, final,
                                   pure, chosen)
        return QueryResult(chosen=chosen, pure=pure, mask=index.masks[chosen].numpy(), score=float(p[chosen]),
                           parsed=parsed, explanation=explanation)

    def instances(self, index: ImageIndex, targets: list[str], others: list[str] = (),
                  thresholds: list[float] | None = None) -> InstancesResult:
        """Every instance of each target (label names, or plural expressions), none of an absent one.

        Each proposal is classified among ``targets``, ``others`` (the project's other labels) and
        the background prompts (setting ``background_prompts``); see ``instances.py`` for the rule.
        ``thresholds``: one probability per target (default: setting ``instance_threshold``).
        A target or other class with no words raises EmptyExpressionError (a ValueError).
        """
        s = self.settings
        targets = tuple(targets)
        if not targets:
            raise ValueError("instances() needs at least one target")
        taken = {t.casefold() for t in targets}
        others = [o for o in dict.fromkeys(others) if o.casefold() not in taken]
        taken |= {o.casefold() for o in others}
        backgrounds = [b for b in s.background_prompt_list if b.casefold() not in taken]
        names = [*targets, *others, *backgrounds]
        thresholds = [s.instance_threshold] * len(targets) if thresholds is None else list(thresholds)
        n = len(index.masks)
        if n == 0:
            probabilities = np.zeros((0, len(names)))
        else:
            class_features = self.text_features([self.parse(name) for name in names])
            probabilities = sets.classify(index.features.float().numpy(), class_features.numpy(), s.logit_scale)
        decisions = sets.decide(probabilities, len(targets), thresholds, index.masks, s.instance_overlap)
        explanation = _instances_explanation(index, names, len(targets), len(others), thresholds, s, decisions)
        return InstancesResult(targets=targets, instances=decisions.instances, doubt=decisions.doubt(len(targets)),
                               explanation=explanation)

    def segment(self, image, expression: str, proposals: np.ndarray | None = None) -> QueryResult:
        """One-shot: index then query (identical to calling both)."""
        return self.query(self.index(image, proposals), expression)


def _check_proposals(proposals, hw: tuple[int, int]) -> torch.Tensor:
    arr = np.asarray(proposals)
    if arr.ndim != 3 or arr.shape[1:] != hw:
        raise ImageError(f"proposals must be an N x {hw[0]} x {hw[1]} array of masks matching the image, "
                         f"got shape {arr.shape}")
    return torch.from_numpy(arr.astype(bool))


def _explanation(parsed, index, s_scores, p, q, candidates, references, t_soft, gem, final, pure, chosen) -> dict:
    cand_pos = {int(c): k for k, c in enumerate(candidates)}
    refs = {int(r) for r in references}
    masks = []
    for i in range(len(index.masks)):
        x, y, w, h = (float(v) for v in index.boxes[i])
        k = cand_pos.get(i)
        masks.append({
            "index": i,
            "box": [x, y, w, h],
            "area": w * h,
            "s": _num(s_scores[i]),
            "p": _num(p[i]),
            "q": None if q is None else _num(q[i]),
            "candidate": k is not None,
            "reference": i in refs,
            "T": None if k is None else _num(t_soft[k]),
            "gem": _num(gem[i]),
            "final": None if k is None else _num(final[k]),
        })
    return {**parsed.to_dict(), "pure": pure, "chosen": chosen, "masks": masks}


def _instances_explanation(index, names, n_targets, n_others, thresholds, s, decisions) -> dict:
    labelled = n_targets + n_others  # classes after these are background prompts
    masks = []
    for i in range(len(index.masks)):
        x, y, w, h = (float(v) for v in index.boxes[i])
        row = decisions.probabilities[i]
        best = int(decisions.best[i])
        masks.append({
            "index": i,
            "box": [x, y, w, h],
            "area": w * h,
            "probabilities": {name: float(row[c]) for c, name in enumerate(names[:labelled])},
            sets.BACKGROUND: float(row[labelled:].sum()),
            "best": names[best] if best < labelled else sets.BACKGROUND,
            "decision": decisions.decision[i],
            "overlaps": decisions.overlapped[i],
        })
    return {
        "targets": list(names[:n_targets]),
        "other_labels": list(names[n_targets:labelled]),
        "background_prompts": list(names[labelled:]),
        "thresholds": {name: float(t) for name, t in zip(names[:n_targets], thresholds)},
        "overlap": s.instance_overlap,
        "instances": [{"index": d.index, "target": names[d.target], "score": d.score} for d in decisions.instances],
        "masks": masks,
    }


def _num(v) -> float | None:
    """JSON number; -inf/NaN (degenerate masks) become null."""
    v = float(v)
    return v if np.isfinite(v) else None
