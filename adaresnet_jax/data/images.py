"""Decoding and ImageNet-style crops of encoded images on the host (Pillow), for the streaming input path.

* ``train_image(data, size, rng)``: Inception-style random-resized crop (Szegedy et al. 2015; torchvision's
  ``RandomResizedCrop``: area a uniform fraction of ``min_area``..1 of the image, aspect ratio
  log-uniform in 3/4..4/3, ten tries then the central crop) resized to ``size`` x ``size``, and a random
  horizontal flip.
* ``eval_image(data, size, crop)``: the central square of side ``crop`` x the short side, resized to
  ``size`` x ``size``: the same pixels as "resize the short side to size / crop (256 for 224), then
  center-crop size" in one resampling.

Both return uint8 (size, size, 3) RGB arrays (grayscale, palette and CMYK images are converted), or
None for bytes that do not decode (empty, truncated, not an image): the caller counts and skips those.
JPEGs are decoded at a reduced DCT scale (Pillow's ``draft``: libjpeg's 1/2, 1/4, 1/8) whenever the crop
stays at least ``size`` pixels on each side, which makes large photos several times cheaper to decode.
Resampling is bilinear with antialiasing (Pillow's ``resize`` with a box), as torchvision does on PIL
images. Everything depends only on the bytes, ``size`` and ``rng``: no global state, so any worker
process gives the same pixels.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

RATIO = (3 / 4, 4 / 3)


def crop_box(rng: np.random.Generator, width: int, height: int, min_area: float = 0.08,
             ratio: tuple[float, float] = RATIO) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a random-resized crop (torchvision's algorithm, drawn from ``rng``)."""
    area, log_ratio = width * height, (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(min_area, 1.0)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height  # fall back to the central crop with the ratio clipped into range
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _render(data: bytes, size: int, box_fn) -> np.ndarray | None:  # noqa: ANN001
    """Decodes ``data``, crops ``box_fn(width, height)`` and resizes it to size x size; None if unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            left, top, w, h = box_fn(width, height)
            scale = min(w, h) / size
            if im.format == "JPEG" and scale >= 2:  # decode at 1/2, 1/4 or 1/8 scale where that keeps `size`
                im.draft("RGB", (math.ceil(width / scale), math.ceil(height / scale)))
            sx, sy = im.size[0] / width, im.size[1] / height
            rgb = im.convert("RGB")
            out = rgb.resize((size, size), Image.Resampling.BILINEAR,
                             box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
            return np.asarray(out, dtype=np.uint8)
    except Exception:  # noqa: BLE001 (Pillow raises OSError, SyntaxError, ValueError, ... for bad files)
        return None


def train_image(data: bytes, size: int, rng: np.random.Generator, *, min_area: float = 0.08,
                flip: bool = True) -> np.ndarray | None:
    """Random-resized crop to size x size and a random horizontal flip (see the module docstring)."""
    out = _render(data, size, lambda w, h: crop_box(rng, w, h, min_area))
    if out is not None and flip and rng.random() < 0.5:
        out = np.ascontiguousarray(out[:, ::-1])
    return out


def eval_image(data: bytes, size: int, crop: float = 0.875) -> np.ndarray | None:
    """The central square of side ``crop`` x the short side, resized to size x size."""
    def box(w: int, h: int) -> tuple[int, int, int, int]:
        side = max(1, round(min(w, h) * crop))
        return (w - side) // 2, (h - side) // 2, side, side
    return _render(data, size, box)
