"""Tests for worker.hybridgl.images: decoding every common input into uint8 RGB (H, W, 3).

All inputs are generated here with PIL/numpy (tmp_path), except the truncated JPEG, which cuts a
real photo from tests/data.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from worker.hybridgl.images import ImageError, image_hash, load_image

DATA = Path(__file__).resolve().parent / "data"


def _save(tmp_path: Path, image: Image.Image, name: str, **kwargs) -> Path:
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def _assert_rgb(arr: np.ndarray, h: int, w: int) -> None:
    assert isinstance(arr, np.ndarray)
    assert arr.dtype == np.uint8
    assert arr.shape == (h, w, 3)
    assert arr.flags["C_CONTIGUOUS"]


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height RGB pixels, followed by a tiny IDAT and IEND."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


# ---------------------------------------------------------------------------------------------
# Ordinary files


def test_png_rgb_decodes_exactly(tmp_path):
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3) * 3
    path = _save(tmp_path, Image.fromarray(rgb, "RGB"), "a.png")
    out = load_image(path)
    _assert_rgb(out, 4, 5)
    assert np.array_equal(out, rgb)
    # str path and bytes give the same
    assert np.array_equal(load_image(str(path)), rgb)
    assert np.array_equal(load_image(path.read_bytes()), rgb)


def test_jpeg_rgb_decodes(tmp_path):
    path = _save(tmp_path, Image.new("RGB", (24, 16), (200, 100, 50)), "a.jpg", quality=95)
    out = load_image(path)
    _assert_rgb(out, 16, 24)
    assert np.abs(out.astype(int) - [200, 100, 50]).max() <= 3


def test_real_jpeg_shape():
    out = load_image(DATA / "dog.jpg")
    w, h = Image.open(DATA / "dog.jpg").size
    _assert_rgb(out, h, w)


def test_grayscale_l_repeats_to_three_channels(tmp_path):
    gray = np.array([[0, 77], [200, 255]], dtype=np.uint8)
    out = load_image(_save(tmp_path, Image.fromarray(gray, "L"), "g.png"))
    _assert_rgb(out, 2, 2)
    for c in range(3):
        assert np.array_equal(out[:, :, c], gray)


def test_cmyk_jpeg_converts_to_rgb(tmp_path):
    image = Image.new("CMYK", (16, 16), (255, 0, 0, 0))   # pure cyan
    image.paste((0, 0, 0, 255), (8, 0, 16, 16))            # right half pure black
    out = load_image(_save(tmp_path, image, "c.jpg", quality=95))
    _assert_rgb(out, 16, 16)
    assert np.abs(out[8, 2].astype(int) - [0, 255, 255]).max() <= 8
    assert np.abs(out[8, 13].astype(int) - [0, 0, 0]).max() <= 8


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 1000], [30000, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    path = _save(tmp_path, image, "i16.png")
    assert Image.open(path).mode.startswith("I")
    out = load_image(path)
    _assert_rgb(out, 2, 2)
    assert out.max() == 255 and out[1, 1, 0] == 255
    assert out[0, 0, 0] == 0
    # proportional: 30000 * 255 / 65535 = 116.73 -> 117 (clipping would give 255); 1000 -> 3.89 -> 4
    assert out[1, 0].tolist() == [117, 117, 117]
    assert out[0, 1].tolist() == [4, 4, 4]


def test_palette_without_transparency(tmp_path):
    image = Image.new("P", (3, 1))
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (253 * 3))
    image.putdata([0, 1, 2])
    out = load_image(_save(tmp_path, image, "p.png"))
    _assert_rgb(out, 1, 3)
    assert out[0].tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 255]]


def test_palette_with_transparency_goes_on_white(tmp_path):
    image = Image.new("P", (3, 1))
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (253 * 3))
    image.putdata([0, 1, 2])
    path = _save(tmp_path, image, "pt.png", transparency=1)
    assert "transparency" in Image.open(path).info
    out = load_image(path)
    _assert_rgb(out, 1, 3)
    assert out[0].tolist() == [[255, 0, 0], [255, 255, 255], [0, 0, 255]]


def test_rgba_transparent_pixels_on_white(tmp_path):
    rgba = np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    out = load_image(_save(tmp_path, Image.fromarray(rgba, "RGBA"), "rgba.png"))
    _assert_rgb(out, 1, 3)
    assert out[0, 0].tolist() == [255, 255, 255]          # fully transparent: white, not (10, 20, 30)
    assert out[0, 1].tolist() == [10, 20, 30]             # opaque: unchanged
    # half transparent black over white: 255 * (1 - 128/255) = 127
    assert np.abs(out[0, 2].astype(int) - 127).max() <= 1


def test_la_transparent_pixels_on_white(tmp_path):
    la = np.array([[[40, 0], [40, 255]]], dtype=np.uint8)
    out = load_image(_save(tmp_path, Image.fromarray(la, "LA"), "la.png"))
    _assert_rgb(out, 1, 2)
    assert out[0].tolist() == [[255, 255, 255], [40, 40, 40]]


def _marked_jpeg(tmp_path: Path, orientation: int) -> Path:
    # 40 wide x 20 high, blue, with a red 8x8 block at the top-left corner.
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(tmp_path, image, f"o{orientation}.jpg", quality=95, exif=exif)


def _is_red(pixel) -> bool:
    r, g, b = (int(v) for v in pixel)
    return r > 200 and g < 60 and b < 60


def _is_blue(pixel) -> bool:
    r, g, b = (int(v) for v in pixel)
    return b > 200 and r < 60 and g < 60


def test_exif_orientation_6_rotates_clockwise(tmp_path):
    path = _marked_jpeg(tmp_path, 6)
    assert Image.open(path).size == (40, 20)          # stored as landscape
    out = load_image(path)
    _assert_rgb(out, 40, 20)                           # shown as portrait: H and W swapped
    # 90 degrees clockwise: the top-left corner moves to the top-right
    assert _is_red(out[3, 16])
    assert _is_blue(out[3, 3])
    assert _is_blue(out[36, 3])


def test_exif_orientation_8_rotates_counterclockwise(tmp_path):
    path = _marked_jpeg(tmp_path, 8)
    out = load_image(path)
    _assert_rgb(out, 40, 20)
    # 90 degrees counter-clockwise: the top-left corner moves to the bottom-left
    assert _is_red(out[36, 3])
    assert _is_blue(out[3, 3])
    assert _is_blue(out[3, 16])


def test_one_pixel_image(tmp_path):
    out = load_image(_save(tmp_path, Image.new("RGB", (1, 1), (9, 8, 7)), "one.png"))
    _assert_rgb(out, 1, 1)
    assert out[0, 0].tolist() == [9, 8, 7]


def test_pil_image_input():
    image = Image.new("L", (3, 2), 50)
    out = load_image(image)
    _assert_rgb(out, 2, 3)
    assert (out == 50).all()


# ---------------------------------------------------------------------------------------------
# Errors


def test_image_error_is_value_error():
    assert issubclass(ImageError, ValueError)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(path)
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")


def test_non_image_bytes(tmp_path):
    with pytest.raises(ImageError, match="not an image"):
        load_image(b"hello")
    path = tmp_path / "hello.png"
    path.write_bytes(b"hello")
    with pytest.raises(ImageError, match="not an image") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_truncated_jpeg(tmp_path):
    data = (DATA / "dog.jpg").read_bytes()
    half = data[: len(data) // 2]
    with pytest.raises(ImageError, match="truncated"):
        load_image(half)
    path = tmp_path / "half.jpg"
    path.write_bytes(half)
    with pytest.raises(ImageError):
        load_image(path)


def test_max_pixels_on_a_real_image(tmp_path):
    path = _save(tmp_path, Image.new("RGB", (100, 100), (1, 2, 3)), "big.png")
    with pytest.raises(ImageError) as info:
        load_image(path, max_pixels=1000)
    message = str(info.value).lower()
    assert "pixels" in message and "limit" in message and "1,000" in message
    # an intact file over the limit is not "damaged or truncated"
    assert "damaged" not in message and "truncated" not in message
    # the same file under a limit it fits loads
    _assert_rgb(load_image(path, max_pixels=10_000), 100, 100)
    # a PIL image is held to the limit as well
    with pytest.raises(ImageError, match="limit"):
        load_image(Image.new("RGB", (100, 100)), max_pixels=1000)


@pytest.mark.parametrize("width, height", [(30000, 30000), (12000, 10000), (8000, 7000)])
def test_crafted_png_header_declaring_huge_size(width, height):
    # 900 M (PIL's bomb error), 120 M (PIL's bomb warning) and 56 M (only our 50 M limit) pixels:
    # all refused from the header, before any decoding.
    data = _png_declaring(width, height)
    assert len(data) < 200
    with pytest.raises(ImageError) as info:
        load_image(data)
    message = str(info.value).lower()
    assert "pixels" in message and "limit" in message
    assert "damaged" not in message and "truncated" not in message


def test_missing_path(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="does not exist"):
        load_image(str(tmp_path / "nope.png"))
    with pytest.raises(ImageError):
        load_image(tmp_path)   # a directory is not an image file


def test_unsupported_source_type():
    with pytest.raises(ImageError):
        load_image(12345)


# ---------------------------------------------------------------------------------------------
# numpy arrays


def test_array_hw_uint8_repeats():
    gray = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.uint8)
    out = load_image(gray)
    _assert_rgb(out, 2, 3)
    for c in range(3):
        assert np.array_equal(out[:, :, c], gray)


def test_array_hwc3_passes_through_contiguous():
    rgb = np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2, 4, 3)
    flipped = rgb[:, ::-1]                 # a non-contiguous view
    out = load_image(flipped)
    _assert_rgb(out, 2, 4)
    assert np.array_equal(out, flipped)


def test_array_hwc4_keeps_rgb_channels():
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 20, 30, 255
    out = load_image(rgba)
    _assert_rgb(out, 2, 3)
    assert (out == np.array([10, 20, 30], dtype=np.uint8)).all()


@pytest.mark.parametrize("array", [
    np.zeros((4, 4, 3), dtype=np.float32),
    np.zeros((4, 4), dtype=np.uint16),
    np.zeros((4, 4, 3), dtype=np.int64),
])
def test_array_wrong_dtype(array):
    with pytest.raises(ImageError, match="uint8"):
        load_image(array)


@pytest.mark.parametrize("shape", [(4, 4, 2), (4, 4, 5), (4,), (2, 4, 4, 3)])
def test_array_wrong_shape(shape):
    with pytest.raises(ImageError, match="HxW"):
        load_image(np.zeros(shape, dtype=np.uint8))


def test_array_without_pixels():
    with pytest.raises(ImageError):
        load_image(np.zeros((0, 5, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------
# image_hash


def test_image_hash_same_pixels_same_hash(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    from_png = load_image(_save(tmp_path, Image.fromarray(rgb, "RGB"), "h.png"))
    from_bmp = load_image(_save(tmp_path, Image.fromarray(rgb, "RGB"), "h.bmp"))
    from_array = load_image(rgb)
    h = image_hash(from_png)
    assert isinstance(h, str) and len(h) == 64
    assert h == image_hash(from_array) == image_hash(from_bmp) == image_hash(rgb)
    # a non-contiguous view with the same pixels hashes the same
    assert image_hash(np.ascontiguousarray(rgb[:, ::-1])[:, ::-1]) == h


def test_image_hash_changes_with_one_pixel_and_with_shape():
    rgb = np.random.default_rng(1).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    h = image_hash(rgb)
    changed = rgb.copy()
    changed[5, 6, 2] ^= 1
    assert image_hash(changed) != h
    # same bytes in another shape is another picture
    assert image_hash(rgb.reshape(7, 6, 3)) != h
