"""Augmentation as the seed paper used it (rotation, zoom, horizontal and vertical flips).

Two uses, both on the training split only: the deterministic extra copies that balance the
classes when a run is prepared, and (``--online-augment``) fresh perturbations of every
training batch while fitting. Validation and test images are never augmented.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class AugmentOptions:
    """Ranges of the random changes (rotation in degrees, zoom as a relative factor)."""

    rotation_degrees: float = 10.0
    zoom: float = 0.1
    horizontal_flip: bool = True
    vertical_flip: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.rotation_degrees <= 180:
            raise ValueError(f"rotation_degrees must be in 0..180, got {self.rotation_degrees}")
        if not 0 <= self.zoom < 1:
            raise ValueError(f"zoom must be in [0, 1), got {self.zoom}")


def augment_image(
    image: np.ndarray, rng: np.random.Generator, options: AugmentOptions
) -> np.ndarray:
    """A randomly rotated, zoomed and flipped copy of a 2-D uint8 image (same shape).

    Areas moved in from outside the image are filled with 0, which is air in a lung window.
    """
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 image, got {image.dtype} {image.shape}")
    rows, columns = image.shape
    picture = Image.fromarray(image)
    angle = rng.uniform(-options.rotation_degrees, options.rotation_degrees)
    picture = picture.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=0)
    factor = 1.0 + rng.uniform(-options.zoom, options.zoom)
    picture = _zoom(picture, factor)
    out = np.asarray(picture, dtype=np.uint8)
    if options.horizontal_flip and rng.random() < 0.5:
        out = out[:, ::-1]
    if options.vertical_flip and rng.random() < 0.5:
        out = out[::-1, :]
    assert out.shape == (rows, columns)
    return np.ascontiguousarray(out)


def _zoom(picture: Image.Image, factor: float) -> Image.Image:
    """Zoom about the centre by ``factor`` (> 1 enlarges), keeping the size."""
    width, height = picture.size
    crop_w, crop_h = width / factor, height / factor
    left, top = (width - crop_w) / 2, (height - crop_h) / 2
    box = (left, top, left + crop_w, top + crop_h)
    # Image.transform samples the box (which may reach outside the image when zooming out)
    # onto the full output size; outside pixels get the fill colour.
    return picture.transform(
        (width, height),
        Image.Transform.EXTENT,
        box,
        resample=Image.Resampling.BILINEAR,
        fillcolor=0,
    )
