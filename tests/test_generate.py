"""`vaeforge generate` end to end, the way a user runs it: output read back through webdataset, Ray Data,
pyarrow, pandas and Pillow; determinism; resume after SIGKILL; injected failures; bad input; full disk.

In-process runs go through `cli.main` and reuse the session's shared Ray. The SIGKILL test runs
`python -m vaeforge` as a subprocess with a Ray of its own (own RAY_TMPDIR) and ends only that Ray's
processes, by pid. The full-disk end-to-end test mounts a 2 MiB tmpfs (root only; skipped otherwise).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from own_ray import kill_ray, ray_processes
from PIL import Image

import vaeforge.generate as generate_mod
import vaeforge.writers as writers_mod
from vaeforge.checkpoint import save_checkpoint
from vaeforge.cli import main
from vaeforge.config import GenerateConfig, get_preset, parse_count
from vaeforge.encode import encode_image
from vaeforge.errors import UserError
from vaeforge.generate import GenerateResult
from vaeforge.generate_worker import ShardTask, ShardWorker
from vaeforge.model import VAE
from vaeforge.sampling import prior_latents

# fp32 explicitly: `auto` may pick bf16 on other CPUs, and test 3 regenerates a sample in fp32.
COMMON = ["--precision", "fp32"]
SIZE = 64


# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny VAE: its decoder output is as good as a trained one's for I/O tests, and instant."""
    torch.manual_seed(0)
    return save_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "ckpt", VAE(get_preset("tiny")).eval(), {"epoch": 0, "metrics": {}}
    )


def gen_argv(ckpt: Path, out: Path, count: int | str, shard_size: int, *extra: str) -> list[str]:
    return [
        "generate",
        "--checkpoint",
        str(ckpt),
        "--output",
        str(out),
        "--count",
        str(count),
        "--shard-size",
        str(shard_size),
        *COMMON,
        *extra,
    ]


def generate(ckpt: Path, out: Path, count: int, shard_size: int, *extra: str) -> Path:
    """`vaeforge generate ...` in this process (the shared Ray is reused); fails on any exit."""
    try:
        main(gen_argv(ckpt, out, count, shard_size, *extra))
    except SystemExit as e:  # main() exits only on errors
        pytest.fail(f"vaeforge generate exited with {e.code}")
    return out


def user_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI expecting a user error: exit 2, no traceback, one `error:` line said last."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = [line for line in captured.err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, captured.err
    assert lines[-1] == errors[0]
    return errors[0]


def shards(out: Path) -> dict[str, bytes]:
    """Every shard file's bytes, by name."""
    return {p.name: p.read_bytes() for p in sorted(out.glob("samples-*")) if p.suffix in (".tar", ".parquet")}


def ledger(out: Path) -> list[dict]:
    """The shards' done records (.vaeforge/done/NNNNNN.json), with their shard names made full paths."""
    records = [json.loads(p.read_text()) for p in sorted((out / ".vaeforge" / "done").glob("*.json"))]
    return [{**r, "path": str(out / r["path"])} for r in records]


def temp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if ".tmp" in p.name]


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def decode_any(data: bytes, ext: str) -> np.ndarray:
    """An encoded sample as (H, W, 3) uint8: Pillow for images, numpy for npy."""
    if ext == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "RGB" and im.size == (SIZE, SIZE)
        return np.asarray(im)


def assert_matches_manifest(out: Path, counts: list[int]) -> dict:
    """_manifest.json lists every shard with count/bytes/sha256 that match the files; _SUCCESS exists."""
    manifest = json.loads((out / "_manifest.json").read_text())
    assert (out / "_SUCCESS").is_file()
    assert [s["index"] for s in manifest["shards"]] == list(range(len(counts)))
    assert [s["count"] for s in manifest["shards"]] == counts
    assert manifest["count"] == sum(counts)
    for s in manifest["shards"]:
        data = (out / s["path"]).read_bytes()  # relative names
        assert s["bytes"] == len(data)
        assert s["sha256"] == hashlib.sha256(data).hexdigest()
        assert (s["device"], s["precision"]) == ("cpu", "fp32")  # provenance of the bytes
    listed = {s["path"] for s in manifest["shards"]}
    assert listed == set(shards(out)), "a shard file exists that the manifest does not list"
    return manifest


# ----------------------------------------------------------------------------------- shared reference runs


@pytest.fixture(scope="module")
def wds_run(ckpt: Path, tmp_path_factory: pytest.TempPathFactory, ray_session: None) -> Path:
    """550 PNGs in WebDataset shards of 200 (200, 200, 150), default workers: the reference run."""
    return generate(ckpt, tmp_path_factory.mktemp("wds") / "out", 550, 200)


@pytest.fixture(scope="module")
def run_2000(ckpt: Path, tmp_path_factory: pytest.TempPathFactory, ray_session: None) -> Path:
    """2000 PNGs in 20 shards of 100, uninterrupted: what the resume and full-disk tests must reproduce."""
    return generate(ckpt, tmp_path_factory.mktemp("straight") / "out", 2000, 100)


# ------------------------------------------------------------------------------------- 1, 2: read-back


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_webdataset_png_reads_back_everywhere(wds_run: Path) -> None:
    import ray
    import webdataset as wds

    out = wds_run
    manifest = assert_matches_manifest(out, [200, 200, 150])
    assert manifest["format"] == "webdataset" and manifest["image_format"] == "png"
    assert sorted(shards(out)) == [f"samples-{i:06d}.tar" for i in range(3)]

    # webdataset, decoding to rgb8
    samples = list(
        wds.WebDataset(str(out / "samples-{000000..000002}.tar"), shardshuffle=False).decode("rgb8")
    )
    assert len(samples) == 550
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == 550 and not any("." in k for k in keys)
    for s in samples:
        assert s["png"].shape == (SIZE, SIZE, 3) and s["png"].dtype == np.uint8
        meta = s["json"]
        assert {"seed", "shard", "index", "sampler", "checkpoint"} <= meta.keys()
        assert meta["seed"] == 0 and meta["sampler"] == "prior"
        assert meta["checkpoint"] == manifest["checkpoint_sha256"][:16]
        assert s["__key__"] == f"{meta['shard']:06d}_{meta['index']:06d}"
    per_shard = [[s["json"]["index"] for s in samples if s["json"]["shard"] == i] for i in range(3)]
    assert per_shard == [list(range(200)), list(range(200)), list(range(150))]

    # Ray Data on the directory itself: _manifest.json, _SUCCESS and .vaeforge/ must be skipped
    rows = ray.data.read_webdataset(str(out)).take_all()
    assert len(rows) == 550
    assert {r["__key__"] for r in rows} == set(keys)
    for r in rows[:5]:
        assert np.asarray(r["png"]).shape == (SIZE, SIZE, 3)

    # plain tarfile + Pillow on the raw bytes
    raw = 0
    for name in shards(out):
        for member, data in tar_members(out / name).items():
            if member.endswith(".png"):
                decode_any(data, "png")
                raw += 1
            else:
                assert member.endswith(".json"), member
    assert raw == 550


def test_stats_say_where_the_actors_time_went(wds_run: Path) -> None:
    """stats.json accounts for the run: phases within each shard's time, shards within the window."""
    stats = json.loads((wds_run / ".vaeforge" / "stats.json").read_text())
    assert stats["images"] == 550 and stats["actors"] >= 1
    spent = stats["actor_seconds"]
    assert {"latents", "decode", "encode", "write", "commit", "total"} <= spent.keys()
    assert all(spent[k] > 0 for k in ("latents", "decode", "encode", "write"))
    assert sum(v for k, v in spent.items() if k != "total") <= spent["total"]
    assert 0 < stats["busy_fraction"] <= 1.001
    window = stats["generate_seconds"]
    assert 0 <= stats["start_lag_s"] < window and 0 <= stats["tail_s"] < window


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_summary_line_says_where_the_time_went(
    ckpt: Path, tmp_path: Path, ray_session: None, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    generate(ckpt, tmp_path / "out", 40, 20)
    lines = [ln.strip() for ln in capsys.readouterr().out.splitlines()]
    actors = [ln for ln in lines if ln.startswith("actors")]
    # phases come largest first; on 40 tiny images a slow fsync can make commit the largest (seen in CI)
    assert len(actors) == 1 and "busy; of that time: " in actors[0], lines
    assert {"decode", "commit", "write"} <= set(actors[0].replace(",", " ").split()), lines
    spent = {"decode": 3.0, "encode": 0.5, "write": 0.25, "latents": 0.25, "total": 4.0}
    result = GenerateResult("out", 1, 10, 100, 2.0, 0, {"actor_seconds": spent, "busy_fraction": 0.9})
    assert result.time_summary() == (
        "90.0% busy; of that time: decode 75.0%, encode 12.5%, write 6.2%, latents 6.2%"
    )
    assert GenerateResult("out", 1, 0, 100, 0.0, 1).time_summary() is None  # nothing made this time


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_parquet_reads_back_with_pyarrow_and_pandas(ckpt: Path, tmp_path: Path, ray_session: None) -> None:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = generate(ckpt, tmp_path / "out", 450, 200, "--format", "parquet")
    assert_matches_manifest(out, [200, 200, 50])

    table = pq.read_table(out)  # the directory; _-prefixed and dot-dirs are skipped
    assert table.num_rows == 450
    assert table.column_names[:6] == ["key", "image", "label", "seed", "shard", "index"]
    assert table.schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = table.to_pylist()
    assert len({r["key"] for r in rows}) == 450
    for r in rows:
        decode_any(r["image"]["bytes"], "png")
        assert r["image"]["path"] == f"{r['key']}.png" and r["label"] is None and r["seed"] == 0

    df = pd.read_parquet(out)
    assert len(df) == 450 and set(df["key"]) == {r["key"] for r in rows}
    assert sorted(zip(df["shard"], df["index"], strict=True))[-1] == (2, 49)


@pytest.mark.ray
@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("fmt", "image_format", "ext"),
    [("webdataset", "jpeg", "jpg"), ("parquet", "webp", "webp"), ("webdataset", "npy", "npy")],
)
def test_other_image_formats(
    ckpt: Path, tmp_path: Path, ray_session: None, fmt: str, image_format: str, ext: str
) -> None:
    import pyarrow.parquet as pq

    out = generate(ckpt, tmp_path / "out", 60, 25, "--format", fmt, "--image-format", image_format)
    assert_matches_manifest(out, [25, 25, 10])
    if fmt == "parquet":
        blobs = [(r["image"]["path"], r["image"]["bytes"]) for r in pq.read_table(out).to_pylist()]
    else:
        blobs = [
            (n, d) for s in shards(out) for n, d in tar_members(out / s).items() if not n.endswith("json")
        ]
    assert len(blobs) == 60
    for name, data in blobs:
        assert name.endswith(f".{ext}")
        img = decode_any(data, ext)
        assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8


# ------------------------------------------------------------------------------------- 3: determinism


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_workers_and_batch_size_do_not_change_a_byte(ckpt: Path, wds_run: Path, tmp_path: Path) -> None:
    one = generate(ckpt, tmp_path / "one", 550, 200, "--workers", "1", "--batch-size", "64")
    two = generate(ckpt, tmp_path / "two", 550, 200, "--workers", "2", "--batch-size", "37")
    reference = shards(wds_run)
    assert len(reference) == 3
    assert shards(one) == reference
    assert shards(two) == reference


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_one_sample_regenerates_from_its_metadata(ckpt: Path, wds_run: Path) -> None:
    stored = tar_members(wds_run / "samples-000001.tar")
    meta = json.loads(stored["000001_000123.json"])
    assert (meta["seed"], meta["shard"], meta["index"]) == (0, 1, 123)

    cfg = GenerateConfig(checkpoint=str(ckpt), output="unused", count=1, precision="fp32")
    worker = ShardWorker(str(ckpt), cfg, 1, meta["checkpoint"])  # no Ray: the actor's class, in-process
    assert worker.precision == "fp32" and not worker.decoder.training
    z = prior_latents(meta["seed"], meta["shard"], meta["index"], 1, worker.latent_dim, 1.0)
    image = worker.decode(z)[0]  # (H, W, 3) uint8, a batch of one instead of the run's batch
    assert encode_image(image, "png") == stored["000001_000123.png"]


def test_small_batches_decode_the_bytes_a_full_batch_does(ckpt: Path) -> None:
    """A shard's last batch can hold 1-3 samples, and a regenerated sample is a batch of one; oneDNN runs
    such batches through other fp32 kernels whose last-bit differences flip a pixel's rounding. Without
    the padding in ShardWorker.decode, batches of 1 differ here (sample 123 of shard 1)."""
    cfg = GenerateConfig(checkpoint=str(ckpt), output="unused", count=1, precision="fp32")
    worker = ShardWorker(str(ckpt), cfg, 1, "test")
    z = prior_latents(0, 1, 0, 256, worker.latent_dim, 1.0)
    full = worker.decode(z)
    for n in (1, 2, 3, 5):
        np.testing.assert_array_equal(
            np.concatenate([worker.decode(z[i : i + n]) for i in range(0, 256, n)]), full
        )


# ----------------------------------------------------------------------------- 4: resume after SIGKILL


def cli_argv(ckpt: Path, out: Path, count: int, shard_size: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vaeforge", *gen_argv(ckpt, out, count, shard_size, *extra)]


@pytest.mark.ray
# two Ray start-ups and 4,000 decodes: 269 s on a 2-core AVX2 EPYC beside a training run
@pytest.mark.timeout(900)
def test_resume_after_sigkill_is_byte_identical(
    ckpt: Path, run_2000: Path, tmp_path: Path, own_ray_env: dict
) -> None:
    count, size = 2000, 100
    n_shards = count // size
    out = tmp_path / "killed"
    # 20 shards, 2 actors: polling every 10 ms stops it far from either end, mid-write on some shard.
    argv = cli_argv(ckpt, out, count, size, "--workers", "2", "--batch-size", "50")
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(argv, env=own_ray_env, start_new_session=True, stdout=log, stderr=log)
    done_dir = out / ".vaeforge" / "done"
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if done_dir.is_dir() and len(list(done_dir.glob("*.json"))) >= 3:
                break
            time.sleep(0.01)
        assert proc.poll() is None, (
            f"finished before it could be killed: {(tmp_path / 'first.log').read_text()}"
        )
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and every process of its group, as kill -9 does
    finally:
        proc.wait(timeout=30)
        log.close()
    # Ray runs its workers in process groups of their own, so killpg leaves the two actors alive, still
    # writing; they are this test's to end (by pid).
    kill_ray(own_ray_env["RAY_TMPDIR"])
    assert ray_processes(own_ray_env["RAY_TMPDIR"]) == []

    assert not (out / "_SUCCESS").exists() and not (out / "_manifest.json").exists()
    done_at_kill = {r["index"]: r for r in ledger(out)}
    assert 3 <= len(done_at_kill) < n_shards
    kept_mtimes = {i: os.stat(r["path"]).st_mtime_ns for i, r in done_at_kill.items()}

    # The re-run also leaves Ray's dashboard off: an option that does not change the bytes may change.
    again = subprocess.run(
        [*argv, "--no-dashboard"],
        env=own_ray_env,
        start_new_session=True,
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert again.returncode == 0, again.stderr
    assert "already complete (resuming)" in again.stderr
    assert "ray: local Ray, dashboard http" in (tmp_path / "first.log").read_text()
    assert "ray: local Ray\n" in again.stderr and "dashboard" not in again.stderr

    assert shards(out) == shards(run_2000)
    assert len(shards(out)) == n_shards
    assert sorted(r["index"] for r in ledger(out)) == list(range(n_shards))  # each shard exactly once
    assert_matches_manifest(out, [size] * n_shards)
    assert temp_files(out) == []
    for i, mtime in kept_mtimes.items():  # shards ledgered before the kill were kept, not redone
        assert os.stat(out / f"samples-{i:06d}.tar").st_mtime_ns == mtime


# ------------------------------------------------------------------------------- 5: injected failures


@pytest.mark.ray
@pytest.mark.timeout(180)
@pytest.mark.parametrize("spec", ["1:1", "1:1:crash"])
def test_a_shard_that_fails_once_is_retried(
    ckpt: Path, wds_run: Path, tmp_path: Path, inject_failure: Callable[[str], None], spec: str
) -> None:
    inject_failure(spec)
    out = generate(ckpt, tmp_path / "out", 550, 200, "--workers", "1")
    assert shards(out) == shards(wds_run)
    assert_matches_manifest(out, [200, 200, 150])
    attempts = {r["index"]: r["attempt"] for r in ledger(out)}
    assert attempts == {0: 0, 1: 1, 2: 0}  # shard 1 succeeded on its second attempt
    assert temp_files(out) == []


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_a_shard_that_always_fails_stops_the_run(
    ckpt: Path,
    wds_run: Path,
    tmp_path: Path,
    inject_failure: Callable[[str], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    inject_failure("1")
    out = tmp_path / "out"
    # One worker: shard 0 completes before shard 1 is tried, so what is kept is known.
    line = user_error(gen_argv(ckpt, out, 550, 200, "--workers", "1", "--max-retries", "2"), capsys)
    assert "shard 1 " in line and "samples-000001" in line and "failed 3 times" in line
    assert not (out / "_SUCCESS").exists() and not (out / "_manifest.json").exists()
    assert shards(out) == {"samples-000000.tar": shards(wds_run)["samples-000000.tar"]}
    assert [r["index"] for r in ledger(out)] == [0]
    assert temp_files(out) == []


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_a_failed_rerun_of_a_damaged_run_is_not_marked_complete(
    wds_run: Path,
    ckpt: Path,
    tmp_path: Path,
    inject_failure: Callable[[str], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A complete run loses a shard; the re-run that should redo it fails: _SUCCESS must not survive."""
    out = tmp_path / "out"
    shutil.copytree(wds_run, out)
    (out / "samples-000001.tar").unlink()
    inject_failure("1")
    user_error(gen_argv(ckpt, out, 550, 200, "--workers", "1", "--max-retries", "0"), capsys)
    assert not (out / "_SUCCESS").exists() and not (out / "_manifest.json").exists()
    assert set(shards(out)) == {"samples-000000.tar", "samples-000002.tar"}


# ----------------------------------------------------------------------------------------- 6: bad input


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--format", "zip"], "unknown --format 'zip'; choose webdataset, parquet"),
        (["--image-format", "gif"], "unknown --image-format 'gif'; choose png, jpeg, webp, npy"),
        (["--shard-size", "0"], "--shard-size must be at least 1"),
    ],
)
def test_bad_options(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], expected: str
) -> None:
    assert expected in user_error(gen_argv(ckpt, tmp_path / "out", 10, 5) + extra, capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("count", "expected"),
    [
        ("0", "--count must be at least 1, got 0"),
        ("-5", "--count must be at least 1, got -5"),
        ("abc", "--count must be a number such as 1e6 or 1_000_000, got 'abc'"),
        ("1.5", "--count must be a whole number"),
    ],
)
def test_bad_count(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], count: str, expected: str
) -> None:
    assert expected in user_error(gen_argv(ckpt, tmp_path / "out", count, 5), capsys)


def test_parse_count() -> None:
    for text in ("1e6", "1000000", "1_000_000", " 1_000_000 ", 1_000_000):
        assert parse_count(text) == 1_000_000
    for text in ("1.5", "1e-3", "", "0", 0, "-1"):
        with pytest.raises(UserError):
            parse_count(text)


def test_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = user_error(gen_argv(tmp_path / "nope", tmp_path / "out", 10, 5), capsys)
    assert "checkpoint not found" in line and "nope" in line
    assert not (tmp_path / "out").exists()


def test_corrupt_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.pt").write_bytes(os.urandom(4096))
    line = user_error(gen_argv(bad, tmp_path / "out", 10, 5), capsys)
    assert "corrupt or unreadable checkpoint" in line
    assert not (tmp_path / "out").exists()


def test_output_that_is_a_file(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "out").write_text("a file")
    assert "is a file" in user_error(gen_argv(ckpt, tmp_path / "out", 10, 5), capsys)
    assert (tmp_path / "out").read_text() == "a file"


def test_output_holding_other_files(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = user_error(gen_argv(ckpt, out, 10, 5), capsys)
    assert "not empty" in line and "no vaeforge generate run" in line
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_a_different_plan_needs_overwrite(
    ckpt: Path, wds_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    shutil.copytree(wds_run, out)
    before = shards(out)
    line = user_error(gen_argv(ckpt, out, 550, 200, "--seed", "1"), capsys)
    assert "different seed" in line and "--overwrite" in line
    assert shards(out) == before and (out / "_SUCCESS").is_file()  # nothing already written is lost

    generate(ckpt, out, 550, 200, "--seed", "1", "--overwrite")
    manifest = assert_matches_manifest(out, [200, 200, 150])
    assert manifest["seed"] == 1
    after = shards(out)
    assert set(after) == set(before) and all(after[k] != before[k] for k in after)


# ----------------------------------------------------------------------------------------- 7: full disk


def _disk_full_after(limit: int) -> Callable[..., int]:
    """A _HashingFile.write that raises ENOSPC once `limit` bytes have gone to disk."""
    real, written = writers_mod._HashingFile.write, [0]

    def write(file: writers_mod._HashingFile, data: object) -> int:
        n = memoryview(data).nbytes  # type: ignore[arg-type]
        if written[0] + n > limit and not file._discarding:
            raise OSError(errno.ENOSPC, "No space left on device")
        written[0] += n
        return real(file, data)

    return write


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
@pytest.mark.parametrize("where", ["write", "fsync"])
def test_disk_full_in_a_worker_leaves_nothing(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, where: str
) -> None:
    cfg = GenerateConfig(
        checkpoint=str(ckpt), output=str(tmp_path), count=40, shard_size=40, format=fmt, batch_size=16
    )
    worker = ShardWorker(str(ckpt), cfg, 1, "test")
    if where == "write":
        monkeypatch.setattr(writers_mod._HashingFile, "write", _disk_full_after(20_000))
    else:

        def full(self: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(writers_mod._HashingFile, "sync_and_close", full)
    final = tmp_path / f"samples-000000.{'tar' if fmt == 'webdataset' else 'parquet'}"
    with pytest.raises(OSError) as exc:
        worker.run(ShardTask(0, 40, str(final)))
    assert exc.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []  # no final shard, no temp file


def test_driver_reports_disk_full_as_a_user_error(tmp_path: Path) -> None:
    cfg = GenerateConfig(checkpoint="c", output=str(tmp_path), count=10)
    task = ShardTask(3, 10, str(tmp_path / "samples-000003.tar"))
    task_error = SimpleNamespace(cause=OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(UserError, match="disk full while writing shard 3") as exc:
        generate_mod._raise_if_disk_full(task_error, task, cfg)  # type: ignore[arg-type]
    assert "re-run the same command" in str(exc.value)
    for other in (SimpleNamespace(cause=OSError(errno.EIO, "I/O")), SimpleNamespace(cause=None)):
        generate_mod._raise_if_disk_full(other, task, cfg)  # type: ignore[arg-type]  # not disk full: retried


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a real full filesystem. Needs root (mount); skipped where not permitted."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_real_full_disk_then_resume(
    ckpt: Path, run_2000: Path, small_tmpfs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    count, size = 2000, 100  # ~0.5 MB of PNGs a shard: the 2 MiB tmpfs fills after about 3 shards
    out = small_tmpfs / "out"
    line = user_error(gen_argv(ckpt, out, count, size, "--workers", "2"), capsys)
    assert "disk full" in line and "re-run the same command" in line
    assert not (out / "_SUCCESS").exists() and not (out / "_manifest.json").exists()
    recorded = ledger(out)
    assert 0 < len(recorded) < count // size
    for r in recorded:  # what the ledger calls done is complete
        data = (out / Path(r["path"]).name).read_bytes()
        assert len(data) == r["bytes"] and hashlib.sha256(data).hexdigest() == r["sha256"]

    # Free space (grow the tmpfs) and re-run the same command: it resumes to the same bytes.
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True)
    generate(ckpt, out, count, size, "--workers", "2")
    assert_matches_manifest(out, [size] * (count // size))
    assert shards(out) == shards(run_2000)
    assert temp_files(out) == []


# ----------------------------------------------------------------------------------- 8: idempotent re-run


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_rerunning_a_complete_run_changes_nothing(ckpt: Path, wds_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(wds_run, out)  # copy2: mtimes kept
    watched = [*shards(out), "_manifest.json", "_SUCCESS"]
    before = {name: ((out / name).read_bytes(), (out / name).stat().st_mtime_ns) for name in watched}
    generate(ckpt, out, 550, 200, "--workers", "2", "--batch-size", "50")  # speed options may change
    assert {name: (out / name).read_bytes() for name in watched} == {n: b for n, (b, _) in before.items()}
    for name in shards(out):
        assert (out / name).stat().st_mtime_ns == before[name][1]  # not rewritten
    assert sorted(r["index"] for r in ledger(out)) == [0, 1, 2]


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_a_moved_run_resumes_from_its_own_files(ckpt: Path, wds_run: Path, tmp_path: Path) -> None:
    """The ledger must check the shards in the directory being resumed, not where they were written."""
    out = tmp_path / "moved"
    shutil.copytree(wds_run, out)
    (out / "samples-000001.tar").unlink()  # the original still has it
    generate(ckpt, out, 550, 200)
    assert shards(out) == shards(wds_run)
    assert_matches_manifest(out, [200, 200, 150])
    assert all(Path(r["path"]).parent == out for r in ledger(out))


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_a_record_left_as_a_temp_is_not_trusted(ckpt: Path, wds_run: Path, tmp_path: Path) -> None:
    """A driver killed between writing a done record and renaming it into place leaves NNNNNN.json.tmp-PID
    (seen in CI under load). The re-run must redo that shard and record it under its own name, not take
    the temp for the record and leave the ledger one short."""
    out = tmp_path / "out"
    shutil.copytree(wds_run, out)
    done = out / ".vaeforge" / "done"
    (done / "000001.json").rename(done / "000001.json.tmp-4242")
    for name in ("_manifest.json", "_SUCCESS"):
        (out / name).unlink()  # the killed run never got that far
    generate(ckpt, out, 550, 200)
    assert sorted(p.name for p in done.iterdir()) == ["000000.json", "000001.json", "000002.json"]
    assert sorted(r["index"] for r in ledger(out)) == [0, 1, 2]
    assert shards(out) == shards(wds_run)
    assert_matches_manifest(out, [200, 200, 150])
