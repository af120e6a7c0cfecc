"""The pipeline end to end on real photos: real MobileSAM weights, random-weight CLIP loaded through
the production loading code (random weights check plumbing and arithmetic, not accuracy)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from worker.hybridgl.images import ImageError
from worker.hybridgl.image_index import ImageIndex
from worker.hybridgl.language import EmptyExpressionError
from worker.hybridgl.pipeline import HybridGL, NoRegionError

DATA = Path(__file__).parent / "data"
EXPRESSIONS = [
    "the dog on the left",
    "the bigger dog next to the fence",
    "grass",
    "man's hat under the table",
    "zebra on the right side of the image",
]


@pytest.fixture(scope="module")
def pipeline(tiny_settings) -> HybridGL:
    return HybridGL(tiny_settings)


@pytest.fixture(scope="module")
def dog_index(pipeline) -> ImageIndex:
    return pipeline.index(DATA / "dog.jpg")


@pytest.mark.parametrize("masks_per_upsample", [None, 3])
def test_proposals_are_sams_automatic_masks(pipeline, monkeypatch, masks_per_upsample):
    """Our mask generator gives segment-anything's masks, boxes and order exactly, also when it upsamples
    the masks a few at a time (as it does for big images, to bound memory)."""
    from segment_anything import SamAutomaticMaskGenerator

    from worker.hybridgl import proposals
    from worker.hybridgl.proposals import PRESETS

    rgb = np.asarray(Image.open(DATA / "groceries.jpg").convert("RGB"))
    if masks_per_upsample:
        monkeypatch.setattr(proposals, "UPSAMPLE_BYTES", 4 * rgb.shape[0] * rgb.shape[1] * masks_per_upsample)
    reference = SamAutomaticMaskGenerator(pipeline.models.sam, **PRESETS["refcoco"]).generate(rgb)
    ours = pipeline.proposer(rgb)
    assert len(reference) > 5
    assert np.array_equal(ours.masks.numpy(), np.stack([r["segmentation"] for r in reference]))
    assert np.array_equal(ours.boxes, np.array([r["bbox"] for r in reference], dtype=np.float64))


@pytest.fixture(scope="module")
def sam_decoder():
    """segment-anything's own prompt encoder and mask decoder, as its ``_build_sam`` builds them for every
    variant (ViT-H, -L and -B share them), with seeded random weights; the image encoder is not needed."""
    from types import SimpleNamespace

    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    torch.manual_seed(0)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
        depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8), transformer_dim=256, iou_head_depth=3,
        iou_head_hidden_dim=256).eval()
    with torch.no_grad():  # random IoUs straddle 0; lifted so that a positive threshold (a filter) splits them
        decoder.iou_prediction_head.layers[-1].bias += 0.5
    return SimpleNamespace(
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                                     mask_in_chans=16).eval(),
        mask_decoder=decoder)


@pytest.mark.parametrize("keeps", ["half", "all", "none"])
def test_decoder_is_sams_bit_for_bit(sam_decoder, keeps):
    """Our decoder over a batch of point prompts gives segment-anything's MaskDecoder logits and IoUs bit for
    bit, with segment-anything's own classes (the MobileSAM test above uses mobile_sam's copies). Random
    weights (a random image embedding too) predict IoUs near 0 and nearly whole-image masks, so the generator
    would keep a single mask: the decoder is compared directly instead, with an IoU threshold that keeps
    about half the masks (the median), all of them (0: no IoU filter, as in SAM's
    generator), or none (the highest IoU)."""
    from worker.hybridgl.proposals import decode_point_prompts

    sam = sam_decoder
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(1, 256, 64, 64, generator=generator)
    points = torch.rand(16, 2, generator=generator) * 1024
    labels = torch.ones(16, dtype=torch.int)
    with torch.inference_mode():
        sparse, dense = sam.prompt_encoder(points=(points[:, None], labels[:, None]), boxes=None, masks=None)
        low_res, iou_preds = sam.mask_decoder(image_embeddings=features, image_pe=sam.prompt_encoder.get_dense_pe(),
                                              sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                              multimask_output=True)
        threshold = {"half": float(iou_preds.median()), "all": 0.0, "none": float(iou_preds.max())}[keeps]
        ours, our_iou, kept = decode_point_prompts(sam, features, points, labels, threshold)
    expected = iou_preds > threshold if threshold > 0 else torch.ones_like(kept)
    if keeps == "half":
        assert 0 < int(expected.sum()) < expected.numel()
    assert torch.equal(our_iou, iou_preds)
    assert torch.equal(kept, expected)
    assert torch.equal(ours, low_res[expected])
    assert ours.shape[-2:] == (256, 256)


def test_index_then_query_equals_one_shot(pipeline, dog_index):
    for expression in EXPRESSIONS[:2]:
        one_shot = pipeline.segment(DATA / "dog.jpg", expression)
        indexed = pipeline.query(dog_index, expression)
        assert one_shot.explanation == indexed.explanation
        assert np.array_equal(one_shot.mask, indexed.mask)


def test_serialization_round_trip(pipeline, dog_index):
    data = dog_index.to_bytes()
    back = ImageIndex.from_bytes(data)
    assert back.key == dog_index.key and back.image_size == dog_index.image_size
    assert torch.equal(back.masks, dog_index.masks)  # cropped to their boxes and back, pixel for pixel
    assert np.array_equal(back.boxes, dog_index.boxes)
    assert torch.equal(back.features, dog_index.features)  # features are kept at fp16 precision
    assert torch.equal(back.gem_features, dog_index.gem_features)
    assert back.sam_embedding is None  # apart: only clicks need it
    for expression in EXPRESSIONS:
        assert pipeline.query(back, expression).explanation == pipeline.query(dog_index, expression).explanation
    with_embedding = back.with_embedding(dog_index.embedding_to_bytes())
    assert torch.equal(with_embedding.sam_embedding, dog_index.sam_embedding)
    assert with_embedding.sam_input_size == dog_index.sam_input_size
    # Compact: the masks' crops bit-packed and compressed take less than the whole frames bit-packed would.
    features = dog_index.features.numel() * 2 + dog_index.gem_features.numel() * 2
    assert len(data) < features + 10_000 + dog_index.masks.numel() / 8 / 4
    assert len(dog_index.embedding_to_bytes()) < dog_index.sam_embedding.numel() * 2 + 1_000


def test_masks_survive_any_shape(dog_index):
    """Empty masks, masks touching the borders and single pixels come back exactly."""
    h, w = dog_index.image_size
    masks = torch.zeros((4, h, w), dtype=torch.bool)
    masks[1, 0, w - 1] = True
    masks[2, :, :3] = True
    masks[3, h // 2:, w // 3: w // 2] = True
    masks[3, h - 1, 0] = True
    index = ImageIndex(key="k", image_size=(h, w), masks=masks, boxes=np.zeros((4, 4)),
                       features=dog_index.features[:4], gem_features=dog_index.gem_features, feature_dtype="float16")
    assert torch.equal(ImageIndex.from_bytes(index.to_bytes()).masks, masks)


def test_an_embedding_is_refused_by_another_index(dog_index):
    other = ImageIndex(key="another image", image_size=dog_index.image_size, masks=dog_index.masks[:1],
                       boxes=dog_index.boxes[:1], features=dog_index.features[:1], gem_features=dog_index.gem_features)
    with pytest.raises(ValueError, match="another index"):
        other.with_embedding(dog_index.embedding_to_bytes())


def test_corrupt_index_bytes_are_refused():
    with pytest.raises(Exception):
        ImageIndex.from_bytes(b"not an index")


def test_explanation_schema_and_arithmetic(pipeline, dog_index):
    s = pipeline.settings
    for expression in EXPRESSIONS:
        result = pipeline.query(dog_index, expression)
        e = json.loads(json.dumps(result.explanation))  # JSON-clean
        assert set(e) == {"expression", "text", "noun_phrase", "other_nouns", "relation", "direction",
                          "asks_for_set", "pure", "chosen", "masks"}
        assert len(e["masks"]) == len(dog_index)
        records = e["masks"]
        assert [r["index"] for r in records] == list(range(len(dog_index)))
        for r in records:
            assert set(r) == {"index", "box", "area", "s", "p", "q", "candidate", "reference", "T", "gem", "final"}
            assert r["area"] == r["box"][2] * r["box"][3]
            assert (r["q"] is None) == (not e["other_nouns"])
            assert (r["T"] is None) == (not r["candidate"]) == (r["final"] is None)
        s_values = np.array([r["s"] for r in records])
        assert e["pure"] == int(np.argmax(s_values))
        p = np.array([r["p"] for r in records])
        np.testing.assert_allclose(p, np.exp(s_values - s_values.max()) / np.exp(s_values - s_values.max()).sum(),
                                   rtol=1e-6)
        candidates = [r for r in records if r["candidate"]]
        assert len(candidates) == min(s.k1, len(dog_index))
        # candidates are the top-k1 by p
        assert sorted(r["p"] for r in candidates) == sorted(p)[-len(candidates):]
        assert abs(sum(r["T"] for r in candidates) - 1) < 1e-9
        for r in candidates:
            assert r["final"] == pytest.approx((1 - s.alpha) * r["T"] + s.alpha * r["gem"])
        best = max(candidates, key=lambda r: r["final"])
        assert e["chosen"] == best["index"] == result.chosen
        assert np.array_equal(result.mask, dog_index.masks[result.chosen].numpy())
        assert result.score == pytest.approx(p[result.chosen])


def test_guidance_switches(tiny_settings, pipeline, dog_index):
    expression = "the bigger dog next to the fence"
    off = HybridGL(tiny_settings.replace(relation_guidance=False, coherence=False), pipeline.models)
    r = off.query(dog_index, expression)
    assert r.chosen == r.pure
    gem_only = HybridGL(tiny_settings.replace(relation_guidance=False), pipeline.models).query(dog_index, expression)
    cands = [m for m in gem_only.explanation["masks"] if m["candidate"]]
    assert gem_only.chosen == max(cands, key=lambda m: m["gem"])["index"]
    t_only = HybridGL(tiny_settings.replace(coherence=False), pipeline.models).query(dog_index, expression)
    cands = [m for m in t_only.explanation["masks"] if m["candidate"]]
    assert t_only.chosen == max(cands, key=lambda m: m["T"])["index"]


def test_sticky_k_reproduces_the_release(tiny_settings, pipeline, dog_index):
    h, w = dog_index.image_size
    two = np.zeros((2, h, w), dtype=bool)
    two[0, :, : w // 2] = True
    two[1, :, w // 2:] = True
    small = pipeline.index(DATA / "dog.jpg", proposals=two)
    for sticky, expected in ((True, 2), (False, 3)):
        p = HybridGL(tiny_settings.replace(sticky_k=sticky), pipeline.models)
        p.query(small, "the dog")
        after = p.query(dog_index, "the dog")
        assert sum(m["candidate"] for m in after.explanation["masks"]) == expected


def test_settings_change_the_index_key(tiny_settings, pipeline, dog_index):
    digest = dog_index.key.split(":")[0]
    for change in ({"masking_block": 3}, {"fusion_weight": 1.0}, {"sam_preset": "phrasecut"},
                   {"normalization": "clip"}, {"gem_size": 224}, {"index_dtype": "float32"}):
        other = HybridGL(tiny_settings.replace(**change), pipeline.models)
        assert other.index_key(digest) != dog_index.key, change
        assert other.model_version != pipeline.model_version, change
    for change in ({"alpha": 0.5}, {"right_fires": False}, {"k1": 2}):
        other = HybridGL(tiny_settings.replace(**change), pipeline.models)
        assert other.index_key(digest) == dog_index.key, change  # query-side only
        assert other.model_version != pipeline.model_version, change
    for change in ({"device": "cpu", "sam_points_per_batch": 16},):
        other = HybridGL(tiny_settings.replace(**change), pipeline.models)
        assert other.model_version == pipeline.model_version
    # another image, another key
    assert pipeline.index(DATA / "groceries.jpg").key.split(":")[0] != digest


def test_user_proposals_replace_sam(pipeline):
    rgb = np.asarray(Image.open(DATA / "dog.jpg").convert("RGB"))
    h, w = rgb.shape[:2]
    masks = np.zeros((3, h, w), dtype=bool)
    masks[0, 10:20, 30:60] = True
    masks[1, 100:, :] = True
    masks[2, :50, w - 80:] = True
    index = pipeline.index(rgb, proposals=masks)
    assert torch.equal(index.masks, torch.from_numpy(masks))
    np.testing.assert_array_equal(index.boxes[0], [30, 10, 29, 9])  # inclusive indices, as SAM's bbox
    result = pipeline.query(index, "the sky")
    assert result.chosen in (0, 1, 2)
    with pytest.raises(ImageError, match="proposals"):
        pipeline.index(rgb, proposals=masks[:, :-1])


def test_bad_inputs_give_clear_errors(pipeline, dog_index, tmp_path):
    text_file = tmp_path / "notes.jpg"
    text_file.write_text("this is not an image")
    with pytest.raises(ImageError, match="not an image"):
        pipeline.index(text_file)
    with pytest.raises(EmptyExpressionError):
        pipeline.query(dog_index, "   ")
    empty = pipeline.index(DATA / "dog.jpg", proposals=np.zeros((0, *dog_index.image_size), dtype=bool))
    with pytest.raises(NoRegionError, match="no region found"):
        pipeline.query(empty, "the dog")


def test_real_vit_b16_architecture(vitb_settings):
    """At least one test runs the real ViT-B/16 architecture, loaded from an OpenAI-format file."""
    p = HybridGL(vitb_settings)
    assert len(p.models.clip.visual.transformer.resblocks) == 12
    index = p.index(DATA / "dog.jpg")
    assert index.features.shape == (len(index), 512) and index.gem_features.shape == (784, 512)
    torch.testing.assert_close(index.features.norm(dim=-1), torch.ones(len(index)), atol=2e-3, rtol=0)
    result = p.query(index, "the dog on the left")
    assert result.explanation["direction"] == "left"
    assert 0 <= result.chosen < len(index)


def test_segment_command(tiny_settings, tmp_path):
    """``hybridgl segment`` as a user runs it, settings from the environment."""
    env = {
        "PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path),
        "HYBRIDGL_SAM_MODEL": "vit_t", "HYBRIDGL_SAM_CHECKPOINT": tiny_settings.sam_checkpoint,
        "HYBRIDGL_CLIP_MODEL": tiny_settings.clip_model, "HYBRIDGL_CLIP_CHECKPOINT": tiny_settings.clip_checkpoint,
        "HYBRIDGL_WEIGHTS_DIR": tiny_settings.weights_dir, "HYBRIDGL_DEVICE": "cpu",
    }
    h, w = 534, 800
    proposals = np.zeros((2, h, w), dtype=bool)
    proposals[0, :, :400] = True
    proposals[1, 300:, :] = True
    np.savez(tmp_path / "props.npz", masks=proposals)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "worker.cli", "segment", str(DATA / "dog.jpg"), "the dog on the left", "grass",
           "--out", str(out), "--proposals", str(tmp_path / "props.npz"), "--masking-block", "4", "--gem-blocks", "3"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    masks = sorted(out.glob("*.mask.png"))
    assert len(masks) == 2 and len(list(out.glob("*.overlay.png"))) == 2
    for path in masks:
        m = np.asarray(Image.open(path))
        assert m.shape == (h, w) and set(np.unique(m)) <= {0, 255}
        explanation = json.loads(Path(str(path).replace(".mask.png", ".json")).read_text())
        assert np.array_equal(m == 255, proposals[explanation["chosen"]])
    # A bad expression: exit code 2 and a message, no traceback.
    done = subprocess.run(cmd[:5] + ["  "] + cmd[7:], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "empty" in done.stderr and "Traceback" not in done.stderr
