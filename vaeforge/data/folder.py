"""Image-folder source: files found recursively, labels from first-level sub-folder names (ImageFolder)."""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property

from vaeforge import storage
from vaeforge.data.base import IMAGE_EXTS, EncodedSource
from vaeforge.data.decode import Record, SkipTally
from vaeforge.data.files import DataError, kind_of, relative_parts, stamp_digest, walk_files
from vaeforge.storage import Entry


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS)


class FolderSource(EncodedSource):
    """A directory of image files, local or remote; first-level sub-folders are classes when there are any."""

    kind = "folder"

    @cached_property
    def root(self) -> str:
        found = kind_of(self.target)
        if found is None:
            raise DataError(f"data path not found: {self.target}")
        if found != "dir":
            raise DataError(
                f"{self.target} is not a folder; pass a folder of images, .tar shards or .parquet files"
            )
        return storage.absolute(self.target)

    @cached_property
    def files(self) -> list[Entry]:
        # ordered by path below the root, so the order does not depend on where the folder lives
        found = [e for e in walk_files(self.root) if is_image_name(e.name)]
        if not found:
            looked = ", ".join(IMAGE_EXTS)
            raise DataError(f"no images found under {self.target} (looked for {looked}, in any letter case)")
        return found

    def _label(self, location: str) -> str | None:
        parts = relative_parts(self.root, location)
        return parts[0] if len(parts) > 1 else None  # files directly in root are unlabeled

    def fingerprint(self) -> str:
        return stamp_digest(self.files)

    def file_count(self) -> int:
        return len(self.files)

    def size_hint(self) -> int:
        return len(self.files)

    def known_class_names(self) -> list[str] | None:
        # every first-level sub-folder holding images is a class, even if all its images turn out bad
        names = sorted({label for e in self.files if (label := self._label(e.location)) is not None})
        return names or None

    def records(self, tally: SkipTally) -> Iterator[Record]:
        for e in self.files:
            yield Record(key=e.location, label=self._label(e.location), path=e.location)
