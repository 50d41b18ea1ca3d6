"""Data loading API: any supported source to one uint8 image array, labels, and a report of skipped files."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vaeforge.data import cache
from vaeforge.data.base import IMAGE_EXTS, Loaded, LoadOptions, Source
from vaeforge.data.builtin import SHAPES, generate_shapes
from vaeforge.data.decode import DEFAULT_MAX_PIXELS, SkipImage, decode_image
from vaeforge.data.files import DataError, open_input
from vaeforge.data.sources import SOURCES, make_source, resolve
from vaeforge.errors import UserError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTS",
    "SHAPES",
    "SOURCES",
    "DataError",
    "ImageSet",
    "LoadOptions",
    "SkipImage",
    "decode_image",
    "generate_shapes",
    "load_images",
    "open_input",
    "resolve",
]


@dataclass
class ImageSet:
    """Decoded images ready for training, with their labels and the data report."""

    images: np.ndarray  # (N, S, S, 3) uint8, C-contiguous; a read-only memory map on a cache hit
    labels: np.ndarray  # (N,) int64; -1 where unlabeled
    class_names: list[str]  # index -> name; [] when the source is unlabeled
    report: dict  # JSON-serialisable: counts, skip reasons with examples, cache status
    # (N,) where each image came from: its file path (for a folder, absolute), "shard.tar:key",
    # "file.parquet:row" or "builtin:000123"
    keys: list[str]


def _validate(options: LoadOptions) -> None:
    if options.image_size < 1:
        raise UserError(f"image_size must be a positive number of pixels, got {options.image_size}")
    if options.max_samples is not None and options.max_samples < 1:
        raise UserError(f"max_samples must be at least 1 (or None for all), got {options.max_samples}")
    if options.builtin_count < 1:
        raise UserError(f"builtin_count must be at least 1, got {options.builtin_count}")
    if options.max_pixels < 1:
        raise UserError(f"max_pixels must be positive, got {options.max_pixels}")


def _report(data: str | None, source: Source, loaded: Loaded, labeled: bool) -> dict:
    opts = source.options
    return {
        "source": data if data is not None else "builtin",
        "kind": source.kind,
        "files": loaded.files,
        "records": loaded.records,
        "images": len(loaded.images),
        "skipped": dict(sorted(loaded.tally.counts.items())),
        "skipped_examples": dict(sorted(loaded.tally.examples.items())),
        "classes": loaded.class_names if labeled else [],
        "labeled": labeled,
        "image_size": opts.image_size,
        "max_samples": opts.max_samples,
        "decode_seconds": round(loaded.seconds, 3),
    }


def _cache_material(source: Source) -> dict:
    opts = source.options
    return {
        "kind": source.kind,
        "target": source.target if source.kind == "builtin" else "",  # paths are in the fingerprint
        "inputs": source.fingerprint(),
        "image_size": opts.image_size,
        "max_samples": opts.max_samples,
        "max_pixels": opts.max_pixels,
        "image_column": opts.image_column,
        "label_column": opts.label_column,
    }


def _store(entry: Path, loaded: Loaded, meta: dict) -> dict:
    """Commit a cache entry; a failure (read-only dir, full disk) costs the cache, never the run."""
    try:
        cache.store(entry, loaded.images, loaded.labels, loaded.keys, meta)
    except OSError as e:
        warnings.warn(f"could not write the data cache at {entry}: {e}; continuing without it", stacklevel=3)
        return {"path": None, "hit": False, "error": str(e)}
    return {"path": str(entry), "hit": False}


def load_images(
    data: str | None,
    *,
    image_size: int = 64,
    max_samples: int | None = None,
    cache_dir: str | Path | None = None,
    num_workers: int | None = None,
    builtin_count: int = 8192,
    seed: int = 0,
    image_column: str | None = None,
    label_column: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    use_cache: bool = True,
) -> ImageSet:
    """Load every usable image of `data` as a (N, image_size, image_size, 3) uint8 array.

    Args:
        data: None / "builtin" / "builtin:shapes", an image folder, .tar shard(s) (path, glob or
            brace pattern), .parquet file(s), or any of these behind a "folder:", "webdataset:",
            "parquet:" prefix.
        max_samples: keep the first N usable images in the source's deterministic order.
        cache_dir: cache root; None uses $VAEFORGE_CACHE, $XDG_CACHE_HOME/vaeforge or ~/.cache/vaeforge.
        num_workers: decoding processes; None = every core, 1 = in this process.
        builtin_count, seed: size and seed of the built-in dataset (ignored by other sources).
        image_column, label_column: parquet column overrides; None = auto-detect.
        max_pixels: images whose header claims more pixels are skipped as decompression bombs.
        use_cache: False neither reads nor writes the cache.

    Raises:
        DataError: missing path, nothing found, no usable image left, unknown prefix, bad columns.
        UserError: an invalid option value.
    """
    options = LoadOptions(
        image_size=image_size,
        max_samples=max_samples,
        num_workers=num_workers,
        max_pixels=max_pixels,
        builtin_count=builtin_count,
        seed=seed,
        image_column=image_column,
        label_column=label_column,
    )
    _validate(options)
    source = make_source(data, options)
    entry = (
        cache.entry_dir(cache_dir, source.kind, cache.cache_key(_cache_material(source)))
        if use_cache
        else None
    )
    hit = cache.load(entry) if entry is not None else None
    if hit is not None:
        report = {**hit.meta["report"], "source": data if data is not None else "builtin"}
        report["cache"] = {"path": str(entry), "hit": True}
        return ImageSet(hit.images, hit.labels, list(hit.meta["class_names"]), report, hit.keys)

    loaded = source.read()
    if len(loaded.images) == 0:
        raise DataError(f"no usable images in {data}: {loaded.tally.summary()}")
    labeled = bool((loaded.labels >= 0).any())
    class_names = loaded.class_names if labeled else []
    report = _report(data, source, loaded, labeled)
    report["cache"] = {"path": None, "hit": False}
    if entry is not None:
        report["cache"] = _store(entry, loaded, {"class_names": class_names, "report": report})
    return ImageSet(loaded.images, loaded.labels, class_names, report, loaded.keys)
