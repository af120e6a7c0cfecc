"""The image index: everything the method computes from an image alone, and its compact bytes.

The serialized form is an uncompressed .npz archive (no pickle: safe to read from a shared cache).
Each mask is cropped to the box of its pixels, and the crops are bit-packed together and
zlib-compressed; features are kept in the index's dtype (float16 by default). SAM's image embedding,
which only clicks need and which outweighs the rest at common photo sizes, is serialized apart
(``embedding_to_bytes``) so that a cache can keep it only where clicks are possible.
"""

from __future__ import annotations

import io
import json
import zlib
from dataclasses import dataclass, replace

import numpy as np
import torch
from segment_anything.utils.amg import batched_mask_to_box

FORMAT_VERSION = 2


@dataclass
class ImageIndex:
    key: str  # image content hash + fingerprint of every setting and weight that changes it
    image_size: tuple[int, int]  # (H, W)
    masks: torch.Tensor  # (N, H, W) bool, proposal order
    boxes: np.ndarray  # (N, 4) x, y, w, h as SAM's bbox
    features: torch.Tensor  # (N, D) hybrid region features, L2-normalized
    gem_features: torch.Tensor  # (G*G, D) GEM patch features, L2-normalized
    sam_embedding: torch.Tensor | None = None  # (256, 64, 64) for point-prompt refinement
    sam_input_size: tuple[int, int] | None = None
    feature_dtype: str = "float32"  # precision the features are kept and serialized in

    def __post_init__(self) -> None:
        self.pixel_area = self.masks.reshape(len(self.masks), -1).sum(1).numpy() if len(self.masks) else np.zeros(0)

    def __len__(self) -> int:
        return len(self.masks)

    def rounded(self, dtype: str) -> "ImageIndex":
        """Features rounded to the precision the index is stored in, so an index answers the same
        whether it was just built or read back from the cache."""
        td = getattr(torch, dtype)
        r = lambda t: None if t is None else t.to(td).float()  # noqa: E731
        return replace(self, features=r(self.features), gem_features=r(self.gem_features),
                       sam_embedding=r(self.sam_embedding), feature_dtype=dtype)

    @property
    def nbytes(self) -> int:
        """Memory this index holds (masks at one byte per pixel, as torch keeps bools)."""
        tensors = (self.masks, self.features, self.gem_features, self.sam_embedding)
        return (sum(t.numel() * t.element_size() for t in tensors if t is not None)
                + self.boxes.nbytes + self.pixel_area.nbytes)

    def without_embedding(self) -> "ImageIndex":
        return replace(self, sam_embedding=None, sam_input_size=None)

    def with_embedding(self, data: bytes) -> "ImageIndex":
        """This index with the SAM embedding that ``embedding_to_bytes`` of the same index wrote."""
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            header = json.loads(z["header"].tobytes())
            if header.get("version") != FORMAT_VERSION or header.get("key") != self.key:
                raise ValueError("this SAM embedding belongs to another index or format: rebuild it")
            embedding = torch.from_numpy(z["sam_embedding"].astype(np.float32))
        return replace(self, sam_embedding=embedding, sam_input_size=tuple(header["sam_input_size"]))

    # --- bytes -----------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """Everything but the SAM embedding (see ``embedding_to_bytes``)."""
        h, w = self.image_size
        header = {"version": FORMAT_VERSION, "key": self.key, "image_size": [h, w], "count": len(self.masks),
                  "feature_dtype": self.feature_dtype}
        td = getattr(torch, self.feature_dtype)
        crops, bits = _crop_masks(self.masks.numpy())
        arrays = {
            "header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
            "crops": crops,
            "masks": np.frombuffer(zlib.compress(np.packbits(bits).tobytes(), 6), dtype=np.uint8),
            "boxes": self.boxes.astype(np.float64),
            "features": self.features.to(td).numpy(),
            "gem_features": self.gem_features.to(td).numpy(),
        }
        return _npz(arrays)

    def embedding_to_bytes(self) -> bytes | None:
        """SAM's image embedding (for clicks) in the index's dtype; None when the index has none."""
        if self.sam_embedding is None or self.sam_input_size is None:
            return None
        header = {"version": FORMAT_VERSION, "key": self.key, "sam_input_size": list(self.sam_input_size)}
        return _npz({"header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
                     "sam_embedding": self.sam_embedding.to(getattr(torch, self.feature_dtype)).numpy()})

    @classmethod
    def from_bytes(cls, data: bytes) -> "ImageIndex":
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            header = json.loads(z["header"].tobytes())
            if header.get("version") != FORMAT_VERSION:
                raise ValueError(f"image index format {header.get('version')} is not {FORMAT_VERSION}: rebuild it")
            h, w = header["image_size"]
            crops = z["crops"]
            bits = np.unpackbits(np.frombuffer(zlib.decompress(z["masks"].tobytes()), dtype=np.uint8))
            masks = np.zeros((header["count"], h, w), dtype=bool)
            offset = 0
            for i, (y0, x0, y1, x1) in enumerate(crops.tolist()):
                n = (y1 - y0) * (x1 - x0)
                masks[i, y0:y1, x0:x1] = bits[offset:offset + n].reshape(y1 - y0, x1 - x0)
                offset += n
            return cls(
                key=header["key"], image_size=(h, w), masks=torch.from_numpy(masks), boxes=z["boxes"].copy(),
                features=torch.from_numpy(z["features"].astype(np.float32)),
                gem_features=torch.from_numpy(z["gem_features"].astype(np.float32)),
                feature_dtype=header["feature_dtype"],
            )


def _crop_masks(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(crops (N, 4) int32 y0, x0, y1, x1 exclusive, the crops' pixels concatenated): each mask reduced to the
    box of its pixels (an empty mask to nothing)."""
    crops = np.zeros((len(masks), 4), dtype=np.int32)
    parts = []
    for i, mask in enumerate(masks):
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if len(rows) == 0:
            continue
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        crops[i] = (y0, x0, y1, x1)
        parts.append(mask[y0:y1, x0:x1].ravel())
    return crops, (np.concatenate(parts) if parts else np.zeros(0, dtype=bool))


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def boxes_from_masks(masks: torch.Tensor) -> np.ndarray:
    """SAM's bbox for any masks: (x, y, w, h) over inclusive pixel indices."""
    if len(masks) == 0:
        return np.zeros((0, 4))
    b = batched_mask_to_box(masks).double().numpy()
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)
