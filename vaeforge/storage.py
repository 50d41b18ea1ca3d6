"""Where bytes live: local paths and pyarrow.fs URIs (s3://, gs://, ...) behind one interface.

A *location* is a plain string: a local path or a URI. Every module that reads or writes run files, data,
checkpoints or shards goes through here, so remote storage is one module's concern. Local paths keep
their POSIX semantics (fsync + rename); remote ones rely on an object store's rule that an object appears
only once its upload completes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.fs as pafs

from vaeforge.errors import UserError

# Credentials and endpoints that decide where remote bytes go. Ray workers and actors inherit the
# environment of the raylet that started them, not the driver's: on another node (or on a local Ray
# started before these were set) they would otherwise talk to another endpoint or have no credentials.
# The driver passes the ones it has to every worker it starts (runtime_env env_vars).
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "AWS_EC2_METADATA_DISABLED",
    "AWS_CA_BUNDLE",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "VAEFORGE_CACHE",  # not a credential: where workers keep their copies of remote checkpoints
)
READ_BUFFER = 8 << 20  # sequential reads (tar shards) from object stores: few large GETs, not many small


class StorageError(UserError):
    """A remote location that cannot be used: missing bucket, no access, unreachable endpoint."""


@dataclass(frozen=True)
class Entry:
    """One file found by a listing: its location, size and modification time (the cache keys on these)."""

    location: str
    size: int
    mtime_ns: int

    @property
    def name(self) -> str:
        return basename(self.location)


def forwarded_env() -> dict[str, str]:
    """The credential / endpoint variables set in this process, for workers' runtime_env."""
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def is_uri(location: str | os.PathLike[str]) -> bool:
    return "://" in os.fspath(location)


def absolute(location: str | os.PathLike[str]) -> str:
    """Local paths made absolute (Ray workers run elsewhere); URIs with a trailing slash dropped."""
    loc = os.fspath(location)
    return loc.rstrip("/") if is_uri(loc) else str(Path(loc).expanduser().resolve())


def join(location: str | os.PathLike[str], *names: str) -> str:
    loc = os.fspath(location)
    return posixpath.join(loc.rstrip("/"), *names) if is_uri(loc) else os.path.join(loc, *names)


def basename(location: str) -> str:
    return posixpath.basename(location.rstrip("/")) if is_uri(location) else os.path.basename(location)


def parent(location: str) -> str:
    return posixpath.dirname(location.rstrip("/")) if is_uri(location) else os.path.dirname(location)


# ------------------------------------------------------------------------------------------ filesystems

_FILESYSTEMS: dict[tuple, pafs.FileSystem] = {}


def _s3_filesystem(bucket: str) -> pafs.S3FileSystem:
    """S3 configured from the usual environment variables.

    pyarrow's S3FileSystem() ignores AWS_ENDPOINT_URL (only FileSystem.from_uri reads it), so the endpoint
    is passed here. Keys found in the environment are passed explicitly too: the filesystem is pickled
    into Ray Train's controller and workers, which may not share this process's environment.
    """
    env = os.environ.get
    endpoint = env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL")
    region = env("AWS_REGION") or env("AWS_DEFAULT_REGION")
    if not region and not endpoint:  # real AWS: ask where the bucket lives, as FileSystem.from_uri does
        with remote_errors(f"s3://{bucket}"):
            region = pafs.resolve_s3_region(bucket)
    options: dict[str, Any] = {"region": region or "us-east-1"}
    if endpoint:
        options["endpoint_override"] = endpoint
    if env("AWS_ACCESS_KEY_ID") and env("AWS_SECRET_ACCESS_KEY"):
        options.update(access_key=env("AWS_ACCESS_KEY_ID"), secret_key=env("AWS_SECRET_ACCESS_KEY"))
        if env("AWS_SESSION_TOKEN"):
            options["session_token"] = env("AWS_SESSION_TOKEN")
    return pafs.S3FileSystem(**options)


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for any location; filesystems are built once per process."""
    loc = os.fspath(location)
    if not is_uri(loc):
        return pafs.LocalFileSystem(), absolute(loc)
    scheme, rest = loc.split("://", 1)
    scheme = scheme.lower()
    if scheme in ("s3", "s3a"):
        bucket = rest.split("/", 1)[0]
        key = ("s3", bucket, *(os.environ.get(k) for k in FORWARDED_ENV))
        if key not in _FILESYSTEMS:
            _FILESYSTEMS[key] = _s3_filesystem(bucket)
        return _FILESYSTEMS[key], rest.rstrip("/")
    with remote_errors(loc):  # gs://, hdfs://, file://, ...: whatever this pyarrow build understands
        try:
            fs, path = pafs.FileSystem.from_uri(loc)
        except pa.ArrowInvalid as e:
            raise StorageError(f"unsupported storage URI {loc}: {_one_line(e)}") from None
    return fs, path.rstrip("/")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def _explain(location: str, e: OSError) -> str:
    text = _one_line(e)
    bucket = location.split("://", 1)[-1].split("/", 1)[0]
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
        return f"bucket {bucket!r} does not exist ({location}); create it or fix the URI"
    if any(s in text for s in ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoes")):
        return (
            f"access denied to {location}: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the node's "
            f"role) and the bucket policy ({text})"
        )
    if "NETWORK_CONNECTION" in text or "curlCode" in text:
        return f"cannot reach the storage endpoint for {location}: check AWS_ENDPOINT_URL ({text})"
    return f"storage error at {location}: {text}"


@contextlib.contextmanager
def remote_errors(location: str) -> Iterator[None]:
    """Turn a remote store's OSError into one StorageError line. A missing key stays FileNotFoundError
    (callers decide what absence means); local errors pass unchanged (disk full is reported upstream)."""
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as e:
        if not is_uri(location):
            raise
        raise StorageError(_explain(location, e)) from None


def require_bucket(location: str) -> None:
    """Fail early, in one line, when a remote location's bucket (or root) does not exist."""
    if not is_uri(location):
        return
    fs, path = filesystem(location)
    root = path.split("/", 1)[0]
    if not root:  # file:///..., hdfs:///...: rooted paths, no bucket to check
        return
    with remote_errors(location):
        info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"bucket {root!r} does not exist ({location}); create it or fix the URI")


# ---------------------------------------------------------------------------------------- reading


def kind(location: str) -> str | None:
    """'file', 'dir' or None (missing). An object-store prefix holding objects counts as a directory."""
    if not is_uri(location):
        p = Path(location).expanduser()
        return "dir" if p.is_dir() else "file" if p.exists() else None
    fs, path = filesystem(location)
    with remote_errors(location):
        t = fs.get_file_info(path).type
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(t)


def info(location: str) -> Entry | None:
    """The file's Entry, or None when it is missing or not a file."""
    if not is_uri(location):
        path = os.path.expanduser(location)
        try:
            st = os.stat(path)
        except OSError:
            return None
        return Entry(path, st.st_size, st.st_mtime_ns) if os.path.isfile(path) else None
    fs, path = filesystem(location)
    with remote_errors(location):
        i = fs.get_file_info(path)
    return Entry(location, i.size, i.mtime_ns or 0) if i.type == pafs.FileType.File else None


def _local_files(root: str, recursive: bool) -> Iterator[Entry]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):  # vanished since listing
                st = os.stat(path)
                yield Entry(path, st.st_size, st.st_mtime_ns)
        if not recursive:
            return


def iter_files(location: str, recursive: bool = True) -> Iterator[Entry]:
    """Every file under a directory location (none if it is missing), in no particular order.

    Lazy on a local disk, so a caller may stop early; on an object store one paged LIST of the prefix.
    """
    if not is_uri(location):
        yield from _local_files(os.path.expanduser(location), recursive)
        return
    fs, path = filesystem(location)
    base = location.rstrip("/")
    selector = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
    with remote_errors(location):
        infos = fs.get_file_info(selector)
    for i in infos:
        if i.type == pafs.FileType.File and i.path.startswith(path + "/"):
            yield Entry(base + i.path[len(path) :], i.size, i.mtime_ns or 0)


def is_empty(location: str) -> bool:
    """True for a missing or empty directory (locally an empty sub-folder counts as content)."""
    if not is_uri(location):
        if not os.path.isdir(location):
            return True
        with os.scandir(location) as entries:
            return not any(entries)
    return next(iter_files(location), None) is None


def list_files(location: str, recursive: bool = True) -> list[Entry]:
    """iter_files, sorted by location."""
    return sorted(iter_files(location, recursive), key=lambda e: e.location)


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Python's glob rules on a flat key space: `*`, `?` and `[..]` stay inside one path segment, `**/`
    spans any number of them (glob.glob(recursive=True))."""
    out, i = [], 0
    while i < len(pattern):
        close = pattern.find("]", i + 2) if pattern[i] == "[" else -1
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern[i] in "*?":
            out.append("[^/]*" if pattern[i] == "*" else "[^/]")
            i += 1
        elif close > 0:
            body = pattern[i + 1 : close]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = close + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def glob(pattern: str) -> list[Entry]:
    """Files matching a glob pattern (no braces). Remote: one listing of the prefix before the first
    wildcard, matched with glob's rules."""
    if not is_uri(pattern):
        import glob as globmod

        return [e for p in globmod.glob(os.path.expanduser(pattern), recursive=True) if (e := info(p))]
    wild = min(i for i, c in enumerate(pattern) if c in "*?[")
    prefix = pattern[: pattern.rfind("/", 0, wild)]
    regex = _glob_regex(pattern)
    return [e for e in list_files(prefix, recursive=True) if regex.match(e.location)]


def open_input(location: str | os.PathLike[str], seekable: bool = False) -> BinaryIO:
    """Open for binary reading; `seekable` for formats that jump (Parquet footers), else a buffered stream."""
    loc = os.fspath(location)
    if not is_uri(loc):
        return open(loc, "rb")  # noqa: SIM115 - the caller owns the handle
    fs, path = filesystem(loc)
    with remote_errors(loc):
        if seekable:
            return fs.open_input_file(path)
        return fs.open_input_stream(path, buffer_size=READ_BUFFER)


def read_bytes(location: str | os.PathLike[str]) -> bytes:
    with open_input(location) as f:
        return f.read()


def read_text(location: str) -> str:
    return read_bytes(location).decode("utf-8")


# ---------------------------------------------------------------------------------------- writing


def fsync_directory(directory: str) -> None:
    """Make a rename durable. Some network/FUSE filesystems cannot fsync a directory (EINVAL); there the
    rename is as durable as that filesystem allows, so that is not an error."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def makedirs(location: str) -> None:
    """Create a local directory; object stores have no directories, so nothing to do there."""
    if not is_uri(location):
        os.makedirs(location, exist_ok=True)


OBJECT_STORES = ("s3", "gcs", "abfs")  # pyarrow type names of stores where an upload is all or nothing


def _put(location: str, data: Any) -> None:
    """Write complete bytes to a remote location so that it holds the whole of them or its old content.

    Object stores: one object, in a single write. Arrow's S3 stream completes the upload when it is
    closed, also when an exception closes it, so a stream must never see a partial file; with everything
    in one write() the only failure left is the upload itself, which Arrow then refuses to complete.
    Filesystems with directories (file://, hdfs://): a temp name beside it, then a rename.
    """
    fs, path = filesystem(location)
    with remote_errors(location):
        if fs.type_name in OBJECT_STORES:
            with fs.open_output_stream(path) as out:
                out.write(data)
            return
        fs.create_dir(posixpath.dirname(path), recursive=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with fs.open_output_stream(tmp) as out:
                out.write(data)
            fs.move(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                fs.delete_file(tmp)


def write_bytes(location: str, data: bytes) -> None:
    """Replace a small file atomically: local temp + fsync + rename + directory fsync; remote one PUT."""
    if is_uri(location):
        _put(location, data)
        return
    directory = os.path.dirname(os.path.abspath(location))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{location}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, location)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_directory(directory)


def upload_file(local_path: str, location: str) -> None:
    """Copy a complete, closed local file to a remote location as one object, then check its size.

    Raises:
        StorageError: the upload failed or the object's size is not the file's; nothing is left behind.
    """
    size = os.path.getsize(local_path)
    with pa.memory_map(local_path) as src:  # no copy in memory, and still one write (see _put)
        _put(location, src.read_buffer() if size else b"")
    stored = info(location)
    if stored is None or stored.size != size:
        delete(location)
        raise StorageError(f"upload of {location} came out at {stored and stored.size} bytes, not {size}")


def delete(location: str) -> None:
    """Remove one file; a missing one is fine."""
    if not is_uri(location):
        Path(location).unlink(missing_ok=True)
        return
    fs, path = filesystem(location)
    with contextlib.suppress(FileNotFoundError), remote_errors(location):
        fs.delete_file(path)


def delete_tree(location: str) -> None:
    """Remove a directory and everything under it; a missing one is fine."""
    if not is_uri(location):
        shutil.rmtree(location, ignore_errors=True)
        return
    for entry in list_files(location):  # per object: delete_dir would leave a directory marker behind
        delete(entry.location)


def download(location: str, local_path: str | os.PathLike[str]) -> None:
    """Copy one remote file to a local path, creating its directory."""
    os.makedirs(os.path.dirname(os.path.abspath(local_path)), exist_ok=True)
    fs, path = filesystem(location)
    with remote_errors(location):
        pafs.copy_files(path, os.fspath(local_path), source_filesystem=fs)


def default_cache_dir() -> Path:
    """$VAEFORGE_CACHE, else $XDG_CACHE_HOME/vaeforge, else ~/.cache/vaeforge."""
    if os.environ.get("VAEFORGE_CACHE"):
        return Path(os.environ["VAEFORGE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "vaeforge"
