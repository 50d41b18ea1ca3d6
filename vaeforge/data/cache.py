"""On-disk cache of decoded arrays (images, labels, keys, meta.json), committed by an atomic rename."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vaeforge.storage import default_cache_dir  # one cache root for data and checkpoint copies

# Bump whenever decoding changes its output, so stale caches are never reused.
# 2: entries carry keys.json (each image's file path or shard:key), which `vaeforge score` reports.
CACHE_VERSION = 2


def cache_key(material: dict) -> str:
    """sha256 of everything that determines the arrays (source fingerprint, sizes, options, version)."""
    payload = json.dumps({"cache_version": CACHE_VERSION, **material}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class CacheEntry:
    images: np.ndarray  # read-only memory map: a cache hit costs no decode and no copy
    labels: np.ndarray
    keys: list[str]
    meta: dict


def entry_dir(root: str | Path | None, kind: str, key: str) -> Path:
    """Where the entry for `key` lives under the cache root (default_cache_dir() when root is None)."""
    base = Path(root).expanduser() if root is not None else default_cache_dir()
    return base / f"{kind}-{key[:32]}"


def load(entry: Path) -> CacheEntry | None:
    """The cached arrays, or None when absent or unreadable (an unreadable cache is just a miss)."""
    if not (entry / "meta.json").is_file():
        return None
    try:
        meta = json.loads((entry / "meta.json").read_text())
        images = np.load(entry / "images.npy", mmap_mode="r")
        labels = np.load(entry / "labels.npy")
        keys = json.loads((entry / "keys.json").read_text())
    except (OSError, ValueError):
        return None
    if images.ndim != 4 or not len(images) == len(labels) == len(keys):
        return None
    return CacheEntry(images, labels, keys, meta)


def store(entry: Path, images: np.ndarray, labels: np.ndarray, keys: list[str], meta: dict) -> None:
    """Write the entry into a temporary sibling directory, then rename it into place.

    A crash leaves at worst a stray .tmp-* directory, never a half-written entry. If another process
    committed the same entry first, its copy is kept (same key means same content).

    Raises:
        OSError: the cache directory is not writable or the disk is full.
    """
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
    try:
        np.save(tmp / "images.npy", images)
        np.save(tmp / "labels.npy", labels)
        (tmp / "keys.json").write_text(json.dumps(keys))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # written last: marks the entry complete
        try:
            os.replace(tmp, entry)
        except OSError:
            if load(entry) is not None:
                return  # another process won the race with identical content
            shutil.rmtree(entry, ignore_errors=True)  # a damaged old entry: replace it
            os.replace(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
