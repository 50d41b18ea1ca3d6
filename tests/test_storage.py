"""Remote storage against a real S3-compatible server (moto on loopback): data read from s3, training and
generation writing to s3, load_vae from a URI, resume without rename, and one-line errors.

Output is read back through the real readers: pyarrow.parquet on the S3 filesystem, webdataset on a
downloaded copy, Pillow.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from test_generate import user_error  # the same exit-2, one-line contract

from vaeforge import storage
from vaeforge.checkpoint import checkpoint_locations, load_vae, save_checkpoint
from vaeforge.cli import main
from vaeforge.config import get_preset
from vaeforge.data import load_images
from vaeforge.model import VAE
from vaeforge.sampling import load_gmm

TINY = ["--preset", "tiny", "--max-samples", "256", "--batch-size", "32"]


# ---------------------------------------------------------------------------------------------- helpers


def png_bytes(rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="PNG")
    return out.getvalue()


def make_folder(root: str, per_class: int = 40) -> None:
    """Two classes of noisy tinted PNGs under root/{cats,dogs}/, plus one hidden file and one bad one."""
    rng = np.random.default_rng(0)
    for cls, tint in (("cats", (200, 60, 60)), ("dogs", (60, 60, 200))):
        for i in range(per_class):
            img = np.clip(rng.normal(tint, 30, (24, 24, 3)), 0, 255).astype(np.uint8)
            storage.write_bytes(storage.join(root, cls, f"{i:03d}.png"), png_bytes(img))
    storage.write_bytes(storage.join(root, "dogs", "broken.png"), b"not a png")
    storage.write_bytes(storage.join(root, ".hidden", "x.png"), png_bytes(np.zeros((8, 8, 3), np.uint8)))


def run_cli(argv: list[str]) -> None:
    try:
        main(argv)
    except SystemExit as e:  # main() exits only on errors
        pytest.fail(f"vaeforge {argv[0]} exited with {e.code}")


def s3_objects(prefix: str) -> dict[str, bytes]:
    """name -> bytes of every object directly under prefix (not in sub-prefixes such as .vaeforge/)."""
    return {e.name: storage.read_bytes(e.location) for e in storage.list_files(prefix, recursive=False)}


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    vae = VAE(get_preset("tiny")).eval()
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt", vae, {"epoch": 0, "metrics": {}})


# ------------------------------------------------------------------------------------ storage and data


def test_storage_basics_on_s3(s3_prefix: str, tmp_path: Path) -> None:
    a, b = storage.join(s3_prefix, "d", "a.bin"), storage.join(s3_prefix, "d", "sub", "b.tar")
    storage.write_bytes(a, b"hello")
    local = tmp_path / "big.bin"
    local.write_bytes(bytes(range(256)) * 40_000)  # 10 MB: more than one multipart part
    storage.upload_file(str(local), b)
    assert storage.kind(storage.join(s3_prefix, "d")) == "dir" and storage.kind(a) == "file"
    assert storage.kind(storage.join(s3_prefix, "nope")) is None
    assert storage.read_bytes(b) == local.read_bytes() and storage.info(b).size == 10_240_000
    assert [e.location for e in storage.list_files(storage.join(s3_prefix, "d"))] == [a, b]
    assert [e.location for e in storage.glob(f"{s3_prefix}/d/*.bin")] == [a]
    assert [e.location for e in storage.glob(f"{s3_prefix}/**/*.tar")] == [b]
    storage.delete_tree(storage.join(s3_prefix, "d"))
    assert storage.list_files(s3_prefix) == [] and storage.is_empty(s3_prefix)


def test_data_sources_read_from_s3(s3_prefix: str, tmp_path: Path) -> None:
    """Folder, WebDataset (brace pattern) and Parquet sources give the same images from s3 as from disk;
    the decode cache hits on the second read and misses once an object changes."""
    local, remote = str(tmp_path / "photos"), storage.join(s3_prefix, "photos")
    make_folder(local)
    make_folder(remote)
    opts = {"image_size": 16, "num_workers": 1, "cache_dir": tmp_path / "cache"}
    here, there = load_images(local, **opts), load_images(remote, **opts)
    assert there.report["images"] == 80 and there.class_names == ["cats", "dogs"]
    assert list(there.report["skipped_examples"].values()) == [[storage.join(remote, "dogs", "broken.png")]]
    np.testing.assert_array_equal(there.images, here.images)
    assert load_images(remote, **opts).report["cache"]["hit"] is True

    storage.write_bytes(storage.join(remote, "cats", "000.png"), png_bytes(np.zeros((9, 9, 3), np.uint8)))
    assert load_images(remote, **opts).report["cache"]["hit"] is False

    images = [png_bytes(np.full((20, 20, 3), v, np.uint8)) for v in range(0, 250, 25)]
    table = pa.table({"image": images, "label": [i % 2 for i in range(10)]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(storage.join(s3_prefix, "pq", "part-0.parquet"), buf.getvalue())
    parquet = load_images(storage.join(s3_prefix, "pq"), **opts)
    assert parquet.report["kind"] == "parquet" and parquet.report["images"] == 10

    for i in range(2):
        tar = io.BytesIO()
        with tarfile.open(fileobj=tar, mode="w") as t:
            for j, data in enumerate(images[i * 5 : i * 5 + 5]):
                info = tarfile.TarInfo(f"{i}_{j}.png")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
        storage.write_bytes(storage.join(s3_prefix, "wds", f"train-{i:02d}.tar"), tar.getvalue())
    wds = load_images(f"{s3_prefix}/wds/train-{{00..02}}.tar", **opts)
    assert wds.report["images"] == 10 and wds.report["skipped"] == {"missing_file": 1}
    np.testing.assert_array_equal(wds.images, parquet.images)


def test_load_vae_from_a_uri(s3_prefix: str, tiny_ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("VAEFORGE_CACHE", str(tmp_path / "cache"))
    run = storage.join(s3_prefix, "run")
    for name in ("model.pt", "meta.json"):
        storage.upload_file(str(tiny_ckpt / name), storage.join(run, "checkpoints", "epoch0001_step1", name))
    loaded = load_vae(run)
    assert loaded.location == storage.join(run, "checkpoints", "epoch0001_step1")
    assert loaded.path.is_relative_to(tmp_path / "cache") and loaded.path.name == "epoch0001_step1"
    reference = load_vae(tiny_ckpt).model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in loaded.model.state_dict().items())
    assert load_vae(storage.join(loaded.location, "model.pt")).path == loaded.path  # cached copy reused


# --------------------------------------------------------------------------------------- one-line errors


@pytest.mark.usefixtures("s3_bucket")  # the endpoint must be moto, or the bucket lookup goes to AWS
def test_missing_bucket_is_one_error_line(tiny_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gen = ["generate", "--checkpoint", str(tiny_ckpt), "--count", "10", "--output", "s3://no-such-bkt/x"]
    assert "bucket 'no-such-bkt' does not exist" in user_error(gen, capsys)
    train = ["train", *TINY, "--output", "s3://no-such-bkt/run"]
    assert "bucket 'no-such-bkt' does not exist" in user_error(train, capsys)
    data = ["train", *TINY, "--data", "s3://no-such-bkt/photos", "--output", "unused"]
    assert "bucket 'no-such-bkt' does not exist" in user_error(data, capsys)
    load = ["generate", "--checkpoint", "s3://no-such-bkt/run", "--count", "10", "--output", "unused"]
    assert "bucket 'no-such-bkt' does not exist" in user_error(load, capsys)


def test_storage_error_messages_are_one_line() -> None:
    """How the store's errors read to a user (the texts are Arrow's, as the AWS SDK words them)."""
    denied = OSError("When reading 'b/k': AWS Error ACCESS_DENIED during GetObject operation:\nAccess Denied")
    unreachable = OSError("AWS Error NETWORK_CONNECTION during HeadBucket: curlCode: 7, Couldn't connect")
    for error, words in ((denied, "access denied to s3://b/k"), (unreachable, "cannot reach")):
        with pytest.raises(storage.StorageError) as e, storage.remote_errors("s3://b/k"):
            raise error
        assert words in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError), storage.remote_errors("s3://b/k"):
        raise FileNotFoundError("missing keys stay FileNotFoundError: callers decide what absence means")


# ------------------------------------------------------------------------------------------- Ray runs


@pytest.mark.ray
@pytest.mark.timeout(300)
@pytest.mark.usefixtures("ray_session")
def test_train_from_and_to_s3_then_resume(s3_prefix: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("VAEFORGE_CACHE", str(tmp_path / "cache"))
    data, run = storage.join(s3_prefix, "photos"), storage.join(s3_prefix, "run")
    make_folder(data)
    args = ["train", *TINY, "--data", data, "--output", run, "--cache-dir", str(tmp_path / "cache")]
    run_cli([*args, "--epochs", "1"])

    info = json.loads(storage.read_text(storage.join(run, "run.json")))
    assert info["data"]["source"] == data and info["data"]["classes"] == ["cats", "dogs"]
    rows = [json.loads(r) for r in storage.read_text(storage.join(run, "metrics.jsonl")).splitlines()]
    assert [r["epoch"] for r in rows] == [1]
    for kind in ("samples", "recon"):
        png = storage.read_bytes(storage.join(run, "samples", f"{kind}_epoch0001.png"))
        assert Image.open(io.BytesIO(png)).mode == "RGB"
    (ckpt,) = checkpoint_locations(run)
    assert storage.basename(ckpt).startswith("epoch0001_step")
    names = {e.name for e in storage.list_files(ckpt)}
    assert {"model.pt", "trainer.pt", "meta.json", "sampler_gmm.npz"} <= names
    loaded = load_vae(run)
    assert loaded.model.decoder(torch.zeros(2, 16)).shape == (2, 3, 64, 64)
    # the end-of-training fit, uploaded beside the weights, arrives with the cached copy; per class
    # (cats, dogs), and it records where it belongs
    gmm = load_gmm(loaded.path)
    assert gmm.class_ids() == [0, 1] and gmm.meta["checkpoint"] == ckpt

    run_cli([*args, "--epochs", "2", "--resume"])  # restores optimiser and loop state from s3
    rows = [json.loads(r) for r in storage.read_text(storage.join(run, "metrics.jsonl")).splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    latest = load_vae(run, which="latest")
    assert latest.meta["epoch"] == 2 and latest.meta["global_step"] == 2 * rows[0]["global_step"]


def generate_args(ckpt: Path | str, out: str, count: int, shard: int, *extra: str) -> list[str]:
    common = ["--count", str(count), "--shard-size", str(shard), "--precision", "fp32", "--workers", "2"]
    return ["generate", "--checkpoint", str(ckpt), "--output", out, *common, *extra]


@pytest.mark.ray
@pytest.mark.timeout(300)
@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_generate_to_s3_reads_back_and_matches_local(
    s3_prefix: str, tiny_ckpt: Path, tmp_path: Path, fmt: str
) -> None:
    import webdataset

    out, local = storage.join(s3_prefix, "out"), tmp_path / "local"
    run_cli(generate_args(tiny_ckpt, out, 250, 100, "--format", fmt))
    run_cli(generate_args(tiny_ckpt, str(local), 250, 100, "--format", fmt))
    objects = s3_objects(out)
    manifest = json.loads(objects.pop("_manifest.json"))
    assert objects.pop("_SUCCESS") == b""
    shards = {p.name: p.read_bytes() for p in local.iterdir() if not p.name.startswith((".", "_"))}
    assert objects == shards and len(shards) == 3  # the same bytes as a local run
    for s in manifest["shards"]:
        assert s["sha256"] == hashlib.sha256(objects[s["path"]]).hexdigest()

    if fmt == "parquet":
        fs, path = storage.filesystem(out)
        table = pq.read_table(path, filesystem=fs)  # the directory: _manifest, _SUCCESS, .vaeforge skipped
        assert table.num_rows == 250 and len(set(table.column("key").to_pylist())) == 250
        Image.open(io.BytesIO(table.column("image")[0].as_py()["bytes"])).load()
    else:
        copy = tmp_path / "copy"
        for e in storage.list_files(out, recursive=False):
            storage.download(e.location, copy / e.name)
        samples = list(webdataset.WebDataset(str(copy / "samples-{000000..000002}.tar"), shardshuffle=False))
        assert len(samples) == 250 and Image.open(io.BytesIO(samples[0]["png"])).size == (64, 64)


@pytest.mark.ray
@pytest.mark.timeout(300)
@pytest.mark.usefixtures("ray_session")
def test_interrupted_generate_on_s3_resumes_to_the_same_bytes(
    s3_prefix: str,
    tiny_ckpt: Path,
    tmp_path: Path,
    inject_failure: Callable[[str], None],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Shard 1 keeps failing, so the one-actor run stops with shard 0 done; a shard object without a done
    record (what a driver killed between upload and record leaves) is redone, not trusted. The
    checkpoint is remote too: driver and actors read it through their cached copies."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("VAEFORGE_CACHE", str(cache))  # reaches the actors through runtime_env
    ckpt = storage.join(s3_prefix, "ckpt")
    for name in ("model.pt", "meta.json"):
        storage.upload_file(str(tiny_ckpt / name), storage.join(ckpt, name))
    straight, out = storage.join(s3_prefix, "straight"), storage.join(s3_prefix, "resumed")
    run_cli(generate_args(ckpt, straight, 300, 100))
    (copy,) = (cache / "remote").iterdir()
    assert {p.name for p in (copy / "ckpt").iterdir()} == {"model.pt", "meta.json"}

    inject_failure("1")
    line = user_error(generate_args(ckpt, out, 300, 100, "--max-retries", "0", "--workers", "1"), capsys)
    assert "shard 1 " in line
    done_dir = storage.join(out, ".vaeforge", "done")
    assert [e.name for e in storage.list_files(done_dir)] == ["000000.json"]
    assert "_SUCCESS" not in s3_objects(out)
    kept = {e.name: e.mtime_ns for e in storage.list_files(out, recursive=False)}
    storage.write_bytes(storage.join(out, "samples-000001.tar"), b"half a shard")  # no done record

    monkeypatch.undo()  # no more injected failures
    monkeypatch.setenv("VAEFORGE_CACHE", str(cache))
    run_cli(generate_args(ckpt, out, 300, 100))
    assert s3_objects(out) == s3_objects(straight)
    after = {e.name: e.mtime_ns for e in storage.list_files(out, recursive=False)}
    assert all(after[name] == mtime for name, mtime in kept.items())  # done shards were not rewritten
    assert sorted(e.name for e in storage.list_files(done_dir)) == [f"{i:06d}.json" for i in range(3)]
