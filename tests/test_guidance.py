"""Tests for worker.hybridgl.guidance and gem.heat_map: HYBRIDGL.md sections 5 and 6 by hand.

Every expected number below is written as a literal or as explicit arithmetic on the hand-made
inputs, never by calling the code under test.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from worker.hybridgl import guidance
from worker.hybridgl.gem import heat_map

# ---------------------------------------------------------------------------------------------
# softmax, stable_top_k, first_argmax


def test_softmax_hand_values():
    out = guidance.softmax(np.array([0.0, math.log(2.0), math.log(3.0)]))
    np.testing.assert_allclose(out, [1 / 6, 2 / 6, 3 / 6], rtol=1e-12)


def test_softmax_is_stable_for_large_logits():
    # exp(1000) overflows; the max-shift must keep the result exact: 1 : 3.
    out = guidance.softmax(np.array([1000.0, 1000.0 + math.log(3.0)]))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, [0.25, 0.75], rtol=1e-12)


def test_softmax_uniform_and_sums_to_one():
    np.testing.assert_allclose(guidance.softmax(np.array([5.0, 5.0, 5.0, 5.0])), [0.25] * 4)
    out = guidance.softmax(np.array([-3.0, 0.5, 2.0]))
    assert out.sum() == pytest.approx(1.0)
    # e^-3 : e^0.5 : e^2
    z = math.exp(-3.0) + math.exp(0.5) + math.exp(2.0)
    np.testing.assert_allclose(out, [math.exp(-3.0) / z, math.exp(0.5) / z, math.exp(2.0) / z])


def test_stable_top_k_ties_keep_lower_index_first():
    values = np.array([0.2, 0.5, 0.2, 0.5, 0.1])
    assert guidance.stable_top_k(values, 3).tolist() == [1, 3, 0]
    assert guidance.stable_top_k(values, 1).tolist() == [1]
    assert guidance.stable_top_k(np.array([7.0, 7.0, 7.0]), 2).tolist() == [0, 1]


def test_stable_top_k_k_larger_than_n_returns_all_sorted():
    values = np.array([0.2, 0.5, 0.2, 0.5, 0.1])
    assert guidance.stable_top_k(values, 10).tolist() == [1, 3, 0, 2, 4]
    assert guidance.stable_top_k(np.array([3.0]), 6).tolist() == [0]


def test_first_argmax_first_of_equal_maxima():
    assert guidance.first_argmax(np.array([1.0, 3.0, 3.0, 2.0])) == 1
    assert guidance.first_argmax(np.array([4.0, 4.0])) == 0
    assert guidance.first_argmax(np.array([-np.inf, -1.0, -1.0])) == 1


def test_first_argmax_nan_never_wins():
    # np.argmax alone would return the NaN's index (0 here).
    assert guidance.first_argmax(np.array([np.nan, 1.0, 2.0])) == 2
    assert guidance.first_argmax(np.array([1.0, np.nan, 1.0])) == 0
    assert guidance.first_argmax(np.array([-np.inf, np.nan, -5.0])) == 2


# ---------------------------------------------------------------------------------------------
# relation_scores (5a). Hand-made boxes (x, y, w, h):
#   0: (0, 0, 4, 2)  centre (2, 1)     area 8   x [0, 4]  y [0, 2]
#   1: (6, 4, 2, 2)  centre (7, 5)     area 4   x [6, 8]  y [4, 6]
#   2: (1, 1, 6, 4)  centre (4, 3)     area 24  x [1, 7]  y [1, 5]
#   3: (2, 0, 1, 1)  centre (2.5, 0.5) area 1   x [2, 3]  y [0, 1]
# Candidates 0, 1, 3; references 0, 2, 3 (0 and 3 are both: rel with itself included).

BOXES = np.array([[0, 0, 4, 2], [6, 4, 2, 2], [1, 1, 6, 4], [2, 0, 1, 1]], dtype=float)
P = np.array([0.4, 0.3, 0.2, 0.1])
W = np.array([0.5, 0.25, 0.15, 0.1])
CANDIDATES = np.array([0, 1, 3])
REFERENCES = np.array([0, 2, 3])

EXPECTED_RAW = {
    # none: p_i once per reference (3 references)
    "none": [0.4 * 3, 0.3 * 3, 0.1 * 3],
    # left: cx_i < cx_j. cand 0 (cx 2) < 4, 2.5; cand 1 (7) never; cand 3 (2.5) < 4 only.
    "left": [0.4 * 0.15 + 0.4 * 0.1, 0.0, 0.1 * 0.15],
    # right: cx_i > cx_j. cand 0 never; cand 1 > all; cand 3 (2.5) > 2 (ref 0) only.
    "right": [0.0, 0.3 * (0.5 + 0.15 + 0.1), 0.1 * 0.5],
    # up: cy_i < cy_j (y grows downward). cand 0 (1) < 3; cand 1 (5) never; cand 3 (0.5) < 1, 3.
    "up": [0.4 * 0.15, 0.0, 0.1 * 0.5 + 0.1 * 0.15],
    # down: cy_i > cy_j. cand 0 (1) > 0.5; cand 1 (5) > all; cand 3 (0.5) never.
    "down": [0.4 * 0.1, 0.3 * (0.5 + 0.15 + 0.1), 0.0],
    # big: area_i > area_j (refs 8, 24, 1). cand 0 (8) > 1; cand 1 (4) > 1; cand 3 (1) never.
    "big": [0.4 * 0.1, 0.3 * 0.1, 0.0],
    # small: area_i < area_j. cand 0 (8) < 24; cand 1 (4) < 8, 24; cand 3 (1) < 8, 24.
    "small": [0.4 * 0.15, 0.3 * 0.5 + 0.3 * 0.15, 0.1 * 0.5 + 0.1 * 0.15],
    # within: p_i w_j |box_i ∩ box_j| / area_i
    #   cand 0 (area 8): with itself 8/8; with 2: [1,4]x[1,2] = 3; with 3: [2,3]x[0,1] = 1
    #   cand 1 (area 4): with 0: none; with 2: [6,7]x[4,5] = 1; with 3: none
    #   cand 3 (area 1): inside 0: 1; with 2: y [1,1] has zero height; with itself 1
    "within": [0.4 * 0.5 * 8 / 8 + 0.4 * 0.15 * 3 / 8 + 0.4 * 0.1 * 1 / 8,
               0.3 * 0.15 * 1 / 4,
               0.1 * 0.5 * 1 / 1 + 0.0 + 0.1 * 0.1 * 1 / 1],
}


@pytest.mark.parametrize("relation", sorted(EXPECTED_RAW))
def test_relation_scores_hand_values(relation):
    out = guidance.relation_scores(relation, CANDIDATES, REFERENCES, P, W, BOXES)
    assert out.shape == (3,)
    np.testing.assert_allclose(out, EXPECTED_RAW[relation], rtol=1e-12, atol=1e-15)


def test_relation_scores_literal_numbers():
    # The same cases once more as plain literals, so a typo in the arithmetic above cannot hide.
    def rs(rel):
        return guidance.relation_scores(rel, CANDIDATES, REFERENCES, P, W, BOXES)

    np.testing.assert_allclose(rs("none"), [1.2, 0.9, 0.3])
    np.testing.assert_allclose(rs("left"), [0.10, 0.0, 0.015])
    np.testing.assert_allclose(rs("right"), [0.0, 0.225, 0.05])
    np.testing.assert_allclose(rs("within"), [0.2275, 0.01125, 0.06])


def test_relation_with_itself_only():
    # Candidate 0 is its own only reference: strict comparisons give 0, within gives p_i * w_i.
    cand, ref = np.array([0]), np.array([0])
    for rel in ("left", "right", "up", "down", "big", "small"):
        assert guidance.relation_scores(rel, cand, ref, P, W, BOXES).tolist() == [0.0], rel
    np.testing.assert_allclose(guidance.relation_scores("within", cand, ref, P, W, BOXES), [0.4 * 0.5])
    np.testing.assert_allclose(guidance.relation_scores("none", cand, ref, P, W, BOXES), [0.4])


def test_relation_equal_centres_and_areas_are_strict():
    # Two different boxes with the same centre (2, 2) and the same area 4: no strict relation holds.
    boxes = np.array([[1, 1, 2, 2], [0, 1.5, 4, 1]], dtype=float)
    p, w = np.array([0.6, 0.4]), np.array([0.7, 0.3])
    for rel in ("left", "right", "up", "down", "big", "small"):
        out = guidance.relation_scores(rel, np.array([0]), np.array([1]), p, w, boxes)
        assert out.tolist() == [0.0], rel


def test_relation_within_zero_area_box_is_zero_without_warnings():
    # Candidate 0 is a 1-pixel-wide mask (w = 0, SAM-style): area 0 -> within gives 0, no NaN.
    boxes = np.array([[3, 2, 0, 4], [0, 0, 10, 10]], dtype=float)
    p, w = np.array([0.7, 0.3]), np.array([0.5, 0.5])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = guidance.relation_scores("within", np.array([0, 1]), np.array([0, 1]), p, w, boxes)
    # cand 1 (area 100): with 0: zero-width intersection; with itself 100/100.
    np.testing.assert_allclose(out, [0.0, 0.3 * 0.5])


def test_relation_scores_softmax_over_candidates():
    # T = softmax over the candidates of the raw sums (right: 0, 0.225, 0.05).
    raw = guidance.relation_scores("right", CANDIDATES, REFERENCES, P, W, BOXES)
    z = math.exp(0.0) + math.exp(0.225) + math.exp(0.05)
    np.testing.assert_allclose(guidance.softmax(raw), [1 / z, math.exp(0.225) / z, math.exp(0.05) / z])


# ---------------------------------------------------------------------------------------------
# column_prior and normalized_heat (5b)


def test_column_prior_left_right():
    left = guidance.column_prior("left", 5, 3)
    right = guidance.column_prior("right", 5, 3)
    assert tuple(left.shape) == (3, 5) and tuple(right.shape) == (3, 5)
    for row in range(3):
        np.testing.assert_allclose(left[row].numpy(), [1.0, 0.75, 0.5, 0.25, 0.0], atol=1e-7)
        np.testing.assert_allclose(right[row].numpy(), [0.0, 0.25, 0.5, 0.75, 1.0], atol=1e-7)


def test_column_prior_middle_odd_and_even_width():
    # W = 5: linspace(0, 1, 2) ++ linspace(1, 0, 3) = [0, 1] ++ [1, 0.5, 0]
    middle5 = guidance.column_prior("middle", 5, 2)
    assert tuple(middle5.shape) == (2, 5)
    for row in range(2):
        np.testing.assert_allclose(middle5[row].numpy(), [0.0, 1.0, 1.0, 0.5, 0.0], atol=1e-7)
    # W = 7: linspace(0, 1, 3) ++ linspace(1, 0, 4)
    middle7 = guidance.column_prior("middle", 7, 1)
    np.testing.assert_allclose(middle7[0].numpy(), [0.0, 0.5, 1.0, 1.0, 2 / 3, 1 / 3, 0.0], atol=1e-6)
    # W = 4: [0, 1] ++ [1, 0]
    np.testing.assert_allclose(guidance.column_prior("middle", 4, 1)[0].numpy(), [0.0, 1.0, 1.0, 0.0])


@pytest.mark.parametrize("direction", ["up", "down", "none"])
def test_column_prior_flat_by_default(direction):
    prior = guidance.column_prior(direction, 4, 3)
    assert tuple(prior.shape) == (3, 4)
    assert torch.equal(prior, torch.ones(3, 4))


def test_column_prior_vertical_ramps():
    up = guidance.column_prior("up", 2, 3, vertical=True)
    down = guidance.column_prior("down", 2, 3, vertical=True)
    assert tuple(up.shape) == (3, 2) and tuple(down.shape) == (3, 2)
    np.testing.assert_allclose(up.numpy(), [[1.0, 1.0], [0.5, 0.5], [0.0, 0.0]], atol=1e-7)
    np.testing.assert_allclose(down.numpy(), [[0.0, 0.0], [0.5, 0.5], [1.0, 1.0]], atol=1e-7)
    # vertical changes nothing for none or the column directions
    assert torch.equal(guidance.column_prior("none", 2, 3, vertical=True), torch.ones(3, 2))
    np.testing.assert_allclose(guidance.column_prior("left", 3, 2, vertical=True).numpy(),
                               [[1.0, 0.5, 0.0], [1.0, 0.5, 0.0]], atol=1e-7)


def test_normalized_heat_divides_by_mean():
    heat = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = guidance.normalized_heat(heat, torch.ones(2, 2))
    # mean 2.5
    np.testing.assert_allclose(out.numpy(), [[0.4, 0.8], [1.2, 1.6]], rtol=1e-6)
    assert float(out.mean()) == pytest.approx(1.0)


def test_normalized_heat_applies_prior_before_mean():
    heat = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    prior = torch.tensor([[1.0, 0.5], [1.0, 0.0]])
    # A * prior = [[1, 1], [3, 0]], mean 5/4
    out = guidance.normalized_heat(heat, prior)
    np.testing.assert_allclose(out.numpy(), [[0.8, 0.8], [2.4, 0.0]], rtol=1e-6)


def test_normalized_heat_none_and_zero():
    assert guidance.normalized_heat(None, torch.ones(2, 2)) is None
    # Heat only where the prior is 0: A * prior is all zero; no NaN map comes back.
    heat = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    prior = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert guidance.normalized_heat(heat, prior) is None


# ---------------------------------------------------------------------------------------------
# gem_scores (5b). Heat map 4 rows x 5 columns:
HEAT = torch.tensor([
    [1.0, 2.0, 3.0, 4.0, 5.0],
    [0.0, 1.0, 0.0, 1.0, 0.0],
    [2.0, 2.0, 2.0, 2.0, 2.0],
    [0.0, 0.0, 0.0, 0.0, 10.0],
])  # total 15 + 2 + 10 + 10 = 37 over 20 pixels


def _gem_masks():
    masks = torch.zeros(5, 4, 5, dtype=torch.bool)
    masks[0, 1, 2] = True                 # a: 1 pixel at (x=2, y=1): box (2, 1, 0, 0)
    masks[1, 0:2, 0:2] = True             # b: 2x2 square top-left: box (0, 0, 1, 1)
    masks[2, 2, 3] = True                 # c: L shape (x=3,y=2), (x=3,y=3), (x=4,y=3)
    masks[2, 3, 3] = True                 #    box (3, 2, 1, 1); (x=4, y=2) is in the box,
    masks[2, 3, 4] = True                 #    not in the mask
    # d: empty
    masks[4] = True                       # e: whole image
    boxes = np.array([[2, 1, 0, 0], [0, 0, 1, 1], [3, 2, 1, 1], [0, 0, 0, 0], [0, 0, 4, 3]], dtype=float)
    area = np.array([1, 4, 3, 0, 20])
    return masks, boxes, area


def test_gem_scores_hand_values():
    masks, boxes, area = _gem_masks()
    out = guidance.gem_scores(HEAT, masks, boxes, area, 1.8)
    # a: inside 0 (1 px), outside 37 / 19
    # b: inside (1 + 2 + 0 + 1) / 4 = 1, outside 33 / 16
    # c: inside (2 + 0 + 10) / 3 = 4, outside 25 / 17
    expected = [(2 - 1.8) * 0.0 - 1.8 * 37 / 19,
                (2 - 1.8) * 1.0 - 1.8 * 33 / 16,
                (2 - 1.8) * 4.0 - 1.8 * 25 / 17]
    np.testing.assert_allclose(out[:3], expected, rtol=1e-6)
    np.testing.assert_allclose(out[:3], [-3.505263157894737, -3.5125, -1.8470588235294119], rtol=1e-6)
    assert out[3] == -np.inf and out[4] == -np.inf


@pytest.mark.parametrize("beta", [1.5, 1.8, 1.95])
def test_gem_scores_beta_is_passed_through(beta):
    masks, boxes, area = _gem_masks()
    out = guidance.gem_scores(HEAT, masks, boxes, area, beta, indices=np.array([1, 2]))
    np.testing.assert_allclose(out, [(2 - beta) * 1.0 - beta * 33 / 16, (2 - beta) * 4.0 - beta * 25 / 17],
                               rtol=1e-6)


def test_gem_scores_indices_select_and_order():
    masks, boxes, area = _gem_masks()
    out = guidance.gem_scores(HEAT, masks, boxes, area, 1.5, indices=np.array([2, 0, 3]))
    np.testing.assert_allclose(out[:2], [0.5 * 4.0 - 1.5 * 25 / 17, 0.5 * 0.0 - 1.5 * 37 / 19], rtol=1e-6)
    assert out[2] == -np.inf
    assert len(out) == 3


def test_gem_scores_match_brute_force_means():
    # Independent check over the whole image (no box cropping) with a random heat map.
    gen = torch.Generator().manual_seed(0)
    heat = torch.rand(4, 5, generator=gen)
    masks, boxes, area = _gem_masks()
    out = guidance.gem_scores(heat, masks, boxes, area, 1.8, indices=np.array([0, 1, 2]))
    for n in range(3):
        m = masks[n]
        inside = float(heat[m].mean())
        outside = float(heat[~m].mean())
        assert out[n] == pytest.approx(0.2 * inside - 1.8 * outside, rel=1e-5)


def test_gem_scores_constant_heat_is_zero():
    masks, boxes, area = _gem_masks()
    out = guidance.gem_scores(None, masks, boxes, area, 1.8)
    assert out[:3].tolist() == [0.0, 0.0, 0.0]
    # empty and whole-image masks stay -inf (never NaN, which argmax would pick)
    assert out[3] == -np.inf and out[4] == -np.inf


# ---------------------------------------------------------------------------------------------
# heat_map (gem.py)


def _grid_features(sims):
    """Patch features (n, 2) with patch k . [1, 0] == sims[k]; row-major grid."""
    sims = torch.tensor(sims, dtype=torch.float32)
    return torch.stack([sims, torch.zeros_like(sims)], dim=1), torch.tensor([1.0, 0.0])


@pytest.mark.parametrize("value", [0.5, 0.1, 0.3])
@pytest.mark.parametrize("size", [8, 448])
def test_heat_map_constant_similarity_is_none(value, size):
    # Every patch has the same similarity `value`: the map is constant (HYBRIDGL.md 5b: max = min
    # -> gem = 0), so heat_map must say None, not min-max-stretch float rounding into [0, 1].
    feats, text = _grid_features([value] * 4)
    assert heat_map(feats, text, (6, 9), size=size) is None


def test_heat_map_constant_normalized_features_is_none():
    feats = torch.nn.functional.normalize(torch.ones(784, 3), dim=-1)
    text = torch.nn.functional.normalize(torch.tensor([1.0, 2.0, 3.0]), dim=0)
    assert heat_map(feats, text, (30, 40)) is None


def test_heat_map_hand_values_left_to_right():
    # grid [[0, 1], [0, 1]] upsampled 2 -> 4 (align_corners=False): source columns
    # -0.25 (clamped 0), 0.25, 0.75, 1.25 (clamped 1) -> 0, 0.25, 0.75, 1. Same size out: identity.
    feats, text = _grid_features([0.0, 1.0, 0.0, 1.0])
    out = heat_map(feats, text, (4, 4), size=4)
    assert tuple(out.shape) == (4, 4)
    for row in range(4):
        np.testing.assert_allclose(out[row].numpy(), [0.0, 0.25, 0.75, 1.0], atol=1e-6)


def test_heat_map_is_row_major():
    # grid [[0, 0], [1, 1]]: top row low, bottom row high.
    feats, text = _grid_features([0.0, 0.0, 1.0, 1.0])
    out = heat_map(feats, text, (4, 4), size=4)
    for col in range(4):
        np.testing.assert_allclose(out[:, col].numpy(), [0.0, 0.25, 0.75, 1.0], atol=1e-6)


def _explicit_chain(sims_2x2, size, out_hw, antialias_last=True):
    a = torch.tensor(sims_2x2, dtype=torch.float32).reshape(1, 1, 2, 2)
    a = F.interpolate(a, (size, size), mode="bilinear", align_corners=False, antialias=False)
    a = (a - a.min()) / (a.max() - a.min())
    a = F.interpolate(a, out_hw, mode="bilinear", align_corners=False, antialias=antialias_last)
    a = (a - a.min()) / (a.max() - a.min())
    return a[0, 0]


@pytest.mark.parametrize("out_hw", [(5, 7), (37, 23), (16, 16)])
def test_heat_map_matches_documented_interpolation_chain(out_hw):
    sims = [0.3, -0.1, 0.05, 0.2]
    feats, text = _grid_features(sims)
    out = heat_map(feats, text, out_hw, size=16)
    assert tuple(out.shape) == out_hw
    assert float(out.min()) == pytest.approx(0.0, abs=1e-6)
    assert float(out.max()) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(out, _explicit_chain(sims, 16, out_hw), atol=1e-6, rtol=1e-5)


def test_heat_map_downscale_uses_antialias():
    # Shrinking 16 -> 5x7 the antialiased result differs from the plain one: the chain above
    # really pins antialias=True on the second resize.
    sims = [0.3, -0.1, 0.05, 0.2]
    feats, text = _grid_features(sims)
    out = heat_map(feats, text, (5, 7), size=16)
    plain = _explicit_chain(sims, 16, (5, 7), antialias_last=False)
    assert float((out - plain).abs().max()) > 1e-3


# ---------------------------------------------------------------------------------------------
# Final choice (6): final_i = (1 - alpha) T_i + alpha gem_i, alpha = 0.6; first maximum wins.


def test_final_choice_arithmetic_and_first_maximum():
    alpha = 0.6
    t = np.array([0.3, 0.4, 0.3])
    gem = np.array([0.5, 0.3, 0.5])
    final = (1 - alpha) * t + alpha * gem
    np.testing.assert_allclose(final, [0.4 * 0.3 + 0.6 * 0.5, 0.4 * 0.4 + 0.6 * 0.3, 0.4 * 0.3 + 0.6 * 0.5])
    np.testing.assert_allclose(final, [0.42, 0.34, 0.42])
    assert guidance.first_argmax(final) == 0  # tie between 0 and 2: candidate order decides


def test_final_choice_gem_decides_and_minus_inf_never_wins():
    alpha = 0.6
    t = np.array([0.2, 0.5, 0.3])
    gem = np.array([0.1, 0.0, -np.inf])
    final = (1 - alpha) * t + alpha * gem
    np.testing.assert_allclose(final[:2], [0.08 + 0.06, 0.2])
    assert final[2] == -np.inf
    assert guidance.first_argmax(final) == 1


def test_final_choice_from_relation_and_gem_scores():
    # T from the 'right' raw sums [0, 0.225, 0.05] (softmax), gem hand values for candidates
    # whose coherence favours candidate 0: final = 0.4 T + 0.6 gem.
    raw = guidance.relation_scores("right", CANDIDATES, REFERENCES, P, W, BOXES)
    t = guidance.softmax(raw)
    z = 1.0 + math.exp(0.225) + math.exp(0.05)
    gem = np.array([0.1, 0.0, 0.05])
    final = 0.4 * t + 0.6 * gem
    expected = [0.4 * 1 / z + 0.06, 0.4 * math.exp(0.225) / z + 0.0, 0.4 * math.exp(0.05) / z + 0.03]
    np.testing.assert_allclose(final, expected)
    # 0.4/z = 0.1211, 0.4*1.2523/z = 0.1516, 0.4*1.0513/z = 0.1273 -> finals 0.1811, 0.1516, 0.1573
    assert guidance.first_argmax(final) == 0
    # without the coherence term the relation alone prefers candidate 1 (right-most)
    assert guidance.first_argmax(t) == 1
