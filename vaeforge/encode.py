"""Image encoders: (H, W, 3) uint8 arrays to PNG/JPEG/WebP/npy bytes, and a thread pool that overlaps them."""

from __future__ import annotations

import io
import struct
import threading
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType

import numpy as np
from isal import isal_zlib
from PIL import Image

# PNG is written here rather than by Pillow because encoding is what limits generation on a CPU box once
# decoding is fast. Pillow tries several row filters per image; a fixed "Up" filter (each row minus the
# row above, one numpy subtraction) with zlib level 1 measured, on 256 decoder outputs / 256 smooth-noise
# images (one core, Pillow 13 at compress_level 1 for comparison):
#   Pillow level 1:   1,849 img/s, 2.68 KB  /  1,054 img/s, 8.32 KB
#   Up + zlib level 1: 4,577 img/s, 2.73 KB  /  2,613 img/s, 6.98 KB
# Per-row adaptive filtering in numpy was slower than Pillow and no smaller; zlib level 6 costs 3x the time
# for 20% fewer bytes.
# With bf16 on AMX a CPU core decodes ~700 img/s, and zlib's ~100 us an image became ~7% of an actor's
# time. The deflate stream now comes from ISA-L (isal, the same zlib format): per image, min of 5 runs,
# seed64 decoder outputs / Fashion-MNIST at 64x64:
#   zlib level 1: 103 us, 3.53 KB  /  84 us, 2.96 KB
#   isal level 1:  28 us, 3.27 KB  /  28 us, 3.44 KB   (level 0: 24 us, 4.03 KB; level 2: the same as 1)
# Files are ordinary 8-bit RGB PNGs that every reader decodes. The bytes depend on the deflater: isal is
# pinned in constraints.txt, and igzip's output is the same on every x86-64 host with SSE4.2 or better.
PNG_COMPRESS_LEVEL = 1
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_FILTER_UP = 2


@dataclass(frozen=True)
class ImageFormat:
    """One entry of IMAGE_FORMATS: the file extension used for it and its encoder."""

    extension: str
    encode: Callable[[np.ndarray, int], bytes]  # (image (H, W, 3) uint8, quality) -> bytes
    lossless: bool


def _pil_bytes(img: np.ndarray, **save_args: object) -> bytes:
    buf = io.BytesIO()
    # No info/exif/icc is passed, so no timestamps or metadata reach the file: same pixels, same bytes.
    Image.fromarray(img).save(buf, **save_args)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(img: np.ndarray, quality: int) -> bytes:
    return _png_batch(img[None])[0]


def _png_batch(images: np.ndarray) -> list[bytes]:
    """(B, H, W, 3) uint8 -> B PNG files; the same bytes as encoding each image alone.

    The row filter runs once over the whole batch and the fixed chunks are built once: per image, what
    is left is the deflate (~80% of the time), one CRC and one join.
    """
    b, h, w, c = images.shape
    rows = images.reshape(b, h, w * c)  # (B, H, W*3) bytes of each scanline
    scanlines = np.empty((b, h, 1 + w * c), dtype=np.uint8)  # each scanline is prefixed by its filter type
    scanlines[:, :, 0] = _PNG_FILTER_UP
    scanlines[:, 0, 1:] = rows[:, 0]  # the row above the first is defined as zeros
    np.subtract(rows[:, 1:], rows[:, :-1], out=scanlines[:, 1:, 1:])  # uint8 wraps mod 256, as PNG wants
    head = _PNG_SIGNATURE + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    tail = _png_chunk(b"IEND", b"")  # 8-bit truecolour, no interlace, above
    out = []
    for lines in scanlines:
        idat = b"IDAT" + isal_zlib.compress(lines.tobytes(), PNG_COMPRESS_LEVEL)
        size, crc = struct.pack(">I", len(idat) - 4), struct.pack(">I", zlib.crc32(idat))
        out.append(b"".join((head, size, idat, crc, tail)))
    return out


def _jpeg(img: np.ndarray, quality: int) -> bytes:
    return _pil_bytes(img, format="JPEG", quality=quality)


def _webp(img: np.ndarray, quality: int) -> bytes:
    return _pil_bytes(img, format="WEBP", quality=quality)


def _npy(img: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(img), allow_pickle=False)
    return buf.getvalue()


IMAGE_FORMATS: dict[str, ImageFormat] = {
    "png": ImageFormat("png", _png, lossless=True),
    "jpeg": ImageFormat("jpg", _jpeg, lossless=False),
    "webp": ImageFormat("webp", _webp, lossless=False),
    "npy": ImageFormat("npy", _npy, lossless=True),
}


def get_format(fmt: str) -> ImageFormat:
    """Look up an image format by name.

    Raises:
        ValueError: if `fmt` is not a key of IMAGE_FORMATS; the message lists the valid names.
    """
    try:
        return IMAGE_FORMATS[fmt]
    except KeyError:
        raise ValueError(
            f"unknown image format {fmt!r}; valid formats: {', '.join(sorted(IMAGE_FORMATS))}"
        ) from None


def extension(fmt: str) -> str:
    """File extension (no dot) for an image format: "png", "jpg", "webp" or "npy"."""
    return get_format(fmt).extension


def _check_quality(quality: int) -> None:
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be between 1 and 100, got {quality}")


def encode_image(img: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    """Encode one image.

    Args:
        img: (H, W, 3) uint8 array.
        fmt: a key of IMAGE_FORMATS.
        quality: 1..100, used by the lossy formats (jpeg, webp) and ignored by the others.

    Returns:
        The encoded file's bytes; the same pixels always give the same bytes.

    Raises:
        ValueError: on an unknown format, a bad quality, or an array that is not (H, W, 3) uint8.
    """
    spec = get_format(fmt)
    _check_quality(quality)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got shape {img.shape} dtype {img.dtype}")
    return spec.encode(img, quality)


def encode_batch(images: np.ndarray | Sequence[np.ndarray], fmt: str, quality: int = 95) -> list[bytes]:
    """Encode a batch: (B, H, W, 3) uint8, or a sequence of (H, W, 3) uint8; as encode_image, in order.

    A (B, H, W, 3) array of PNGs is encoded as one batch (see _png_batch), with the same bytes.
    """
    if fmt == "png" and isinstance(images, np.ndarray) and images.ndim == 4 and len(images):
        if images.shape[3] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected (B, H, W, 3) uint8 images, got {images.shape} {images.dtype}")
        _check_quality(quality)
        return _png_batch(images)
    return [encode_image(img, fmt, quality) for img in images]


def _gather(parts: list[Future[list[bytes]]]) -> Future[list[bytes]]:
    """One future for the concatenated results of `parts`, in order; it fails with the first error seen."""
    out: Future[list[bytes]] = Future()
    lock = threading.Lock()
    pending = [len(parts)]

    def on_done(part: Future[list[bytes]]) -> None:
        with lock:
            pending[0] -= 1
            finished = pending[0] == 0
            if out.done():
                return
            if part.exception() is not None:
                out.set_exception(part.exception())
            elif finished:
                out.set_result([data for p in parts for data in p.result()])

    if not parts:
        out.set_result([])
    for part in parts:
        part.add_done_callback(on_done)
    return out


class EncoderPool:
    """Encodes batches on worker threads so the caller can decode the next batch meanwhile.

    What overlaps is encoding with decoding: torch releases the GIL inside its kernels and while waiting on
    the GPU. PNG encodes also run in parallel with each other, because zlib releases the GIL while it
    compresses; JPEG and WebP go through Pillow, which holds the GIL when writing into memory, so for more of
    those run more actors (processes), not more threads here.

    Example:
        with EncoderPool(2) as pool:
            pending = pool.submit_batch(images, "png")  # images: (B, H, W, 3) uint8
            ...  # decode the next batch
            blobs = pending.result()  # list of B bytes, in input order
    """

    def __init__(self, n_threads: int = 2) -> None:
        """Args:
            n_threads: worker threads; each batch is split into this many contiguous chunks. More than
                two add little while Pillow holds the GIL (see the class docstring).

        Raises:
            ValueError: if n_threads < 1.
        """
        if n_threads < 1:
            raise ValueError(f"n_threads must be at least 1, got {n_threads}")
        self.n_threads = n_threads
        self._executor = ThreadPoolExecutor(n_threads, thread_name_prefix="vaeforge-encode")

    def submit_batch(
        self, images: np.ndarray | Sequence[np.ndarray], fmt: str, quality: int = 95
    ) -> Future[list[bytes]]:
        """Start encoding a batch.

        Args:
            images: (B, H, W, 3) uint8 array, or a sequence of (H, W, 3) uint8 arrays.
            fmt: a key of IMAGE_FORMATS.
            quality: as for encode_image.

        Returns:
            A future for the B encoded images, in input order. It raises what encode_image raised.

        Raises:
            ValueError: at once (not through the future) on an unknown format or a bad quality.
        """
        get_format(fmt)
        _check_quality(quality)
        n = len(images)
        n_chunks = min(self.n_threads, n)
        bounds = [n * i // n_chunks for i in range(n_chunks + 1)] if n_chunks else [0]
        parts = [
            self._executor.submit(encode_batch, images[lo:hi], fmt, quality)
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        return _gather(parts)

    def close(self) -> None:
        """Wait for submitted batches to finish, then stop the threads."""
        self._executor.shutdown(wait=True)

    def __enter__(self) -> EncoderPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
