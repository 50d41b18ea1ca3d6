"""Input files for the data sources: paths, folders, globs and brace patterns, local or remote."""

from __future__ import annotations

import hashlib
import os
from typing import BinaryIO

from braceexpand import braceexpand

from vaeforge import storage
from vaeforge.errors import UserError
from vaeforge.storage import Entry, is_uri


class DataError(UserError):
    """A problem with the input data that the user can fix (missing path, no usable images, bad columns)."""


def open_input(path: str | os.PathLike[str], seekable: bool = False) -> BinaryIO:
    """Open a data file for binary reading. Every reader goes through here (tar shards, parquet, images)."""
    return storage.open_input(path, seekable)


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """Whole content of one (small) input file, e.g. an image."""
    return storage.read_bytes(path)


def kind_of(path: str) -> str | None:
    """'file', 'dir' or None for a data path; a remote one in a missing bucket says so in one line."""
    found = storage.kind(path)
    if found is None:
        storage.require_bucket(path)
    return found


def stamp_digest(entries: list[Entry]) -> str:
    """sha256 over (location, size, mtime_ns) of each file: changes whenever any input file changes.

    The sizes and mtimes come from the listing (one LIST on an object store, not one request per file),
    and are hashed incrementally so a million-file folder never builds one giant string.
    """
    h = hashlib.sha256()
    for e in entries:
        h.update(f"{e.location}\0{e.size}\0{e.mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def relative_parts(root: str, location: str) -> tuple[str, ...]:
    """Path components of `location` below `root`: ('cats', '001.png')."""
    sep = "/" if is_uri(root) else os.sep
    return tuple(location[len(root.rstrip(sep)) + 1 :].split(sep))


def walk_files(root: str) -> list[Entry]:
    """Every non-hidden file under the folder `root`, ordered by its path below root.

    Hidden entries are tool litter (.ipynb_checkpoints, macOS ._x.jpg), never data.
    """
    found = []
    for e in storage.list_files(root):
        parts = relative_parts(root, e.location)
        if not any(p.startswith(".") for p in parts):
            found.append((parts, e))
    return [e for _, e in sorted(found, key=lambda pe: pe[0])]


def has_pattern(path: str) -> bool:
    """True if the path is a glob or a brace pattern rather than one literal file."""
    return any(c in path for c in "*?[{")


def expand_pattern(pattern: str) -> tuple[list[Entry], list[str]]:
    """Expand a brace pattern (shard-{000..009}.tar) and/or glob (data/*.tar), locally or remotely.

    Returns:
        (files found, sorted and de-duplicated; literal names the braces produced that do not exist).
        Missing literal shards are returned rather than raised so one lost shard does not stop a run.
    """
    found: dict[str, Entry] = {}
    missing: list[str] = []
    for part in braceexpand(pattern):
        part = part if is_uri(part) else storage.absolute(part)
        if any(c in part for c in "*?["):
            found.update((e.location, e) for e in storage.glob(part))
        elif (entry := storage.info(part)) is not None:
            found[entry.location] = entry
        else:
            missing.append(part)
    if not found:
        storage.require_bucket(pattern)
    return [found[k] for k in sorted(found)], missing


def find_files(target: str, suffixes: tuple[str, ...], what: str) -> tuple[list[Entry], list[str]]:
    """The files a shard-like source reads: one file, every `suffixes` file under a folder, or a pattern.

    Returns:
        (files found, literal names a brace pattern produced that do not exist).

    Raises:
        DataError: nothing exists at `target`, or nothing matching was found.
    """
    found = kind_of(target) if not has_pattern(target) or os.path.exists(target) else None
    if found == "dir":
        files, missing = [e for e in walk_files(target) if e.name.lower().endswith(suffixes)], []
    elif found == "file":
        files, missing = [storage.info(target) or Entry(target, 0, 0)], []
    elif has_pattern(target):
        files, missing = expand_pattern(target)
    else:
        raise DataError(f"data path not found: {target}")
    if not files:
        raise DataError(f"no {what} found for {target}; check the path, glob or brace pattern")
    if not is_uri(target):  # keys and reports name the resolved file, as the decoders will open it
        files = [Entry(storage.absolute(e.location), e.size, e.mtime_ns) for e in files]
    return files, missing
