"""Draw a scene as an RGB picture: shapes on a noisy grey background.

Shapes are drawn at `SUPERSAMPLE`x resolution with Pillow and box-filtered down, which gives
anti-aliased edges without any dependency beyond Pillow. Colour, size and position follow the
rules in `rules.py`; background shade, tint, noise, jitter and rotation are nuisance factors
drawn from the scene's own generator.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from mmembed.data.synth.rules import (
    BACKGROUND_GREY,
    BACKGROUND_TINT,
    COLOUR_JITTER,
    MAX_ROTATION_DEG,
    PALETTE_RGB,
    PIXEL_NOISE_STD,
    RADIUS_FRACTION,
    SUPERSAMPLE,
    X_FRACTION,
    X_JITTER_FRACTION,
    Y_JITTER_FRACTION,
)
from mmembed.data.synth.world import SceneObject


def _regular(n: int, radius: float, phase: float = -math.pi / 2) -> list[tuple[float, float]]:
    angles = [phase + 2 * math.pi * k / n for k in range(n)]
    return [(radius * math.cos(a), radius * math.sin(a)) for a in angles]


def _turn(point: tuple[float, float], quarters: int) -> tuple[float, float]:
    x, y = point
    for _ in range(quarters):
        x, y = -y, x
    return (x, y)


@lru_cache(maxsize=None)
def outline(shape: str) -> tuple[tuple[float, float], ...]:
    """Polygon of a shape with circumradius about 1 (y down), centred on its visual centre.

    Sizes are chosen so the shapes look about equally large at the same radius.
    """
    if shape == "circle":
        return tuple(_regular(48, 0.85))
    if shape == "square":  # corners reach 1.1: at 6 px a smaller square reads as a blob, like a circle
        return tuple(_regular(4, 0.78 * math.sqrt(2), phase=-math.pi / 4))
    if shape == "triangle":  # equilateral, point up; centroid at the origin
        return tuple(_regular(3, 1.0))
    if shape == "star":  # five points, inner radius 0.45
        outer, inner = _regular(5, 1.0), _regular(5, 0.45, phase=-math.pi / 2 + math.pi / 5)
        return tuple(p for pair in zip(outer, inner) for p in pair)
    if shape == "cross":  # a plus sign with arms 0.3 wide
        a, w = 0.95, 0.3
        quarter = ((-w, -a), (w, -a), (w, -w))  # top arm; the others are this turned by 90 degrees
        return tuple(p for k in range(4) for p in (_turn(q, k) for q in quarter))
    if shape == "diamond":  # a rhombus taller than wide, so it never reads as a turned square
        return ((0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0))
    raise KeyError(f"unknown shape {shape!r}")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A grey level with a slight tint and a gentle linear gradient: (H, W, 3) float."""
    grey = rng.uniform(*BACKGROUND_GREY)
    tint = rng.uniform(-BACKGROUND_TINT, BACKGROUND_TINT, size=3)
    slope = rng.uniform(-8.0, 8.0, size=2)  # grey levels across the frame, in x and y
    ramp = np.linspace(-0.5, 0.5, size)
    gradient = slope[0] * ramp[None, :] + slope[1] * ramp[:, None]  # (H, W)
    return grey + tint[None, None, :] + gradient[:, :, None]


def _object_layer(
    objects: tuple[SceneObject, ...], rng: np.random.Generator, size: int
) -> tuple[Image.Image, Image.Image]:
    """Supersampled colour layer and coverage mask of all objects, box-filtered to `size`."""
    big = size * SUPERSAMPLE
    colour = Image.new("RGB", (big, big))
    mask = Image.new("L", (big, big), 0)
    draw_c, draw_m = ImageDraw.Draw(colour), ImageDraw.Draw(mask)
    for obj in objects:
        radius = RADIUS_FRACTION[obj.size] * big
        cx = (X_FRACTION[obj.position] + rng.uniform(-X_JITTER_FRACTION, X_JITTER_FRACTION)) * big
        cy = (0.5 + rng.uniform(-Y_JITTER_FRACTION, Y_JITTER_FRACTION)) * big
        angle = math.radians(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
        cos, sin = math.cos(angle), math.sin(angle)
        points = [(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos)) for x, y in outline(obj.shape)]
        jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
        rgb = np.clip(np.array(PALETTE_RGB[obj.colour]) + jitter, 0, 255)
        draw_c.polygon(points, fill=tuple(int(v) for v in rgb))
        draw_m.polygon(points, fill=255)
    return colour.resize((size, size), Image.Resampling.BOX), mask.resize((size, size), Image.Resampling.BOX)


def render_image(objects: tuple[SceneObject, ...], rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """Render a scene.

    Args:
        objects: the scene's objects (at most one per position slot).
        rng: the scene's image generator; same generator state -> same pixels.
        size: output width and height in pixels.

    Returns:
        (size, size, 3) uint8 RGB array.
    """
    background = _background(rng, size)  # (H, W, 3) float
    colour, mask = _object_layer(objects, rng, size)
    # The colour layer is black outside the shapes; box-filtering darkened the edges by the
    # same coverage that `mask` holds, so dividing restores the fill colour before blending.
    alpha = np.asarray(mask, dtype=np.float64)[:, :, None] / 255.0  # (H, W, 1)
    fill = np.minimum(np.asarray(colour, dtype=np.float64) / np.maximum(alpha, 1e-6), 255.0)
    picture = alpha * fill + (1.0 - alpha) * background
    picture += rng.normal(0.0, rng.uniform(*PIXEL_NOISE_STD), size=picture.shape)
    return np.clip(np.rint(picture), 0, 255).astype(np.uint8)


def save_png(pixels: np.ndarray, path: str) -> None:
    """Write a PNG with no metadata chunks: identical pixels give identical bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=False, compress_level=6)
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())
