"""Parquet source: an image column (raw bytes or the HF {bytes, path} struct) read in bounded batches."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vaeforge import storage
from vaeforge.data.base import EncodedSource
from vaeforge.data.decode import CHUNK_ITEMS, Record, SkipTally
from vaeforge.data.files import DataError, find_files, open_input, stamp_digest
from vaeforge.storage import Entry

IMAGE_COLUMN_NAMES = ("image", "img")
LABEL_COLUMN_NAMES = ("label", "labels", "class")
_READ_ERRORS = (pa.ArrowException, OSError, ValueError)


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)


def _is_image_type(t: pa.DataType) -> bool:
    """Raw encoded bytes, or a struct with a binary `bytes` field (how Hugging Face stores Image())."""
    if _is_binary(t):
        return True
    return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and _is_binary(t.field("bytes").type)


def _is_label_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)


def _describe(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name} ({f.type})" for f in schema)


@dataclass(frozen=True)
class Columns:
    image: str
    label: str | None


def pick_columns(schema: pa.Schema, where: str, image: str | None, label: str | None) -> Columns:
    """Image and label columns: the overrides if given (validated), else auto-detected by name, then type."""
    types = {f.name: f.type for f in schema}
    if image is not None:
        if image not in types or not _is_image_type(types[image]):
            raise DataError(
                f"image column {image!r} in {where} is missing or not binary / {{bytes, path}}; "
                f"columns found: {_describe(schema)}"
            )
    else:
        named = [n for n in IMAGE_COLUMN_NAMES if n in types and _is_image_type(types[n])]
        typed = [f.name for f in schema if _is_image_type(f.type)]
        if not (named or typed):
            raise DataError(
                f"{where} has no image column (binary, or a {{bytes, path}} struct); columns found: "
                f"{_describe(schema)}; pass image_column=NAME"
            )
        image = (named or typed)[0]
    if label is not None:
        if label not in types or not _is_label_type(types[label]):
            raise DataError(
                f"label column {label!r} in {where} is missing or not int / string; "
                f"columns found: {_describe(schema)}"
            )
    else:
        label = next((n for n in LABEL_COLUMN_NAMES if n in types and _is_label_type(types[n])), None)
    return Columns(image, label)


def _hf_class_names(schema: pa.Schema, label: str) -> list[str] | None:
    """ClassLabel names that Hugging Face `datasets` stores in the schema metadata, if any."""
    raw = (schema.metadata or {}).get(b"huggingface")
    try:
        feature = json.loads(raw)["info"]["features"][label] if raw else None
    except (ValueError, KeyError, TypeError):
        return None
    if (
        isinstance(feature, dict)
        and feature.get("_type") == "ClassLabel"
        and isinstance(feature.get("names"), list)
    ):
        return [str(n) for n in feature["names"]]
    return None


@dataclass
class _Scan:
    """What one pass over the footers (and the label column only) tells us before decoding."""

    rows: int
    class_names: list[str] | None


def _label_values(pf: pq.ParquetFile, label: str) -> tuple[set[int], set[str]]:
    """Distinct (int, string) labels of one file, reading only the label column."""
    ints: set[int] = set()
    texts: set[str] = set()
    for batch in pf.iter_batches(batch_size=65536, columns=[label]):
        column = batch.column(0)
        if pa.types.is_integer(column.type):
            ints.update(pc.unique(column.drop_null()).to_pylist())
        else:
            texts.update(pc.unique(column.cast(pa.string()).drop_null()).to_pylist())
    return ints, texts


class ParquetSource(EncodedSource):
    """One .parquet file, a folder of them, or a glob; read with iter_batches so memory stays bounded."""

    kind = "parquet"

    @cached_property
    def _entries(self) -> list[Entry]:
        return find_files(self.target, (".parquet",), ".parquet files")[0]

    @property
    def files(self) -> list[str]:
        return [e.location for e in self._entries]

    def fingerprint(self) -> str:
        return stamp_digest(self._entries)

    def file_count(self) -> int:
        return len(self.files)

    def _columns(self, schema: pa.Schema, path: str) -> Columns:
        return pick_columns(schema, path, self.options.image_column, self.options.label_column)

    @cached_property
    def _scan(self) -> _Scan:
        """Total rows and the full class list, so class indices never depend on max_samples.

        Also validates every file's columns up front: a schema problem fails before any decoding.
        """
        rows, ints, texts, hf_names = 0, set(), set(), None
        for path in self.files:
            try:
                with open_input(path, seekable=True) as f:
                    pf = pq.ParquetFile(f)
                    columns = self._columns(pf.schema_arrow, path)
                    rows += pf.metadata.num_rows
                    if columns.label is not None:
                        hf_names = hf_names or _hf_class_names(pf.schema_arrow, columns.label)
                        file_ints, file_texts = _label_values(pf, columns.label)
                        ints |= file_ints
                        texts |= file_texts
            except _READ_ERRORS:
                continue  # counted as unreadable when records() gets there
        if texts:
            names = sorted(texts | {str(i) for i in ints})
        else:
            known = hf_names or []
            names = known + [str(i) for i in range(len(known), max(ints, default=-1) + 1)]
        return _Scan(rows, names or None)

    def size_hint(self) -> int:
        return self._scan.rows

    def known_class_names(self) -> list[str] | None:
        return self._scan.class_names

    def records(self, tally: SkipTally) -> Iterator[Record]:
        for path in self.files:
            yield from self._file_records(path, tally)

    def _file_records(self, path: str, tally: SkipTally) -> Iterator[Record]:
        try:
            stream = open_input(path, seekable=True)  # parquet reads its footer first
        except OSError:
            tally.add("unreadable_file", path)
            return
        try:
            pf = pq.ParquetFile(stream)
        except _READ_ERRORS:
            stream.close()
            tally.add("unreadable_file", path)
            return
        with stream:
            columns = self._columns(pf.schema_arrow, path)  # a file without the columns is a user error
            wanted = [columns.image] + ([columns.label] if columns.label else [])
            row = 0
            try:
                for batch in pf.iter_batches(batch_size=CHUNK_ITEMS, columns=wanted):
                    labels = batch.column(1).to_pylist() if columns.label else [None] * batch.num_rows
                    yield from _batch_records(batch.column(0), labels, path, row)
                    row += batch.num_rows
            except _READ_ERRORS:
                tally.add("truncated_shard", path)


def _batch_records(images: pa.Array, labels: list, path: str, first_row: int) -> Iterator[Record]:
    """Records of one batch. A struct whose bytes are null but whose path is set points at a file
    relative to the parquet file, as Hugging Face writes for non-embedded images."""
    if pa.types.is_struct(images.type):
        data = images.field("bytes").to_pylist()
        has_path = images.type.get_field_index("path") >= 0
        paths = images.field("path").to_pylist() if has_path else [None] * len(data)
    else:
        data, paths = images.to_pylist(), [None] * len(images)
    for i, (blob, ref) in enumerate(zip(data, paths, strict=True)):
        key = f"{path}:{first_row + i}"
        if blob is None and ref:
            yield Record(key=key, label=labels[i], path=storage.join(storage.parent(path), ref))
        else:
            yield Record(key=key, label=labels[i], data=blob or b"")
