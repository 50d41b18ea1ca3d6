"""Shard writers: one WebDataset tar or Parquet file per shard, written as a local temp file, then renamed
into place (local output) or uploaded as one object (remote output) on commit."""

from __future__ import annotations

import contextlib
import hashlib
import json
import operator
import os
import re
import secrets
import tarfile
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, BinaryIO, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vaeforge import storage

# Fixed tar member attributes: the same samples give the same bytes on any machine, user or day.
# 2000-01-01 rather than 0 because GNU tar warns about "implausibly old" 1970 timestamps on extraction.
TAR_MTIME = 946684800
TAR_MODE = 0o444

# Parquet row groups: 1,000 rows of 64x64 images is a few MB, small enough for readers to stream, large
# enough that per-group overhead is noise. The byte cap only matters for big images or npy.
ROW_GROUP_ROWS = 1000
ROW_GROUP_BYTES = 64 << 20

REQUIRED_META = ("seed", "shard", "index")
WRITE_BUFFER = 1 << 20
TEMP_MARKER = ".tmp-"
_TEMP_RE = re.compile(re.escape(TEMP_MARKER) + r"(\d+)-[0-9a-f]{8}$")
_IMAGE_EXT_RE = re.compile(r"^[A-Za-z0-9]+$")


@dataclass(frozen=True)
class ShardInfo:
    """A committed shard: where it is, how many samples, its size in bytes and its sha256 (hex)."""

    path: str
    count: int
    bytes: int
    sha256: str


def staging_dir() -> str:
    """Where shards bound for a remote output are written before their upload: this node's temp dir."""
    return os.path.join(tempfile.gettempdir(), f"vaeforge-staging-{os.getuid()}")


def temp_path_for(final_path: str) -> str:
    """A local temp name for the shard: beside `final_path` when that is local, so os.replace is atomic;
    in staging_dir() when it is remote. pid + random, so that two writers never share one."""
    tag = f"{TEMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}"
    if storage.is_uri(final_path):
        os.makedirs(staging_dir(), exist_ok=True)
        return os.path.join(staging_dir(), storage.basename(final_path) + tag)
    return final_path + tag


def clean_stale_temps(directory: str | os.PathLike[str]) -> int:
    """Delete the temp files a killed run left in a local `directory` (not recursive).

    Call it before any writer of this run starts: it cannot tell a live writer's temp from a dead one's.

    Args:
        directory: the shard directory; a missing one holds nothing to clean.

    Returns:
        How many files were removed.
    """
    if not os.path.isdir(directory):
        return 0
    removed = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_file(follow_symlinks=False) and _TEMP_RE.search(entry.name):
                os.unlink(entry.path)
                removed += 1
    return removed


def clean_dead_staging() -> int:
    """Delete staged shards whose writer process is gone (a killed actor); live writers' files stay.

    Returns:
        How many files were removed.
    """
    removed = 0
    with contextlib.suppress(FileNotFoundError), os.scandir(staging_dir()) as entries:
        for entry in entries:
            m = _TEMP_RE.search(entry.name)
            if m is None or _alive(int(m.group(1))):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


_fsync_directory = storage.fsync_directory


class _HashingFile:
    """Write-only file that hashes and counts bytes on their way out, so commit() needs no re-read.

    After discard() it drops every write: abort() uses that to let tarfile/pyarrow close cleanly without
    touching the disk again (pyarrow's writer would otherwise retry its footer from __del__).
    """

    def __init__(self, path: str) -> None:
        # A 1 MiB buffer: a shard is written in ~5 KB samples, and the default 8 KiB buffer turned about
        # every sample into a write syscall (~7 us of a CPU actor's ~90 us per-image budget)
        self._file: BinaryIO = open(path, "wb", buffering=WRITE_BUFFER)  # noqa: SIM115 - closed by sync_and_close()/discard()
        self._sha256 = hashlib.sha256()
        self.size = 0
        self._discarding = False

    def write(self, data: Any) -> int:
        view = memoryview(data)  # pyarrow hands over its own buffers, not bytes
        if self._discarding:
            return view.nbytes
        self._file.write(view)
        self._sha256.update(view)
        self.size += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        if not self._discarding:
            self._file.flush()

    @property
    def closed(self) -> bool:
        return self._file.closed and not self._discarding

    def close(self) -> None:
        """A no-op: the writer that owns this object closes it with sync_and_close() or discard()."""

    def hexdigest(self) -> str:
        return self._sha256.hexdigest()

    def sync_and_close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def discard(self) -> None:
        self._discarding = True
        # close() flushes what is buffered, which fails again on a full disk; the file is deleted anyway
        with contextlib.suppress(OSError):
            self._file.close()


def _meta_json_default(value: Any) -> Any:
    if isinstance(value, np.generic):  # numpy scalars (np.int64 seeds) serialise as plain numbers
        return value.item()
    raise TypeError(f"meta value of type {type(value).__name__} is not JSON serialisable")


# One encoder for every sample: json.dumps with options builds a new JSONEncoder on each call.
_META_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=_meta_json_default)


def _as_int(meta: dict[str, Any], name: str) -> int:
    value = meta[name]
    if isinstance(value, bool):
        raise ValueError(f"meta[{name!r}] must be an integer, got {value!r}")
    try:
        return operator.index(value)  # accepts int and numpy integers, rejects floats and strings
    except TypeError:
        raise ValueError(f"meta[{name!r}] must be an integer, got {value!r}") from None


class ShardWriter(ABC):
    """Writes one shard to a local temp file; commit() moves it into place atomically (see commit()).

    The file at `final_path` appears only through commit(), complete and fsynced, so a shard that exists
    is a finished shard. Anything else (an exception inside `with`, leaving `with` without commit(), a
    failed write or commit, e.g. a full disk) deletes the temp file and never touches `final_path`.

    Example:
        with make_writer("webdataset", path, image_ext="png") as writer:
            for key, image, meta in samples:
                writer.write(key, image, meta)
            info = writer.commit()
    """

    suffix: ClassVar[str]  # file suffix of a shard, with the dot

    def __init__(
        self,
        final_path: str | os.PathLike[str],
        *,
        image_ext: str,
        file_metadata: dict[str, str] | None = None,
    ) -> None:
        """Args:
            final_path: where the committed shard goes: a local path (its directory must exist) or a URI.
            image_ext: extension of the encoded images without the dot ("png", "jpg", ...).
            file_metadata: string key/values stored once per file (run info); see each writer for where.

        Raises:
            ValueError: on a bad image_ext or file_metadata.
            OSError: if the temp file cannot be created.
        """
        if not _IMAGE_EXT_RE.match(image_ext):
            raise ValueError(f"image_ext must be letters and digits with no dot, got {image_ext!r}")
        self.file_metadata = dict(file_metadata or {})
        for k, v in self.file_metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ValueError(f"file_metadata must map str to str, got {k!r}: {type(v).__name__}")
        self.final_path = os.fspath(final_path)
        self.temp_path = temp_path_for(self.final_path)
        self.image_ext = image_ext
        self.count = 0
        self._keys: set[str] = set()
        self._state = "open"
        self._file = _HashingFile(self.temp_path)
        try:
            self._open(self._file)
        except BaseException:
            self.abort()
            raise

    @abstractmethod
    def _open(self, file: _HashingFile) -> None:
        """Start the format's stream on `file`."""

    @abstractmethod
    def _write(self, key: str, image: bytes, meta: dict[str, Any], label: int | None) -> None:
        """Append one validated sample."""

    @abstractmethod
    def _close(self) -> None:
        """Write everything still buffered and the format's trailer; must not close `file` itself."""

    def _check_sample(self, key: str, image: bytes, meta: dict[str, Any]) -> int | None:
        if self._state != "open":
            raise RuntimeError(f"writer for {self.final_path} is already {self._state}")
        if not isinstance(key, str) or not key:
            raise ValueError(f"sample key must be a non-empty string, got {key!r}")
        if "." in key or "/" in key or "\\" in key:
            # webdataset splits key from extension at the first dot, and a slash would make a directory
            raise ValueError(f"sample key {key!r} must not contain '.', '/' or '\\'")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in shard {self.final_path}")
        if not isinstance(image, (bytes, bytearray, memoryview)):
            raise ValueError(f"image for {key!r} must be encoded bytes, got {type(image).__name__}")
        missing = [name for name in REQUIRED_META if name not in meta]
        if missing:
            raise ValueError(f"meta for {key!r} lacks {', '.join(missing)}")
        for name in REQUIRED_META:
            _as_int(meta, name)
        return None if meta.get("label") is None else _as_int(meta, "label")

    def write(self, key: str, image: bytes, meta: dict[str, Any]) -> None:
        """Append one sample.

        Args:
            key: unique within the shard; non-empty, no '.', '/' or '\\'.
            image: the encoded image file's bytes.
            meta: per-sample metadata; needs integer "seed", "shard" and "index", and "label" (int or
                None, missing means None). Other JSON-serialisable entries (sampler, checkpoint, ...) are
                kept where the format allows.

        Raises:
            ValueError: on a bad key, image or meta; the writer stays usable.
            RuntimeError: after commit() or abort().
            OSError: if writing fails (e.g. disk full); the temp file is then deleted and the writer
                aborted.
        """
        label = self._check_sample(key, image, meta)
        try:
            self._write(key, bytes(image), meta, label)
        except BaseException:
            self.abort()
            raise
        self._keys.add(key)
        self.count += 1

    def commit(self) -> ShardInfo:
        """Finish the file and move it into place: locally fsync, rename to `final_path` and fsync the
        directory; for a remote `final_path`, upload the complete file as one object and check its size.

        An existing file at `final_path` is replaced; a shard is deterministic, so that is a re-run of
        the same shard.

        Returns:
            ShardInfo with the final path, sample count, size and sha256 (hashed while writing).

        Raises:
            RuntimeError: after commit() or abort().
            OSError: if any local step fails (e.g. disk full); no file is left at `final_path` or the
                temp name.
            StorageError: if the upload fails; no object is left at `final_path`.
        """
        if self._state != "open":
            raise RuntimeError(f"writer for {self.final_path} is already {self._state}")
        remote = storage.is_uri(self.final_path)
        try:
            self._close()
            self._file.sync_and_close()
            if remote:
                storage.upload_file(self.temp_path, self.final_path)
            else:
                os.replace(self.temp_path, self.final_path)
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        info = ShardInfo(self.final_path, self.count, self._file.size, self._file.hexdigest())
        if remote:
            os.unlink(self.temp_path)
            return info
        try:
            _fsync_directory(os.path.dirname(os.path.abspath(self.final_path)))
        except BaseException:
            # The rename may not survive a crash; report failure and leave nothing that looks finished.
            os.unlink(self.final_path)
            raise
        return info

    def abort(self) -> None:
        """Drop the shard: close everything and delete the temp file. Never touches `final_path`.

        Safe to call more than once, and a no-op after commit().
        """
        if self._state != "open":
            return
        self._state = "aborted"
        self._file.discard()
        # Lets tarfile/pyarrow release their state (the bytes go nowhere); the shard is being thrown away,
        # so complaints from its format writer no longer matter.
        with contextlib.suppress(Exception):
            self._close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.temp_path)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Commit is explicit: leaving the block without commit(), by exception or not, drops the shard.
        self.abort()


class WebDatasetShardWriter(ShardWriter):
    """A byte-reproducible WebDataset tar: per sample `{key}.{image_ext}`, `{key}.json` (meta with sorted
    keys) and `{key}.cls` (the label as decimal text) when labelled, in that order.

    Every member has mtime TAR_MTIME, mode 0o444, uid/gid 0 and empty owner names. file_metadata, if any,
    goes in a pax global header as the standard `comment` record (JSON), which tar tools and webdataset
    skip: read it with `tarfile.open(path).pax_headers["comment"]`.
    """

    suffix = ".tar"

    def _open(self, file: _HashingFile) -> None:
        self._out = file
        self._offset = 0
        if self.file_metadata:
            pax = {"comment": json.dumps(self.file_metadata, sort_keys=True)}
            self._emit(tarfile.TarInfo.create_pax_global_header(pax))

    def _emit(self, data: bytes) -> None:
        self._out.write(data)
        self._offset += len(data)

    @staticmethod
    def _member(name: str, data: bytes) -> bytes:
        """One tar member: header, data, zero padding to the next 512-byte block."""
        pad = -len(data) % tarfile.BLOCKSIZE
        return b"".join((_member_header(name, len(data)), data, tarfile.NUL * pad))

    def _write(self, key: str, image: bytes, meta: dict[str, Any], label: int | None) -> None:
        meta_json = _META_ENCODER.encode(meta)
        members = [
            self._member(f"{key}.{self.image_ext}", image),
            self._member(f"{key}.json", meta_json.encode()),
        ]
        if label is not None:
            members.append(self._member(f"{key}.cls", str(label).encode()))
        self._emit(b"".join(members))  # one write and one hash update a sample, not one per piece

    def _close(self) -> None:
        # tarfile's end of archive: two zero blocks, then zeros up to a whole 10 KiB record
        self._emit(tarfile.NUL * (2 * tarfile.BLOCKSIZE))
        if self._offset % tarfile.RECORDSIZE:
            self._emit(tarfile.NUL * (tarfile.RECORDSIZE - self._offset % tarfile.RECORDSIZE))


# The constant fields of a ustar member header as tarfile writes them for TAR_MODE/TAR_MTIME, uid/gid 0,
# empty owner names; see _member_header.
_USTAR_MODE = b"%07o\0" % TAR_MODE
_USTAR_IDS = b"0000000\0" * 2  # uid, gid
_USTAR_MTIME = b"%011o\0" % TAR_MTIME
_USTAR_TAIL = tarfile.NUL * 100 + tarfile.POSIX_MAGIC  # linkname, magic; owner names, device, prefix: NUL
_USTAR_PAD = tarfile.NUL * (tarfile.BLOCKSIZE - 257 - len(tarfile.POSIX_MAGIC))
# The header checksum is the byte sum with the checksum field read as 8 spaces; everything but the name
# and the size is constant, so only those two are summed per member.
_USTAR_CONST_SUM = sum(_USTAR_MODE + _USTAR_IDS + _USTAR_MTIME + b" " * 8 + tarfile.REGTYPE + _USTAR_TAIL)


def _member_header(name: str, size: int) -> bytes:
    """The 512-byte header tarfile writes in PAX format for a regular file with vaeforge's fixed
    attributes: built directly, because tarfile.addfile costs ~110-160 us a member, about 1.5% of a CPU
    actor's time per image, and this costs ~2 us. Names that plain ustar cannot hold (over 100 bytes,
    or not ASCII) and huge sizes take tarfile's own path, which adds pax records. test_writers checks
    that both paths give tarfile's bytes."""
    raw = name.encode("ascii", "surrogateescape") if name.isascii() else b""
    if not raw or len(raw) > 100 or size >= 8**11:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, TAR_MTIME, TAR_MODE
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    size_field = b"%011o\0" % size
    chksum = _USTAR_CONST_SUM + sum(raw) + sum(size_field)
    return b"".join(
        (
            raw.ljust(100, tarfile.NUL),
            _USTAR_MODE,
            _USTAR_IDS,
            size_field,
            _USTAR_MTIME,
            b"%06o\0 " % chksum,
            tarfile.REGTYPE,
            _USTAR_TAIL,
            _USTAR_PAD,
        )
    )


IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
PARQUET_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("image", IMAGE_TYPE, nullable=False),
        pa.field("label", pa.int64()),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("shard", pa.int64(), nullable=False),
        pa.field("index", pa.int64(), nullable=False),
    ]
)


def _hf_features() -> str:
    """How Hugging Face `datasets` records features in a parquet file, so it decodes `image` as images."""
    value = {"dtype": "int64", "_type": "Value"}
    features = {
        "key": {"dtype": "string", "_type": "Value"},
        "image": {"_type": "Image"},
        "label": value,
        "seed": value,
        "shard": value,
        "index": value,
    }
    return json.dumps({"info": {"features": features}})


# Image files that are compressed already: zstd over 5,000 seed64 PNGs saved 0.0% (16,205,180 bytes
# against 16,204,705 without it) and cost ~2 us a row, so their column is stored as is. Raw .npy is not.
COMPRESSED_IMAGE_EXTS = frozenset({"png", "jpg", "webp"})


def parquet_compression(image_ext: str) -> dict[str, str]:
    """Codec per leaf column: zstd everywhere, except image bytes that are compressed files already."""
    leaves = [
        leaf.name
        for field in PARQUET_SCHEMA
        for leaf in (field.flatten() if pa.types.is_struct(field.type) else [field])
    ]  # "image.bytes", "image.path" for the struct
    codecs = dict.fromkeys(leaves, "zstd")
    if image_ext in COMPRESSED_IMAGE_EXTS:
        codecs["image.bytes"] = "none"
    return codecs


# The columns are assembled from buffers rather than with pa.array(): every pa.array() call first asks
# whether its input is a pandas object, and that imports pandas (~300 modules, ~0.35 s of CPU and tens
# of MB in each actor, measured) although no pandas object is ever passed.
def _binary_array(values: Sequence[bytes], type_: pa.DataType) -> pa.Array:
    """A binary or (utf-8 bytes given) string array of `values`, none null."""
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum([len(v) for v in values], out=offsets[1:])
    return pa.Array.from_buffers(
        type_, len(values), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(values))]
    )


def _int64_array(values: Sequence[int | None]) -> pa.Array:
    """An int64 array of `values`, with a validity bitmap when any is None."""
    valid = np.array([v is not None for v in values], dtype=bool)
    data = np.array([0 if v is None else v for v in values], dtype=np.int64)
    bitmap = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.Array.from_buffers(pa.int64(), len(values), [bitmap, pa.py_buffer(data)])


class ParquetShardWriter(ShardWriter):
    """One Parquet file per shard with exactly the columns of PARQUET_SCHEMA, zstd-compressed (but for
    image bytes that are compressed files already, see parquet_compression).

    `image` is the Hugging Face Image struct {bytes, path="{key}.{image_ext}"}, and the schema carries
    the `huggingface` features key so `datasets` decodes it. file_metadata goes into the schema's
    key/value metadata. Rows are buffered and written in row groups of `row_group_rows` rows or about
    `row_group_bytes` of image data, whichever comes first.
    """

    suffix = ".parquet"

    def __init__(
        self,
        final_path: str | os.PathLike[str],
        *,
        image_ext: str,
        file_metadata: dict[str, str] | None = None,
        row_group_rows: int = ROW_GROUP_ROWS,
        row_group_bytes: int = ROW_GROUP_BYTES,
    ) -> None:
        """Args:
            final_path, image_ext, file_metadata: as for ShardWriter.
            row_group_rows: most rows in one row group.
            row_group_bytes: a row group is cut once its image bytes reach this.

        Raises:
            ValueError: on bad arguments, or file_metadata using the reserved key "huggingface".
            OSError: if the temp file cannot be created.
        """
        if row_group_rows < 1 or row_group_bytes < 1:
            raise ValueError("row_group_rows and row_group_bytes must be positive")
        if file_metadata and "huggingface" in file_metadata:
            raise ValueError('file_metadata key "huggingface" is reserved for the features description')
        self.row_group_rows = row_group_rows
        self.row_group_bytes = row_group_bytes
        self._rows: list[tuple[str, bytes, int | None, int, int, int]] = []
        self._buffered_bytes = 0
        super().__init__(final_path, image_ext=image_ext, file_metadata=file_metadata)

    def _open(self, file: _HashingFile) -> None:
        schema = PARQUET_SCHEMA.with_metadata({**self.file_metadata, "huggingface": _hf_features()})
        self._pq = pq.ParquetWriter(
            file, schema, compression=parquet_compression(self.image_ext), write_statistics=True
        )

    def _write(self, key: str, image: bytes, meta: dict[str, Any], label: int | None) -> None:
        row = (key, image, label, _as_int(meta, "seed"), _as_int(meta, "shard"), _as_int(meta, "index"))
        self._rows.append(row)
        self._buffered_bytes += len(image)
        if len(self._rows) >= self.row_group_rows or self._buffered_bytes >= self.row_group_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        keys, images, labels, seeds, shards, indices = zip(*self._rows, strict=True)
        paths = [f"{k}.{self.image_ext}" for k in keys]
        image_col = pa.StructArray.from_arrays(
            [_binary_array(images, pa.binary()), _binary_array([p.encode() for p in paths], pa.string())],
            fields=list(IMAGE_TYPE),
        )
        columns = [
            _binary_array([k.encode() for k in keys], pa.string()),
            image_col,
            _int64_array(labels),
            _int64_array(seeds),
            _int64_array(shards),
            _int64_array(indices),
        ]
        table = pa.Table.from_arrays(columns, schema=self._pq.schema)
        self._rows, self._buffered_bytes = [], 0
        self._pq.write_table(table, row_group_size=table.num_rows)  # one flush is one row group

    def _close(self) -> None:
        try:
            self._flush()
        finally:
            self._pq.close()


WRITERS: dict[str, type[ShardWriter]] = {
    "webdataset": WebDatasetShardWriter,
    "parquet": ParquetShardWriter,
}


def writer_class(format: str) -> type[ShardWriter]:
    """Raises:
    ValueError: if `format` is not a key of WRITERS; the message lists the valid names.
    """
    try:
        return WRITERS[format]
    except KeyError:
        raise ValueError(
            f"unknown output format {format!r}; valid formats: {', '.join(sorted(WRITERS))}"
        ) from None


def shard_name(prefix: str, index: int, format: str) -> str:
    """File name of shard `index`: "{prefix}-{index:06d}.tar" or ".parquet".

    Raises:
        ValueError: on an unknown format or a negative index.
    """
    if index < 0:
        raise ValueError(f"shard index must be >= 0, got {index}")
    return f"{prefix}-{index:06d}{writer_class(format).suffix}"


def make_writer(
    format: str,
    final_path: str | os.PathLike[str],
    *,
    image_ext: str,
    file_metadata: dict[str, str] | None = None,
) -> ShardWriter:
    """Open a writer for one shard of the given output format (a key of WRITERS).

    Raises:
        ValueError: on an unknown format (listing the valid ones) or bad arguments.
        OSError: if the temp file cannot be created.
    """
    return writer_class(format)(final_path, image_ext=image_ext, file_metadata=file_metadata)
