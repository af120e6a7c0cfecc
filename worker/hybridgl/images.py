"""Decoding images into the uint8 RGB arrays the method works on, with errors that say what to do."""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

# Above this many pixels an image is refused before decoding (PIL's bomb check uses the same idea).
DEFAULT_MAX_PIXELS = 50_000_000


class ImageError(InputError):
    """The input is not an image this pipeline can use; the message says why and what to do."""


def load_image(source, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A path, bytes, PIL image or array -> contiguous uint8 RGB (H, W, 3), EXIF orientation applied."""
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source)
    if isinstance(source, Image.Image):
        return _pil_to_rgb(source, max_pixels)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"image file {path} does not exist")
        data = path.read_bytes()
        name = str(path)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = "the image data"
    else:
        raise ImageError(f"cannot read an image from a {type(source).__name__}")
    if not data:
        raise ImageError(f"{name} is empty (0 bytes): send a JPEG, PNG, WebP, BMP or TIFF file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_pixels(image.size, max_pixels, name)
            image.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name} declares too many pixels to decode safely (limit {max_pixels:,})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name} is not an image this server can decode: send a JPEG, PNG, WebP, BMP or TIFF file") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name} is damaged or truncated and cannot be decoded ({exc})") from None
    return _pil_to_rgb(image, max_pixels)


def _check_pixels(size: tuple[int, int], max_pixels: int, name: str) -> None:
    w, h = size
    if w * h > max_pixels:
        raise ImageError(f"{name} is {w}x{h} = {w * h:,} pixels, above the limit of {max_pixels:,}: downscale it")
    if w < 1 or h < 1:
        raise ImageError(f"{name} has no pixels ({w}x{h})")


def _pil_to_rgb(image: Image.Image, max_pixels: int) -> np.ndarray:
    image = ImageOps.exif_transpose(image)  # what the camera meant is what annotators see
    _check_pixels(image.size, max_pixels, "the image")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of letting PIL clip at 255.
        arr = np.asarray(image, dtype=np.float64)
        top = arr.max() if arr.size else 0
        arr = (arr * (255.0 / top)).round() if top > 255 else arr
        return _array_to_rgb(arr.clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels are composited on white, as a browser shows them.
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def _array_to_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ImageError(f"an image array must be HxW, HxWx3 or HxWx4, not {arr.shape}")
    if arr.dtype != np.uint8:
        raise ImageError(f"an image array must be uint8, not {arr.dtype}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageError(f"the image array has no pixels {arr.shape}")
    if arr.shape[2] == 4:  # on white, like a transparent file
        alpha = arr[:, :, 3:].astype(np.float32) / 255.0
        arr = (arr[:, :, :3] * alpha + 255.0 * (1 - alpha)).round().astype(np.uint8)
    return np.ascontiguousarray(arr[:, :, :3])


def image_hash(rgb: np.ndarray) -> str:
    """Content hash of decoded pixels: the same picture in another file format shares an index."""
    h = hashlib.sha256()
    h.update(str(rgb.shape).encode())
    h.update(np.ascontiguousarray(rgb).tobytes())
    return h.hexdigest()
