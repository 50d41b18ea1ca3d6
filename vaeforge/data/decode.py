"""Bytes to (S, S, 3) uint8: decode, orient, convert to RGB, crop, resize; bad files become skip reasons."""

from __future__ import annotations

import contextlib
import functools
import io
import time
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from vaeforge.data.files import DataError, read_bytes
from vaeforge.data.pool import ordered_map

DEFAULT_MAX_PIXELS = 64_000_000  # ~8000x8000: larger than any photo we want, far below a memory blow-up
CHUNK_ITEMS = 256  # items per pool task: large enough that pickling/IPC is noise next to decoding
CHUNK_BYTES = 32 << 20  # ...but never ship more than this many encoded bytes in one task
MAX_EXAMPLES = 20  # paths/keys kept per skip reason in the report

ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}
ORIENTATION_TAG = 0x0112


class SkipImage(Exception):
    """One input is unusable; `reason` is a short key counted in the data report."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class Record(NamedTuple):
    """One candidate image: its encoded bytes, or a path a worker reads itself (avoids shipping bytes)."""

    key: str  # file path or shard:key, shown in skipped_examples
    label: int | str | None
    data: bytes | None = None
    path: str | None = None


@dataclass
class SkipTally:
    """Counts of skipped inputs per reason, with a few examples of each for the report."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, example: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < MAX_EXAMPLES:
            shown.append(example)

    def summary(self) -> str:
        """'3 corrupt, 2 empty' (largest first) or 'nothing was skipped'."""
        if not self.counts:
            return "nothing was skipped"
        items = sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return ", ".join(f"{n} {reason}" for reason, n in items)


@contextlib.contextmanager
def _strict_pillow(max_pixels: int) -> Iterator[None]:
    """Truncated files must raise (not load half-grey), and Pillow's own bomb check must use our limit
    and raise instead of warn, so every oversized image is counted the same way."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = False, max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = saved


def _gray_to_uint8(a: np.ndarray, mode: str, fmt: str | None) -> np.ndarray:
    """Scale a single-channel 16-bit / 32-bit int / float image to uint8 without clipping to white."""
    if mode in SIXTEEN_BIT_MODES or (mode == "I" and fmt == "PNG"):
        # 16-bit: 65535 -> 255 exactly (/257, rounded); Pillow's convert("L") would clip instead.
        return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(a.min()), float(a.max())
    if mode == "F" and lo >= 0.0 and hi <= 1.0:
        a = a * 255.0  # float images in [0, 1] are the common convention
    elif lo < 0.0 or hi > 65535.0:
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)  # unknown range: stretch
    elif hi > 255.0:
        a = a / 257.0  # values fit 16 bits: assume a 16-bit source
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def to_rgb(im: Image.Image, fmt: str | None = None) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: alpha composited onto white, high bit depths scaled (never clipped).

    fmt is the file format (im.format is lost once the image is transposed); a PNG in mode "I" is 16-bit.
    """
    if im.mode in SIXTEEN_BIT_MODES or im.mode in ("I", "F"):
        gray = _gray_to_uint8(np.asarray(im), im.mode, fmt or im.format)
        return Image.fromarray(gray, "L").convert("RGB")
    if im.mode in ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        white.alpha_composite(rgba)
        return white.convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def _crop_resize(im: Image.Image, size: int) -> Image.Image:
    """Center square crop (min side) and resize to size x size in one high-quality resampling pass."""
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    if side == size and (w, h) == (size, size):
        return im
    box = (left, top, left + side, top + side)
    return im.resize((size, size), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)


def _open(data: bytes, image_size: int, max_pixels: int) -> Image.Image:
    """Identify and fully load the image, mapping every failure to a skip reason."""
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        raise SkipImage("not_image") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SkipImage("decompression_bomb") from e
    except Exception as e:  # a header Pillow recognised but could not parse
        raise SkipImage("truncated" if "truncated" in str(e).lower() else "corrupt", str(e)) from e
    w, h = im.size
    if w * h > max_pixels:  # checked before load(): the header alone tells us the cost
        raise SkipImage("decompression_bomb", f"{w}x{h}")
    if w < 1 or h < 1:
        raise SkipImage("corrupt", f"{w}x{h}")
    if im.format == "JPEG":
        im.draft("RGB", (2 * image_size, 2 * image_size))  # DCT-domain downscale: much faster decode
    try:
        im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SkipImage("decompression_bomb") from e
    except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError, zlib.error... on bad data
        raise SkipImage("truncated" if "truncated" in str(e).lower() else "corrupt", str(e)) from e
    return im


def decode_image(data: bytes, image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes to a (image_size, image_size, 3) uint8 RGB array.

    Raises:
        SkipImage: reason is one of empty, not_image, truncated, corrupt, decompression_bomb.
    """
    if not data:
        raise SkipImage("empty")
    with _strict_pillow(max_pixels):
        im = _open(data, image_size, max_pixels)
        fmt = im.format
        with contextlib.suppress(Exception):  # broken EXIF: keep the pixels, lose only the rotation
            if im.getexif().get(ORIENTATION_TAG, 1) != 1:  # transpose copies: only when needed
                im = ImageOps.exif_transpose(im)
        try:
            out = _crop_resize(to_rgb(im, fmt), image_size)
        except Exception as e:
            raise SkipImage("corrupt", str(e)) from e
    return np.asarray(out, dtype=np.uint8)


def decode_chunk(
    records: list[Record], image_size: int, max_pixels: int
) -> tuple[np.ndarray, list[str | None]]:
    """Pool task: decode records in order.

    Returns:
        (usable images stacked in order, one outcome per record: None if usable else the skip reason).
    """
    images = np.empty((len(records), image_size, image_size, 3), dtype=np.uint8)
    outcomes: list[str | None] = []
    k = 0
    for rec in records:
        try:
            data = rec.data if rec.data is not None else read_bytes(rec.path or "")
            images[k] = decode_image(data, image_size, max_pixels)
        except SkipImage as e:
            outcomes.append(e.reason)
            continue
        except OSError:
            outcomes.append("unreadable_file")
            continue
        outcomes.append(None)
        k += 1
    return images[:k], outcomes


def _chunks(records: Iterable[Record]) -> Iterator[list[Record]]:
    """Group records into pool tasks bounded by item count and by encoded bytes."""
    chunk: list[Record] = []
    nbytes = 0
    for rec in records:
        chunk.append(rec)
        nbytes += len(rec.data) if rec.data is not None else 0
        if len(chunk) >= CHUNK_ITEMS or nbytes >= CHUNK_BYTES:
            yield chunk
            chunk, nbytes = [], 0
    if chunk:
        yield chunk


class _Growable:
    """Preallocated (capacity, S, S, 3) uint8 buffer that doubles when a source's size was unknown."""

    def __init__(self, capacity: int, size: int) -> None:
        self.array = np.empty((max(1, capacity), size, size, 3), dtype=np.uint8)
        self.n = 0

    def append(self, image: np.ndarray) -> None:
        if self.n == len(self.array):
            # resize in place (realloc): no second full-size copy lives next to the first
            self.array.resize((2 * len(self.array), *self.array.shape[1:]), refcheck=False)
        self.array[self.n] = image
        self.n += 1

    def finish(self) -> np.ndarray:
        if self.n != len(self.array):
            self.array.resize((self.n, *self.array.shape[1:]), refcheck=False)
        return self.array


@dataclass
class Decoded:
    """What decoding a source produced, before labels are mapped to class indices."""

    images: np.ndarray
    raw_labels: list[int | str | None]
    keys: list[str]  # Record.key of each kept image, in order: what `vaeforge score` reports per image
    records_seen: int
    seconds: float


def decode_records(
    records: Iterable[Record],
    *,
    image_size: int,
    tally: SkipTally,
    max_samples: int | None = None,
    num_workers: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    size_hint: int | None = None,
) -> Decoded:
    """Decode records in parallel, keeping the first max_samples usable images in record order."""
    start = time.perf_counter()
    limit = max_samples if max_samples is not None else float("inf")
    capacity = int(min(limit, size_hint if size_hint is not None else 1024))
    buf = _Growable(capacity, image_size)
    labels: list[int | str | None] = []
    keys: list[str] = []
    seen = 0
    task = functools.partial(decode_chunk, image_size=image_size, max_pixels=max_pixels)
    results = ordered_map(task, _chunks(records), num_workers)
    try:
        for chunk, (images, outcomes) in results:
            k = 0
            for rec, outcome in zip(chunk, outcomes, strict=True):
                if len(labels) >= limit:
                    break
                seen += 1
                if outcome is not None:
                    tally.add(outcome, rec.key)
                    continue
                buf.append(images[k])
                labels.append(rec.label)
                keys.append(rec.key)
                k += 1
            if len(labels) >= limit:
                break
    except BrokenProcessPool as e:
        raise DataError("an image decoding worker died (out of memory?); retry with num_workers=1") from e
    finally:
        results.close()  # cancels pending tasks and closes the source's open files
    return Decoded(buf.finish(), labels, keys, seen, time.perf_counter() - start)
