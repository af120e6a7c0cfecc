"""The image index: everything the method computes from an image alone, and its compact bytes.

The serialized form is an uncompressed .npz archive (no pickle: safe to read from a shared cache)
whose masks are bit-packed and zlib-compressed and whose features are float16.
"""

from __future__ import annotations

import io
import json
import zlib
from dataclasses import dataclass, replace

import numpy as np
import torch
from segment_anything.utils.amg import batched_mask_to_box

FORMAT_VERSION = 1


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

    # --- bytes -----------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        h, w = self.image_size
        header = {"version": FORMAT_VERSION, "key": self.key, "image_size": [h, w], "count": len(self.masks),
                  "sam_input_size": list(self.sam_input_size) if self.sam_input_size else None,
                  "feature_dtype": self.feature_dtype}
        td = getattr(torch, self.feature_dtype)
        packed = np.packbits(self.masks.numpy().reshape(len(self.masks), -1), axis=1)
        arrays = {
            "header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
            "masks": np.frombuffer(zlib.compress(packed.tobytes(), 6), dtype=np.uint8),
            "boxes": self.boxes.astype(np.float64),
            "features": self.features.to(td).numpy(),
            "gem_features": self.gem_features.to(td).numpy(),
        }
        if self.sam_embedding is not None:
            arrays["sam_embedding"] = self.sam_embedding.to(td).numpy()
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "ImageIndex":
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            header = json.loads(z["header"].tobytes())
            if header.get("version") != FORMAT_VERSION:
                raise ValueError(f"image index format {header.get('version')} is not {FORMAT_VERSION}: rebuild it")
            h, w = header["image_size"]
            n = header["count"]
            packed = np.frombuffer(zlib.decompress(z["masks"].tobytes()), dtype=np.uint8).reshape(n, -1)
            masks = np.unpackbits(packed, axis=1, count=h * w).reshape(n, h, w).astype(bool)
            emb = torch.from_numpy(z["sam_embedding"].astype(np.float32)) if "sam_embedding" in z else None
            return cls(
                key=header["key"], image_size=(h, w), masks=torch.from_numpy(masks), boxes=z["boxes"].copy(),
                features=torch.from_numpy(z["features"].astype(np.float32)),
                gem_features=torch.from_numpy(z["gem_features"].astype(np.float32)),
                sam_embedding=emb,
                sam_input_size=tuple(header["sam_input_size"]) if header["sam_input_size"] else None,
                feature_dtype=header["feature_dtype"],
            )


def boxes_from_masks(masks: torch.Tensor) -> np.ndarray:
    """SAM's bbox for any masks: (x, y, w, h) over inclusive pixel indices."""
    if len(masks) == 0:
        return np.zeros((0, 4))
    b = batched_mask_to_box(masks).double().numpy()
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)
