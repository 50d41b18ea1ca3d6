"""The source registry and auto-detection: turns the user's data string into one Source instance."""

from __future__ import annotations

import os
import re

from vaeforge import storage
from vaeforge.data.base import IMAGE_EXTS, LoadOptions, Source
from vaeforge.data.builtin import BuiltinSource
from vaeforge.data.files import DataError, has_pattern, kind_of, relative_parts
from vaeforge.data.folder import FolderSource, is_image_name
from vaeforge.data.parquet_source import ParquetSource
from vaeforge.data.wds_source import SHARD_SUFFIXES, WebDatasetSource

SOURCES: dict[str, type[Source]] = {
    "folder": FolderSource,
    "webdataset": WebDatasetSource,
    "parquet": ParquetSource,
    "builtin": BuiltinSource,
}

# "name:rest" but not "s3://..." (a URI) and not "C:\..." (one letter: a Windows drive)
_PREFIX = re.compile(r"^([A-Za-z][A-Za-z0-9_-]+):(?!//)(.*)$", re.DOTALL)
_PREFIX_HELP = "use a prefix: folder:PATH, webdataset:PATTERN or parquet:PATH"


def _kind_of_dir(root: str) -> str:
    """folder, unless the directory holds no images but only .tar shards or only .parquet files."""
    tars = parquets = False
    for entry in storage.iter_files(root):
        if any(part.startswith(".") for part in relative_parts(root, entry.location)):
            continue  # hidden: tool litter, never data
        name = entry.name.lower()
        if is_image_name(name):
            return "folder"  # stops at the first image: cheap even for huge local folders
        tars = tars or name.endswith(SHARD_SUFFIXES)
        parquets = parquets or name.endswith(".parquet")
    if tars and parquets:
        raise DataError(f"{root} holds both .tar and .parquet files; {_PREFIX_HELP}")
    return "webdataset" if tars else "parquet" if parquets else "folder"


def _kind_of_name(name: str, data: str, is_pattern: bool) -> str:
    """Kind of an existing file or of a glob / brace pattern, from how its name ends."""
    lower = name.lower()
    if lower.endswith(SHARD_SUFFIXES):
        return "webdataset"
    if lower.endswith(".parquet"):
        return "parquet"
    if is_pattern:
        raise DataError(f"a pattern must end in .tar or .parquet, got {data}; for images pass their folder")
    if lower.endswith(IMAGE_EXTS):
        raise DataError(f"{data} is a single image; pass the folder that contains it")
    raise DataError(f"cannot tell the format of {data}: expected a folder, .tar or .parquet; {_PREFIX_HELP}")


def detect_kind(data: str) -> str:
    """Source kind for a path, URI, glob or brace pattern without an explicit prefix."""
    found = kind_of(data)
    if found == "dir":
        return _kind_of_dir(data)
    if found == "file":
        return _kind_of_name(storage.basename(data), data, is_pattern=False)
    if has_pattern(data):
        return _kind_of_name(data, data, is_pattern=True)
    raise DataError(f"data path not found: {data}")


def resolve(data: str | None) -> tuple[str, str]:
    """(source kind, target) for the user's data string; None, "builtin" and "builtin:NAME" are built-in."""
    if data is None or not data.strip() or data.strip() == "builtin":
        return "builtin", ""
    m = _PREFIX.match(data)
    if m and not os.path.exists(data):
        name, target = m.group(1).lower(), m.group(2)
        if name not in SOURCES:
            raise DataError(f"unknown data source {name!r}; valid: {', '.join(sorted(SOURCES))}")
        if not target and name != "builtin":
            raise DataError(f"{name}: needs a path after the colon, e.g. {name}:/data/train")
        return name, target
    return detect_kind(data), data


def make_source(data: str | None, options: LoadOptions) -> Source:
    """The registered Source for `data`, ready to fingerprint and read."""
    kind, target = resolve(data)
    return SOURCES[kind](target, options)
