"""Tests for vaeforge.data: every source, every bad-file kind, colour handling, cache, parallel decoding."""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vaeforge.data import (
    SHAPES,
    SOURCES,
    DataError,
    SkipImage,
    decode_image,
    generate_shapes,
    load_images,
    resolve,
)
from vaeforge.data import builtin as builtin_module
from vaeforge.data import decode as decode_module
from vaeforge.errors import UserError

RED, GREEN, BLUE = (220, 20, 20), (20, 200, 20), (20, 20, 220)


# ---------------------------------------------------------------- helpers that build test inputs


def encode(im: Image.Image | np.ndarray, fmt: str = "PNG", **kwargs: object) -> bytes:
    if isinstance(im, np.ndarray):
        im = Image.fromarray(im)
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (16, 16)) -> Image.Image:
    return Image.new("RGB", size, colour)


def noise(seed: int, size: int = 32) -> np.ndarray:
    """Incompressible pixels: encoded files are large enough to cut in the middle of the data."""
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A WebDataset shard: members key.field in sample order, as webdataset's TarWriter lays them out."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, fields in samples:
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))
    return path


def bad_files() -> dict[str, tuple[str, bytes]]:
    """One file per skip reason: name -> (expected reason, bytes)."""
    png = encode(noise(1))
    mid = len(png) // 2
    flipped = png[:mid] + bytes(b ^ 0xFF for b in png[mid : mid + 50]) + png[mid + 50 :]
    huge = Image.new("L", (1, 1))
    huge_png = encode(huge)
    # rewrite IHDR width/height to 100000 x 100000; fix the CRC so only the size is "wrong"
    ihdr = b"IHDR" + struct.pack(">II", 100_000, 100_000) + huge_png[24:29]
    bomb = huge_png[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + huge_png[33:]
    return {
        "empty.png": ("empty", b""),
        "text.jpg": ("not_image", b"this is not an image, just some text\n" * 4),
        "trunc.jpg": ("truncated", encode(noise(2), "JPEG")[:400]),
        "trunc.png": ("truncated", png[: len(png) // 2]),
        "corrupt.png": ("corrupt", flipped),
        "bomb.png": ("decompression_bomb", bomb),
    }


def load(data: object, **kwargs: object):
    """load_images with fast test defaults: tiny images, in-process decoding, no cache."""
    options = {"image_size": 8, "num_workers": 1, "use_cache": False, **kwargs}
    return load_images(str(data), **options)


@pytest.fixture
def labeled_folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    write(root / "cat" / "a.png", encode(solid(RED)))
    write(root / "cat" / "deep" / "b.jpg", encode(solid(RED), "JPEG"))
    write(root / "dog" / "c.png", encode(solid(BLUE)))
    write(root / "root.png", encode(solid(GREEN)))
    write(root / ".hidden" / "x.png", encode(solid(GREEN)))  # tool litter: ignored
    write(root / "notes.txt", b"not an image extension: ignored")
    return root


# ---------------------------------------------------------------- folder source


def test_folder_labels_from_first_level_subfolders(labeled_folder: Path) -> None:
    out = load(labeled_folder)
    assert out.images.shape == (4, 8, 8, 3) and out.images.dtype == np.uint8
    assert out.images.flags.c_contiguous
    assert out.class_names == ["cat", "dog"]
    assert out.labels.tolist() == [0, 0, 1, -1]  # cat/a, cat/deep/b, dog/c, root.png (unlabeled)
    assert out.labels.dtype == np.int64
    # each image's key is its file's absolute path, in the same order as the images
    names = ["cat/a.png", "cat/deep/b.jpg", "dog/c.png", "root.png"]
    assert out.keys == [str((labeled_folder / n).resolve()) for n in names]
    r = out.report
    assert (r["kind"], r["files"], r["images"], r["labeled"]) == ("folder", 4, 4, True)
    assert r["classes"] == ["cat", "dog"] and r["skipped"] == {}
    json.dumps(r)  # the report must be JSON-serialisable


def test_folder_without_subfolders_is_unlabeled(tmp_path: Path) -> None:
    for i in range(3):
        write(tmp_path / f"{i}.png", encode(solid(RED)))
    out = load(tmp_path)
    assert out.labels.tolist() == [-1, -1, -1]
    assert out.class_names == [] and out.report["labeled"] is False


def test_every_extension_in_any_case(tmp_path: Path) -> None:
    formats = {
        "a.jpg": "JPEG",
        "b.JPEG": "JPEG",
        "c.png": "PNG",
        "d.webp": "WEBP",
        "e.Bmp": "BMP",
        "f.GIF": "GIF",
    }
    for name, fmt in formats.items():
        write(tmp_path / name, encode(solid(BLUE), fmt))
    out = load(tmp_path)
    assert out.report["images"] == len(formats)
    assert (out.images[..., 2] > 150).all()  # all blue


def test_explicit_prefix_and_unknown_prefix(labeled_folder: Path) -> None:
    assert resolve(f"folder:{labeled_folder}") == ("folder", str(labeled_folder))
    assert load(f"folder:{labeled_folder}").report["images"] == 4
    with pytest.raises(DataError, match="unknown data source 'ftp'.*builtin, folder, parquet, webdataset"):
        load("ftp:somewhere")
    assert set(SOURCES) == {"folder", "webdataset", "parquet", "builtin"}


def test_missing_path_and_empty_folder_raise(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data path not found"):
        load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no images found under .*\.jpg"):
        load(tmp_path / "empty")
    with pytest.raises(DataError, match="no .tar shards"):
        load(tmp_path / "empty" / "*.tar")
    assert issubclass(DataError, UserError)


# ---------------------------------------------------------------- bad files


def test_each_bad_file_is_skipped_with_its_reason(tmp_path: Path) -> None:
    write(tmp_path / "good.png", encode(solid(GREEN)))
    expected: dict[str, int] = {}
    for name, (reason, data) in bad_files().items():
        write(tmp_path / name, data)
        expected[reason] = expected.get(reason, 0) + 1
    out = load(tmp_path)
    assert out.report["images"] == 1 and out.report["files"] == 7
    assert out.report["skipped"] == expected
    examples = out.report["skipped_examples"]
    assert any(p.endswith("bomb.png") for p in examples["decompression_bomb"])
    assert any(p.endswith("empty.png") for p in examples["empty"])


def test_max_pixels_limit_skips_large_images(tmp_path: Path) -> None:
    write(tmp_path / "big.png", encode(solid(RED, (40, 40))))
    write(tmp_path / "small.png", encode(solid(RED, (10, 10))))
    out = load(tmp_path, max_pixels=1000)
    assert out.report["images"] == 1 and out.report["skipped"] == {"decompression_bomb": 1}


def test_nothing_usable_raises_with_counts(tmp_path: Path) -> None:
    files = bad_files()
    for name in ("empty.png", "corrupt.png", "text.jpg"):
        write(tmp_path / name, files[name][1])
    with pytest.raises(DataError, match="no usable images in .*1 corrupt, 1 empty, 1 not_image"):
        load(tmp_path)


def test_decode_image_reasons_directly() -> None:
    for _, (reason, data) in bad_files().items():
        with pytest.raises(SkipImage) as info:
            decode_image(data, 8)
        assert info.value.reason == reason


# ---------------------------------------------------------------- colour handling


def test_exif_orientation_is_applied() -> None:
    im = Image.new("RGB", (40, 20), RED)
    im.paste(BLUE, (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: the left edge becomes the top
    out = decode_image(encode(im, "JPEG", exif=exif, quality=95), 16)
    assert out.shape == (16, 16, 3)
    top, bottom = out[2, 8].astype(int), out[13, 8].astype(int)
    assert top[0] > 150 > top[2], top  # red on top
    assert bottom[2] > 150 > bottom[0], bottom  # blue at the bottom
    plain = decode_image(encode(im, "JPEG", quality=95), 16)  # without the tag: red left, blue right
    assert plain[8, 2, 0] > 150 and plain[8, 13, 2] > 150


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_become_white(mode: str) -> None:
    rgba = Image.new("RGBA", (12, 12), (0, 0, 0, 0))
    rgba.paste((200, 0, 0, 255), (0, 0, 12, 6))  # opaque top half
    if mode == "P":
        im = Image.new("P", (12, 12), 0)
        im.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
        im.paste(1, (0, 0, 12, 6))
        data = encode(im, transparency=0)
    else:
        data = encode(rgba.convert(mode))
    out = decode_image(data, 12)
    assert (out[8:] == 255).all()  # the transparent (black) half is white, not black
    assert out[2, 2, 0] > 100 or mode == "LA"


@pytest.mark.parametrize(("value", "expected"), [(32768, 128), (65535, 255), (257, 1), (0, 0)])
def test_16bit_grayscale_is_scaled_not_clipped(value: int, expected: int) -> None:
    data = encode(Image.fromarray(np.full((10, 10), value, dtype=np.uint16)))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode_image(data, 10)
    assert abs(int(out.mean()) - expected) <= 1, out[0, 0]


def test_float_image_in_unit_range_is_scaled() -> None:
    data = encode(Image.fromarray(np.full((6, 6), 0.5, dtype=np.float32)), "TIFF")
    assert abs(int(decode_image(data, 6).mean()) - 128) <= 1


@pytest.mark.parametrize("mode", ["L", "1", "CMYK"])
def test_other_modes_become_rgb(mode: str) -> None:
    data = encode(solid(GREEN).convert(mode), "TIFF" if mode == "CMYK" else "PNG")
    assert decode_image(data, 4).shape == (4, 4, 3)


def test_center_crop_then_resize() -> None:
    im = Image.new("RGB", (60, 20), RED)
    im.paste(GREEN, (20, 0, 40, 20))  # the centre square is green
    out = decode_image(encode(im), 8)
    assert out.shape == (8, 8, 3)
    assert (out[..., 1] > 150).all() and (out[..., 0] < 60).all()
    tall = decode_image(encode(solid(BLUE, (10, 50))), 32)  # upscaling works too
    assert tall.shape == (32, 32, 3)


def test_max_samples_counts_usable_images(tmp_path: Path) -> None:
    write(tmp_path / "0_empty.png", b"")
    write(tmp_path / "1_text.png", b"text")
    for i, colour in enumerate((RED, GREEN, BLUE)):
        write(tmp_path / f"{i + 2}.png", encode(solid(colour)))
    out = load(tmp_path, max_samples=2)
    assert len(out.images) == 2 and out.report["skipped"] == {"empty": 1, "not_image": 1}
    assert [Path(k).name for k in out.keys] == ["2.png", "3.png"]  # skipped files have no key
    assert out.images[0, 0, 0, 0] > 150 and out.images[1, 0, 0, 1] > 150  # red, then green


# ---------------------------------------------------------------- webdataset source


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    root = tmp_path / "wds"
    for s in range(3):
        samples = [
            (f"{s:02d}{i:04d}", {"png": encode(solid(RED if i % 2 else BLUE)), "cls": str(i % 2).encode()})
            for i in range(4)
        ]
        make_tar(root / f"shard-{s:06d}.tar", samples)
    return root


@pytest.mark.parametrize(
    ("pattern", "count"),
    [("shard-000001.tar", 4), ("*.tar", 12), ("shard-{000000..000002}.tar", 12), ("", 12)],
)
def test_webdataset_path_glob_brace_and_folder(shards: Path, pattern: str, count: int) -> None:
    out = load(shards / pattern if pattern else shards)
    assert out.report["kind"] == "webdataset" and out.report["images"] == count
    assert out.class_names == ["0", "1"]
    assert out.labels.tolist() == [0, 1, 0, 1] * (count // 4)
    assert (out.images[1, ..., 0] > 150).all() and (out.images[0, ..., 2] > 150).all()  # label 1 is red


def test_webdataset_json_labels_and_missing_image(tmp_path: Path) -> None:
    samples = [
        ("a/x", {"json": json.dumps({"label": "zebra"}).encode(), "jpg": encode(solid(RED), "JPEG")}),
        ("a/y", {"webp": encode(solid(RED), "WEBP"), "json": json.dumps({"class": "ant"}).encode()}),
        ("a/z", {"txt": b"a caption but no image"}),
        ("a/w", {"png": encode(solid(RED))}),  # unlabeled
    ]
    out = load(make_tar(tmp_path / "one.tar", samples))
    assert out.class_names == ["ant", "zebra"]
    assert out.labels.tolist() == [1, 0, -1]
    assert out.report["skipped"] == {"missing_image": 1}
    shard = str((tmp_path / "one.tar").resolve())
    assert out.keys == [f"{shard}:a/x", f"{shard}:a/y", f"{shard}:a/w"]


@pytest.mark.parametrize("fraction", [0.55, 0.6])  # inside a member's data / exactly between members
def test_webdataset_truncated_and_unreadable_shards(tmp_path: Path, fraction: float) -> None:
    samples = [(f"{i:04d}", {"png": encode(noise(i)), "cls": b"0"}) for i in range(6)]
    full = make_tar(tmp_path / "full.tar", samples).read_bytes()
    cut = write(tmp_path / "shards" / "a-cut.tar", full[: int(len(full) * fraction)])
    write(tmp_path / "shards" / "b-garbage.tar", b"definitely not a tar archive" * 40)
    out = load(tmp_path / "shards" / "*.tar")
    assert 4 <= out.report["images"] < 6  # everything before the cut is kept
    assert out.report["skipped"] == {"truncated_shard": 1, "unreadable_file": 1}
    assert out.report["skipped_examples"]["truncated_shard"] == [str(cut.resolve())]
    assert out.report["files"] == 2


def test_brace_pattern_with_missing_shard(shards: Path) -> None:
    out = load(shards / "shard-{000000..000003}.tar")
    assert out.report["images"] == 12 and out.report["skipped"] == {"missing_file": 1}


# ---------------------------------------------------------------- parquet source


def write_parquet(path: Path, table: pa.Table) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=3)
    return path


def test_parquet_raw_bytes_with_int_labels(tmp_path: Path) -> None:
    table = pa.table(
        {
            "id": pa.array(range(5)),
            "img": pa.array([encode(solid(RED)) for _ in range(4)] + [b""], pa.binary()),
            "label": pa.array([2, 0, 2, 1, 0], pa.int64()),
        }
    )
    out = load(write_parquet(tmp_path / "t.parquet", table))
    assert out.report["kind"] == "parquet" and out.report["images"] == 4
    assert out.labels.tolist() == [2, 0, 2, 1]
    assert out.class_names == ["0", "1", "2"]
    assert [k.rsplit(":", 1)[1] for k in out.keys] == ["0", "1", "2", "3"]  # file:row
    assert out.report["skipped"] == {"empty": 1}


def test_parquet_hf_struct_with_string_labels_in_a_folder(tmp_path: Path) -> None:
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for part, names in enumerate((["dog", "cat"], ["bird", "cat"])):
        rows = [{"bytes": encode(solid(GREEN), "JPEG"), "path": f"{n}.jpg"} for n in names]
        table = pa.table({"image": pa.array(rows, struct), "label": pa.array(names)})
        write_parquet(tmp_path / "pq" / f"part-{part}.parquet", table)
    out = load(tmp_path / "pq")  # a folder holding only .parquet files
    assert out.report["kind"] == "parquet" and out.report["files"] == 2
    assert out.class_names == ["bird", "cat", "dog"]
    assert out.labels.tolist() == [2, 1, 0, 1]
    assert (out.images[..., 1] > 150).all()
    # class indices come from all files, not from the images kept: max_samples does not change them
    assert load(tmp_path / "pq", max_samples=1).class_names == ["bird", "cat", "dog"]


def test_parquet_column_overrides_and_glob(tmp_path: Path) -> None:
    table = pa.table(
        {
            "thumb": pa.array([encode(solid(RED))] * 2, pa.binary()),
            "photo": pa.array([encode(solid(BLUE))] * 2, pa.large_binary()),
            "label": pa.array([0, 1]),
            "kind": pa.array(["b", "a"]),
        }
    )
    write_parquet(tmp_path / "x.parquet", table)
    auto = load(tmp_path / "*.parquet")
    assert (auto.images[..., 0] > 150).all() and auto.labels.tolist() == [0, 1]  # first binary column
    chosen = load(f"parquet:{tmp_path / 'x.parquet'}", image_column="photo", label_column="kind")
    assert (chosen.images[..., 2] > 150).all() and chosen.class_names == ["a", "b"]
    assert chosen.labels.tolist() == [1, 0]


def test_parquet_without_image_column_names_the_columns(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "t.parquet", pa.table({"caption": ["a"], "score": [1.0]}))
    with pytest.raises(DataError, match=r"no image column.*caption \(string\), score \(double\)"):
        load(path)
    with pytest.raises(DataError, match="image column 'pixels'"):
        load(path, image_column="pixels")


def test_parquet_unreadable_file_is_counted(tmp_path: Path) -> None:
    table = pa.table({"image": pa.array([encode(solid(RED))], pa.binary())})
    write_parquet(tmp_path / "a.parquet", table)
    write(tmp_path / "b.parquet", b"PAR1 but not really")
    out = load(tmp_path)
    assert out.report["images"] == 1 and out.report["skipped"] == {"unreadable_file": 1}
    assert out.class_names == [] and out.report["labeled"] is False


# ---------------------------------------------------------------- built-in dataset


def test_builtin_is_deterministic_labeled_and_visible() -> None:
    a = load_images(None, image_size=32, builtin_count=24, num_workers=1, use_cache=False)
    b = load_images("builtin:shapes", image_size=32, builtin_count=24, num_workers=1, use_cache=False)
    c = load_images("builtin", image_size=32, builtin_count=24, seed=1, num_workers=1, use_cache=False)
    assert a.images.shape == (24, 32, 32, 3) and a.images.dtype == np.uint8
    assert a.images.tobytes() == b.images.tobytes()
    assert a.images.tobytes() != c.images.tobytes()
    assert a.class_names == list(SHAPES) and len(SHAPES) >= 5
    assert sorted(set(a.labels.tolist())) == list(range(len(SHAPES)))
    assert a.report["kind"] == "builtin" and a.report["labeled"] is True
    spread = a.images.reshape(24, -1).astype(np.float32).std(axis=1)
    assert (spread > 10).all()  # every image has structure, none is a flat colour
    # max_samples caps the count and keeps a prefix of the same sequence
    short = load_images(None, image_size=32, builtin_count=24, max_samples=5, num_workers=1, use_cache=False)
    assert short.images.tobytes() == a.images[:5].tobytes()
    assert a.keys[:2] == ["builtin:000000", "builtin:000001"] and short.keys == a.keys[:5]


def test_builtin_unknown_variant() -> None:
    with pytest.raises(DataError, match="unknown built-in dataset 'faces'; valid: shapes"):
        load_images("builtin:faces")


# ---------------------------------------------------------------- cache and parallelism


def test_second_load_hits_the_cache(labeled_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = load_images(str(labeled_folder), image_size=8, num_workers=1, cache_dir=cache)
    second = load_images(str(labeled_folder), image_size=8, num_workers=1, cache_dir=cache)
    assert first.report["cache"]["hit"] is False and second.report["cache"]["hit"] is True
    assert second.report["cache"]["path"] == first.report["cache"]["path"]
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.labels, second.labels)
    assert second.class_names == first.class_names
    assert second.keys == first.keys and len(second.keys) == 4  # where each image came from survives
    assert not any(p.name.startswith(".tmp-") for p in cache.iterdir())  # temp dir renamed away
    # a changed input file (new size and mtime) is a different key
    write(labeled_folder / "dog" / "c.png", encode(solid(GREEN, (20, 20))))
    os.utime(labeled_folder / "dog" / "c.png", ns=(1, 1))
    third = load_images(str(labeled_folder), image_size=8, num_workers=1, cache_dir=cache)
    assert third.report["cache"]["hit"] is False
    # different decode options are different keys too
    assert (
        load_images(str(labeled_folder), image_size=4, num_workers=1, cache_dir=cache).report["cache"]["hit"]
        is False
    )


def test_cache_entry_without_keys_is_a_miss(labeled_folder: Path, tmp_path: Path) -> None:
    """An entry written before keys were cached (or damaged) is decoded again, never served keyless."""
    cache = tmp_path / "cache"
    first = load_images(str(labeled_folder), image_size=8, num_workers=1, cache_dir=cache)
    entry = Path(first.report["cache"]["path"])
    (entry / "keys.json").unlink()
    again = load_images(str(labeled_folder), image_size=8, num_workers=1, cache_dir=cache)
    assert again.report["cache"]["hit"] is False and again.keys == first.keys
    (entry / "keys.json").write_text(json.dumps(first.keys[:2]))  # wrong length: also a miss
    assert load_images(str(labeled_folder), image_size=8, num_workers=1, cache_dir=cache).keys == first.keys


def test_failed_cache_write_loses_only_the_cache(
    labeled_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vaeforge.data import cache as cache_module

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    cache = tmp_path / "cache"
    with monkeypatch.context() as m:
        m.setattr(cache_module.np, "save", disk_full)
        with pytest.warns(UserWarning, match="could not write the data cache"):
            out = load_images(str(labeled_folder), image_size=8, num_workers=1, cache_dir=cache)
    assert out.report["images"] == 4 and "No space left" in out.report["cache"]["error"]
    assert list(cache.iterdir()) == []  # no half-written entry, no temp dir left behind
    again = load_images(str(labeled_folder), image_size=8, num_workers=1, cache_dir=cache)
    assert again.report["cache"]["hit"] is False and len(list(cache.iterdir())) == 1


def test_builtin_cache_and_env_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAEFORGE_CACHE", str(tmp_path / "envcache"))
    first = load_images(None, image_size=16, builtin_count=12, num_workers=1)
    second = load_images(None, image_size=16, builtin_count=12, num_workers=1)
    assert second.report["cache"]["hit"] is True
    assert second.report["cache"]["path"].startswith(str(tmp_path / "envcache"))
    assert first.images.tobytes() == np.asarray(second.images).tobytes()


def test_parallel_decoding_equals_serial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode_module, "CHUNK_ITEMS", 6)  # several pool tasks from a small folder
    monkeypatch.setattr(builtin_module, "CHUNK_IMAGES", 5)
    for i in range(30):
        write(tmp_path / f"c{i % 3}" / f"{i:03d}.png", encode(noise(i, 20)))
    write(tmp_path / "c0" / "999_bad.png", b"")
    serial = load(tmp_path, num_workers=1)
    parallel = load(tmp_path, num_workers=2)
    np.testing.assert_array_equal(serial.images, parallel.images)
    np.testing.assert_array_equal(serial.labels, parallel.labels)
    assert serial.keys == parallel.keys and not any(k.endswith("999_bad.png") for k in serial.keys)
    assert serial.report["skipped"] == parallel.report["skipped"] == {"empty": 1}
    limited = load(tmp_path, num_workers=2, max_samples=13)  # stops early, cancels the rest
    np.testing.assert_array_equal(limited.images, serial.images[:13])
    s_img, s_lab = generate_shapes(17, 16, seed=3, num_workers=1)
    p_img, p_lab = generate_shapes(17, 16, seed=3, num_workers=2)
    assert s_img.tobytes() == p_img.tobytes() and s_lab.tolist() == p_lab.tolist()


def test_invalid_options_are_user_errors(labeled_folder: Path) -> None:
    with pytest.raises(UserError, match="image_size"):
        load(labeled_folder, image_size=0)
    with pytest.raises(UserError, match="max_samples"):
        load(labeled_folder, max_samples=0)


def test_reads_shards_written_by_webdataset(tmp_path: Path) -> None:
    import webdataset as wds  # the real writer: our reader must agree with its layout

    with wds.TarWriter(str(tmp_path / "w-000000.tar")) as sink:
        for i in range(5):
            sink.write({"__key__": f"sample{i:03d}", "jpg": encode(solid(RED), "JPEG"), "cls": i % 3})
    out = load(tmp_path / "w-000000.tar")
    assert out.report["images"] == 5 and out.report["skipped"] == {}
    assert out.labels.tolist() == [0, 1, 2, 0, 1]
