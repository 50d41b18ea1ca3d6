"""Image-folder source: files found recursively, labels from first-level sub-folder names (ImageFolder)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

from vaeforge.data.base import IMAGE_EXTS, EncodedSource
from vaeforge.data.decode import Record, SkipTally
from vaeforge.data.files import DataError, check_local, stamp_digest


def walk_files(root: Path) -> Iterator[Path]:
    """Every non-hidden file under root in a deterministic (sorted, depth-first) order."""
    for dirpath, dirnames, filenames in os.walk(root):
        # hidden entries are tool litter (.ipynb_checkpoints, macOS ._x.jpg), never data
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTS


class FolderSource(EncodedSource):
    """A directory of image files; first-level sub-folders are classes when there are any."""

    kind = "folder"

    @cached_property
    def root(self) -> Path:
        check_local(self.target)
        root = Path(self.target).expanduser()
        if not root.exists():
            raise DataError(f"data path not found: {self.target}")
        if not root.is_dir():
            raise DataError(
                f"{self.target} is not a folder; pass a folder of images, .tar shards or .parquet files"
            )
        return root.resolve()

    @cached_property
    def files(self) -> list[Path]:
        # sort by relative path so the order does not depend on where the folder lives
        found = sorted(
            (p for p in walk_files(self.root) if is_image_name(p)), key=lambda p: p.relative_to(self.root)
        )
        if not found:
            looked = ", ".join(IMAGE_EXTS)
            raise DataError(f"no images found under {self.target} (looked for {looked}, in any letter case)")
        return found

    def _label(self, path: Path) -> str | None:
        parts = path.relative_to(self.root).parts
        return parts[0] if len(parts) > 1 else None  # files directly in root are unlabeled

    def fingerprint(self) -> str:
        return stamp_digest(self.files)

    def file_count(self) -> int:
        return len(self.files)

    def size_hint(self) -> int:
        return len(self.files)

    def known_class_names(self) -> list[str] | None:
        # every first-level sub-folder holding images is a class, even if all its images turn out bad
        names = sorted({label for label in map(self._label, self.files) if label is not None})
        return names or None

    def records(self, tally: SkipTally) -> Iterator[Record]:
        for path in self.files:
            yield Record(key=str(path), label=self._label(path), path=str(path))
