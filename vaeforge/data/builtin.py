"""Built-in procedural dataset: seeded coloured shapes on gradients, so vaeforge runs without a download."""

from __future__ import annotations

import functools
import hashlib
import math
import time

import numpy as np
from PIL import Image, ImageDraw

from vaeforge.data.base import Loaded, LoadOptions, Source
from vaeforge.data.files import DataError
from vaeforge.data.pool import ordered_map

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")  # index = label
VARIANTS = ("shapes",)  # names accepted after "builtin:"
CHUNK_IMAGES = 256  # images per pool task; each image has its own seed, so chunking never changes output


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(size, size, 3) float32 gradient between two random colours, plus the mean colour."""
    c0, c1 = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    direction = rng.integers(3)
    if direction == 0:  # vertical
        t = np.broadcast_to(ramp[:, None], (size, size))
    elif direction == 1:  # horizontal
        t = np.broadcast_to(ramp[None, :], (size, size))
    else:  # diagonal
        t = (ramp[:, None] + ramp[None, :]) * 0.5
    bg = c0 + (c1 - c0) * t[:, :, None]  # (size, size, 3)
    return bg, (c0 + c1) * 0.5


def _shape_colour(rng: np.random.Generator, background: np.ndarray) -> tuple[int, int, int]:
    """A random colour far enough from the background that the shape is always visible."""
    colour = rng.uniform(0, 255, size=3)
    for _ in range(8):
        if np.linalg.norm(colour - background) > 120:
            break
        colour = rng.uniform(0, 255, size=3)
    else:
        colour = 255.0 - background  # complementary colour: guaranteed contrast
    r, g, b = (int(v) for v in colour)
    return r, g, b


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of circumradius r, rotated by angle around (cx, cy)."""
    if kind == "square":
        local = [(math.cos(a), math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
    elif kind == "triangle":
        local = [(math.cos(a), math.sin(a)) for a in (k * 2 * math.pi / 3 for k in range(3))]
    elif kind == "star":
        radii = [1.0 if k % 2 == 0 else 0.45 for k in range(10)]
        local = [(q * math.cos(k * math.pi / 5), q * math.sin(k * math.pi / 5)) for k, q in enumerate(radii)]
    else:  # cross: a plus sign with arms 0.3 r wide
        a = 0.3
        local = [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a)]
        local += [(a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in local]


def render_shape(index: int, image_size: int, seed: int) -> tuple[np.ndarray, int]:
    """Image number `index` of the dataset for `seed`: (S, S, 3) uint8 and its label.

    Each image draws from its own generator seeded with (seed, index), so image i is the same whatever
    the count, chunking or number of workers.
    """
    rng = np.random.default_rng([seed, index])
    label = index % len(SHAPES)  # balanced classes
    bg, mean = _background(rng, image_size)
    colour = _shape_colour(rng, mean)
    # Draw only a coverage mask at 2x and average it down: anti-aliased edges at a quarter of the cost
    # of rendering the whole RGB picture at 2x.
    big = 2 * image_size
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    r = rng.uniform(0.18, 0.42) * big
    cx, cy = rng.uniform(r, big - r, size=2)
    kind = SHAPES[label]
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "circle":
        draw.ellipse(box, fill=255)
    elif kind == "ring":
        draw.ellipse(box, outline=255, width=max(2, int(0.3 * r)))
    else:
        draw.polygon(_polygon(kind, cx, cy, r, rng.uniform(0, 2 * math.pi)), fill=255)
    alpha = np.asarray(mask.reduce(2), dtype=np.float32)[:, :, None] * (1.0 / 255.0)  # (S, S, 1)
    img = bg + (np.asarray(colour, dtype=np.float32) - bg) * alpha  # (S, S, 3)
    # light sensor-like noise of per-image strength; uniform draws cost a fraction of normal ones
    amplitude = rng.uniform(0.0, 10.0)
    img += (rng.random(img.shape, dtype=np.float32) - 0.5) * amplitude
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), label


def render_chunk(start_count: tuple[int, int], image_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pool task: images start .. start+count-1 as ((count, S, S, 3) uint8, (count,) int64)."""
    start, count = start_count
    images = np.empty((count, image_size, image_size, 3), dtype=np.uint8)
    labels = np.empty(count, dtype=np.int64)
    for j in range(count):
        images[j], labels[j] = render_shape(start + j, image_size, seed)
    return images, labels


def generate_shapes(
    count: int, image_size: int = 64, seed: int = 0, num_workers: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` images of the shapes dataset for `seed`; byte-identical for the same arguments.

    Returns:
        (images (count, S, S, 3) uint8 C-contiguous, labels (count,) int64 indexing SHAPES).
    """
    images = np.empty((count, image_size, image_size, 3), dtype=np.uint8)
    labels = np.empty(count, dtype=np.int64)
    ranges = [(s, min(CHUNK_IMAGES, count - s)) for s in range(0, count, CHUNK_IMAGES)]
    task = functools.partial(render_chunk, image_size=image_size, seed=seed)
    for (start, n), (chunk_images, chunk_labels) in ordered_map(task, ranges, num_workers):
        images[start : start + n] = chunk_images
        labels[start : start + n] = chunk_labels
    return images, labels


def builtin_key(index: int) -> str:
    """The identity of built-in image `index` (its seed is (seed, index)), as data keys are reported."""
    return f"builtin:{index:06d}"


class BuiltinSource(Source):
    """`builtin` / `builtin:shapes`: the procedural shapes dataset, builtin_count images for `seed`."""

    kind = "builtin"

    def __init__(self, target: str, options: LoadOptions) -> None:
        super().__init__(target or VARIANTS[0], options)
        if self.target not in VARIANTS:
            raise DataError(f"unknown built-in dataset {self.target!r}; valid: {', '.join(VARIANTS)}")

    @property
    def count(self) -> int:
        limit = self.options.max_samples
        return self.options.builtin_count if limit is None else min(limit, self.options.builtin_count)

    def fingerprint(self) -> str:
        material = f"{self.target}:{self.count}:{self.options.image_size}:{self.options.seed}"
        return hashlib.sha256(material.encode()).hexdigest()

    def read(self) -> Loaded:
        start = time.perf_counter()
        images, labels = generate_shapes(
            self.count, self.options.image_size, self.options.seed, self.options.workers
        )
        seconds = time.perf_counter() - start
        keys = [builtin_key(i) for i in range(self.count)]
        return Loaded(images, labels, list(SHAPES), keys, files=0, records=self.count, seconds=seconds)
