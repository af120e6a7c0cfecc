"""Sets of objects: every instance of a label (or of "all the cars"), and nothing when it is absent.

HybridGL answers a referring expression with one mask. A label name or a plural expression asks
for a set, so this module decides, on the same hybrid region features, which proposals are
instances (open-vocabulary region classification):

1. **Classify** every proposal among all classes at once: the targets (the labels or the
   expression asked for), the project's other labels, and a few background prompts.
   ``P(class | region) = softmax_c(logit_scale * cos(f_region, t_c))``, with ``t_c`` the class's
   text feature built as HybridGL builds one (HYBRIDGL.md 4). A proposal belongs to its most
   probable class only.
2. **Threshold**: a proposal is an instance of target ``k`` when ``k`` is its most probable class
   and ``P(k | region) >= threshold_k`` (a per-target probability, not an absolute cosine: the
   other classes and the background compete for the same probability mass, so one rule works for
   every label of a project).
3. **One region per object**: SAM proposes an object's whole, its parts and subparts. Among a
   target's instances, most confident first (ties: proposal order), a proposal is dropped when it
   overlaps an instance already kept by ``|A ∩ B| / min(|A|, |B|) >= overlap``: a part inside a
   whole overlaps it by ~1 even when their IoU is small.

The score of an instance is ``P(k | region)``, the confidence of that decision, in [0, 1].

Pure: numpy only; the caller supplies the features and masks (see ``pipeline.HybridGL.instances``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["BACKGROUND", "Instance", "InstanceDecisions", "classify", "decide", "overlap"]

BACKGROUND = "background"  # the name the explanation gives the background prompts' summed probability

# Why a proposal is not an instance (the explanation's ``decision``).
KEPT, BELOW, OTHER, OVERLAPS = "instance", "below threshold", "other class", "overlaps instance"


@dataclass(frozen=True)
class Instance:
    index: int  # proposal index
    target: int  # which target it is an instance of
    score: float  # P(target | region), in [0, 1]


@dataclass
class InstanceDecisions:
    instances: list[Instance]  # kept, per target in target order, most confident first
    probabilities: np.ndarray  # (N, C) P(class | region) over every class
    best: np.ndarray  # (N,) most probable class per proposal
    decision: list[str]  # per proposal: KEPT, BELOW, OTHER or OVERLAPS
    overlapped: list[int | None]  # per proposal: the kept instance's proposal index it overlaps

    def doubt(self, n_targets: int) -> float | None:
        """Confidence of the least sure "absent" decision: 1 - the highest probability a rejected
        proposal had for its target (None when no proposal came near a target)."""
        rejected = [float(self.probabilities[i, self.best[i]]) for i, d in enumerate(self.decision)
                    if d == BELOW and self.best[i] < n_targets]
        return 1.0 - max(rejected) if rejected else None


def classify(region_features: np.ndarray, class_features: np.ndarray, logit_scale: float) -> np.ndarray:
    """(N, C) softmax over classes of ``logit_scale * cos``; both inputs L2-normalized rows."""
    logits = logit_scale * (np.asarray(region_features, np.float64) @ np.asarray(class_features, np.float64).T)
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """|a ∩ b| / min(|a|, |b|) for boolean masks (0 when either is empty)."""
    smaller = min(int(a.sum()), int(b.sum()))
    return float(np.logical_and(a, b).sum()) / smaller if smaller else 0.0


def decide(probabilities: np.ndarray, n_targets: int, thresholds, masks, overlap_limit: float) -> InstanceDecisions:
    """The instances of each of the first ``n_targets`` classes (rules 2 and 3 of the module).

    ``thresholds``: one probability per target; ``masks``: (N, H, W) boolean (numpy or torch).
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    n = probabilities.shape[0]
    thresholds = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if thresholds.shape != (n_targets,):
        raise ValueError(f"need one threshold per target ({n_targets}), got {thresholds.shape[0]}")
    best = probabilities.argmax(axis=1) if n else np.zeros(0, dtype=int)
    decision = [OTHER] * n
    overlapped: list[int | None] = [None] * n
    instances: list[Instance] = []
    for k in range(n_targets):
        mine = [i for i in range(n) if best[i] == k]
        for i in mine:
            if probabilities[i, k] < thresholds[k]:
                decision[i] = BELOW
        passing = sorted((i for i in mine if decision[i] != BELOW), key=lambda i: (-probabilities[i, k], i))
        kept: list[int] = []
        for i in passing:
            mask = np.asarray(masks[i], dtype=bool)
            hit = next((j for j in kept if overlap(mask, np.asarray(masks[j], dtype=bool)) >= overlap_limit), None)
            if hit is None:
                kept.append(i)
                decision[i] = KEPT
                instances.append(Instance(index=i, target=k, score=float(probabilities[i, k])))
            else:
                decision[i] = OVERLAPS
                overlapped[i] = hit
    return InstanceDecisions(instances, probabilities, best, decision, overlapped)
