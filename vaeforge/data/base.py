"""The interface every image source implements, the options they share, and label-to-index mapping."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from vaeforge.data.decode import DEFAULT_MAX_PIXELS, Record, SkipTally, decode_records
from vaeforge.data.pool import resolve_workers

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")  # what folders and shards count as images


@dataclass(frozen=True)
class LoadOptions:
    """Everything that shapes the loaded arrays; built once by load_images and handed to the source."""

    image_size: int = 64  # the model presets are 64x64
    max_samples: int | None = None  # None: every usable image
    num_workers: int | None = None  # None: every core; 1: decode in this process
    max_pixels: int = DEFAULT_MAX_PIXELS
    builtin_count: int = 8192  # enough variety for the shapes VAE to generalise, generated in seconds
    seed: int = 0  # only the built-in dataset draws random numbers
    image_column: str | None = None  # parquet: None = auto-detect
    label_column: str | None = None  # parquet: None = auto-detect

    @property
    def workers(self) -> int:
        return resolve_workers(self.num_workers)


@dataclass
class Loaded:
    """A source's result: arrays with labels already mapped to class indices, plus its accounting."""

    images: np.ndarray  # (N, S, S, 3) uint8
    labels: np.ndarray  # (N,) int64, -1 = unlabeled
    class_names: list[str]
    keys: list[str]  # one per image: a file path, "shard:key", "file.parquet:row" or "builtin:000123"
    files: int  # input files found: images for a folder, shards / parquet files otherwise
    records: int  # candidate images examined (fewer than exist when max_samples stopped early)
    seconds: float
    tally: SkipTally = field(default_factory=SkipTally)


class Source(ABC):
    """One kind of input (folder, webdataset, ...), registered by `kind` in sources.SOURCES."""

    kind: ClassVar[str]

    def __init__(self, target: str, options: LoadOptions) -> None:
        self.target = target
        self.options = options

    @abstractmethod
    def fingerprint(self) -> str:
        """A digest that changes whenever the inputs change (paths, sizes, mtimes); part of the cache key."""

    @abstractmethod
    def read(self) -> Loaded:
        """Decode the inputs into arrays, counting what had to be skipped."""


class EncodedSource(Source):
    """A source of encoded image files (jpg/png/...): enumerates Records, shares the decode pipeline."""

    @abstractmethod
    def records(self, tally: SkipTally) -> Iterator[Record]:
        """Candidate images in a deterministic order; container-level problems are added to tally."""

    @abstractmethod
    def file_count(self) -> int:
        """Input files found (image files, shards, parquet files)."""

    def size_hint(self) -> int | None:
        """Number of records if cheaply known, so the output array is allocated once."""
        return None

    def known_class_names(self) -> list[str] | None:
        """Class names fixed by the source itself (folder names, parquet metadata) or None to infer."""
        return None

    def read(self) -> Loaded:
        opts = self.options
        tally = SkipTally()
        decoded = decode_records(
            self.records(tally),
            image_size=opts.image_size,
            tally=tally,
            max_samples=opts.max_samples,
            num_workers=opts.workers,
            max_pixels=opts.max_pixels,
            size_hint=self.size_hint(),
        )
        labels, names = map_labels(decoded.raw_labels, self.known_class_names())
        return Loaded(
            decoded.images,
            labels,
            names,
            decoded.keys,
            self.file_count(),
            decoded.records_seen,
            decoded.seconds,
            tally,
        )


def map_labels(
    raw: Sequence[int | str | None], known: list[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """Map raw labels to (int64 indices, class names); None or negative ints become -1.

    Strings index into `known` (or their sorted set when unknown); ints are used as-is, named by `known`
    when given, else "0", "1", ... up to the largest seen.
    """
    present = [x for x in raw if x is not None]
    textual = any(isinstance(x, str) for x in present)
    if textual:
        names = list(known) if known is not None else sorted({str(x) for x in present})
    else:
        top = max((int(x) for x in present), default=-1)
        names = list(known or [])
        names += [str(i) for i in range(len(names), top + 1)]  # ints beyond the metadata still get a name
    index = {name: i for i, name in enumerate(names)}
    out = np.full(len(raw), -1, dtype=np.int64)
    for i, x in enumerate(raw):
        if x is None:
            continue
        out[i] = index.get(str(x), -1) if textual else max(int(x), -1)
    return out, names
