"""The one place that turns a data path into bytes: local files today, remote URIs (pyarrow.fs) later."""

from __future__ import annotations

import glob
import hashlib
import os
from pathlib import Path
from typing import BinaryIO

from braceexpand import braceexpand

from vaeforge.errors import UserError


class DataError(UserError):
    """A problem with the input data that the user can fix (missing path, no usable images, bad columns)."""


def is_remote(path: str) -> bool:
    """True for URIs such as s3://bucket/key; they need a filesystem layer we do not ship yet."""
    return "://" in path


def check_local(path: str) -> None:
    """Fail with one clear sentence for URIs, so adding pyarrow.fs later only touches this module."""
    if is_remote(path):
        raise DataError(
            f"remote data is not supported yet: {path}; copy it to a local disk and pass that path"
        )


def open_input(path: str | Path) -> BinaryIO:
    """Open a data file for binary reading. Every reader goes through here (tar shards, parquet, images)."""
    check_local(str(path))
    return open(path, "rb")  # noqa: SIM115 - the caller owns the handle


def read_bytes(path: str | Path) -> bytes:
    """Whole content of one (small) input file, e.g. an image."""
    with open_input(path) as f:
        return f.read()


def stamp_digest(paths: list[Path]) -> str:
    """sha256 over (path, size, mtime_ns) of each file: changes whenever any input file changes.

    Hashed incrementally so a million-file folder never builds one giant string.
    """
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
            line = f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n"
        except OSError:  # vanished since listing: the reader will count it, the key just has to differ
            line = f"{p}\0missing\n"
        h.update(line.encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def has_pattern(path: str) -> bool:
    """True if the path is a glob or a brace pattern rather than one literal file."""
    return any(c in path for c in "*?[{")


def expand_pattern(pattern: str) -> tuple[list[Path], list[str]]:
    """Expand a brace pattern (shard-{000..009}.tar) and/or glob (data/*.tar).

    Returns:
        (files found, sorted and de-duplicated; literal names the braces produced that do not exist).
        Missing literal shards are returned rather than raised so one lost shard does not stop a run.
    """
    check_local(pattern)
    found: set[Path] = set()
    missing: list[str] = []
    for part in braceexpand(pattern):
        part = os.path.expanduser(part)
        if any(c in part for c in "*?["):
            found.update(Path(p).resolve() for p in glob.glob(part, recursive=True) if os.path.isfile(p))
        elif os.path.isfile(part):
            found.add(Path(part).resolve())
        else:
            missing.append(part)
    return sorted(found), missing
