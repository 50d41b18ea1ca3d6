"""WebDataset source: .tar shards streamed, members grouped into samples by key, labels from .cls/.json."""

from __future__ import annotations

import json
import re
import tarfile
import zlib
from collections.abc import Iterator
from functools import cached_property

from vaeforge.data.base import EncodedSource
from vaeforge.data.decode import Record, SkipTally
from vaeforge.data.files import find_files, open_input, stamp_digest
from vaeforge.storage import Entry

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")  # priority order when a sample has several
LABEL_FIELDS = ("cls", "json")
JSON_LABEL_KEYS = ("label", "class", "cls")
# webdataset's own rule: key = path up to the first dot of the basename, field = the rest
_KEY_FIELD = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


class _EndAwareTarInfo(tarfile.TarInfo):
    """Remembers why tarfile stopped: it ends quietly on a cut or garbled header after the first member,
    and only a zero block (EOFHeaderError) is a real end of archive."""

    @classmethod
    def fromtarfile(cls, archive: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(archive)
        except tarfile.HeaderError as e:
            archive.vaeforge_stop = e  # type: ignore[attr-defined]
            raise


def ended_cleanly(archive: tarfile.TarFile) -> bool:
    return isinstance(getattr(archive, "vaeforge_stop", None), tarfile.EOFHeaderError)


def split_member(name: str) -> tuple[str, str] | None:
    """'dir/000123.seg.png' -> ('dir/000123', 'seg.png'); None for names without a field."""
    m = _KEY_FIELD.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


def parse_label(fields: dict[str, bytes]) -> int | str | None:
    """Label from .cls (an integer as text, else the text) or a .json object's label/class/cls field."""
    if "cls" in fields:
        text = fields["cls"].decode("utf-8", "replace").strip()
        try:
            return int(text)
        except ValueError:
            return text or None
    if "json" in fields:
        try:
            meta = json.loads(fields["json"])
        except ValueError:
            return None  # a broken sidecar costs the label, not the image
        if isinstance(meta, dict):
            for k in JSON_LABEL_KEYS:
                value = meta.get(k)
                if isinstance(value, (int, str)) and not isinstance(value, bool):
                    return value
    return None


class WebDatasetSource(EncodedSource):
    """Shards given as one .tar, a folder of them, a glob (data/*.tar) or braces (shard-{000..009}.tar)."""

    kind = "webdataset"

    @cached_property
    def _shards_and_missing(self) -> tuple[list[Entry], list[str]]:
        return find_files(self.target, SHARD_SUFFIXES, ".tar shards")

    @property
    def shards(self) -> list[str]:
        return [e.location for e in self._shards_and_missing[0]]

    def fingerprint(self) -> str:
        return stamp_digest(self._shards_and_missing[0]) + ",".join(self._shards_and_missing[1])

    def file_count(self) -> int:
        return len(self.shards)

    def records(self, tally: SkipTally) -> Iterator[Record]:
        for name in self._shards_and_missing[1]:
            tally.add("missing_file", name)  # a hole in a brace range: worth reporting, not worth stopping
        for shard in self.shards:
            yield from self._shard_records(shard, tally)

    def _shard_records(self, shard: str, tally: SkipTally) -> Iterator[Record]:
        """Samples of one shard in member order. A corrupt tail keeps every sample read before it."""
        try:
            stream = open_input(shard)
        except OSError:
            tally.add("unreadable_file", shard)
            return
        try:
            # streaming mode: no seeks, no member index; closed by the `with` below
            archive = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndAwareTarInfo)  # noqa: SIM115
        except _READ_ERRORS:
            stream.close()
            tally.add("unreadable_file", shard)
            return
        key: str | None = None
        fields: dict[str, bytes] = {}
        try:
            with stream, archive:
                for member in archive:
                    parts = split_member(member.name) if member.isfile() else None
                    if parts is None:
                        continue
                    if parts[0] != key:
                        yield from self._sample(shard, key, fields, tally)
                        key, fields = parts[0], {}
                    if parts[1] in IMAGE_FIELDS or parts[1] in LABEL_FIELDS:
                        fields[parts[1]] = archive.extractfile(member).read()  # type: ignore[union-attr]
                if not ended_cleanly(archive):
                    raise tarfile.ReadError("archive ends without its end-of-archive blocks")
        except _READ_ERRORS:
            tally.add("truncated_shard", shard)
            if key is None or not any(f in fields for f in IMAGE_FIELDS):
                return  # the cut went through this sample's image: nothing left to keep
        yield from self._sample(shard, key, fields, tally)

    @staticmethod
    def _sample(shard: str, key: str | None, fields: dict[str, bytes], tally: SkipTally) -> Iterator[Record]:
        """The sample's Record (zero or one): a key with no image member is counted, not decoded."""
        if key is None:
            return
        image = next((fields[f] for f in IMAGE_FIELDS if f in fields), None)
        if image is None:
            tally.add("missing_image", f"{shard}:{key}")
            return
        yield Record(key=f"{shard}:{key}", label=parse_label(fields), data=image)
