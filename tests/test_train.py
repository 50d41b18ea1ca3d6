"""Training end to end through the CLI, as a user runs it, on the shared local Ray: artifacts, DDP, resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vaeforge.checkpoint import list_checkpoints, load_trainer_state, load_vae
from vaeforge.cli import main
from vaeforge.config import LR_FLOOR, TrainConfig, learning_rate
from vaeforge.errors import UserError
from vaeforge.sampling import load_gmm

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session")]

# 256 built-in images -> 13 held out, 243 train -> 7 steps of 32 per epoch: a few seconds per epoch.
TINY = ["--preset", "tiny", "--max-samples", "256", "--batch-size", "32", "--builtin-count", "256"]
GRID_PX = 8 * (64 + 2) + 2  # grid_size tiles of 64 px with 2 px padding


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def train(output: Path, cache: Path, *extra: str) -> None:
    """`vaeforge train ...` in this process, so the session's Ray is reused; fails on any exit code."""
    try:
        main(["train", *TINY, "--cache-dir", str(cache), "--output", str(output), *extra])
    except SystemExit as e:  # main() exits only on errors
        pytest.fail(f"vaeforge train exited with {e.code}")


def stacks(pid: int) -> str:
    """Every thread's Python stack in process `pid` (py-spy comes with ray[default]), for a hang's report."""
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        return "(no py-spy beside this Python)"
    try:
        argv = [str(spy), "dump", "--pid", str(pid)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"(py-spy failed: {e})"
    return done.stdout + done.stderr


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def steps_per_epoch(run: Path) -> int:
    run_json = json.loads((run / "run.json").read_text())
    return run_json["split"]["train"] // run_json["config"]["batch_size"]


@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, ray_session: None) -> Path:
    """1 worker, 2 epochs straight; shared by the artifact test and the resume-determinism test."""
    run = tmp_path_factory.mktemp("straight") / "run"
    train(run, cache_dir, "--epochs", "2")
    return run


@pytest.mark.timeout(300)
def test_one_worker_two_epochs_writes_a_complete_run(two_epoch_run: Path) -> None:
    run = two_epoch_run
    info = json.loads((run / "run.json").read_text())
    assert info["config"]["epochs"] == 2 and info["config"]["preset"] == "tiny"
    assert info["config"]["model"]["latent_dim"] == 16
    assert {"vaeforge", "torch", "ray", "python"} <= info["versions"].keys()
    assert info["data"]["source"] == "builtin" and info["data"]["images"] == 256
    assert info["split"] == {"train": 243, "val": 13}
    assert info["resumed"] == []

    rows = metrics(run)
    n = steps_per_epoch(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert [r["global_step"] for r in rows] == [n, 2 * n]
    for r in rows:
        for key in ("train_loss", "val_loss", "val_mse", "val_psnr"):
            assert math.isfinite(r[key]), key
        assert r["lr"] == 1e-3  # the default schedule is constant
        assert 0 < r["val_mse"] < 1 and r["val_psnr"] > 0

    samples = sorted(p.name for p in (run / "samples").glob("*.png"))
    assert samples == [f"{kind}_epoch{e:04d}.png" for kind in ("recon", "samples") for e in (1, 2)]
    # 64 prior samples fill the 8x8 grid; the reconstruction grid pairs up at most 32 held-out images,
    # and this run holds out only 13: 26 tiles, 4 rows.
    recon_rows = math.ceil(2 * min(info["split"]["val"], 32) / 8)
    for name in samples:
        with Image.open(run / "samples" / name) as im:
            im.load()
            height = GRID_PX if name.startswith("samples") else recon_rows * (64 + 2) + 2
            assert im.size == (GRID_PX, height) and im.mode == "RGB"

    # Ray keeps the best checkpoint by held-out loss and always the latest (one dir if they coincide).
    ckpts = list_checkpoints(run)
    best_row = min(rows, key=lambda r: r["val_loss"])
    expected = {f"epoch{r['epoch']:04d}_step{r['global_step']:09d}" for r in (best_row, rows[-1])}
    assert {c.name for c in ckpts} == expected
    for c in ckpts:
        assert {"model.pt", "trainer.pt", "meta.json"} <= {p.name for p in c.iterdir()}
        meta = json.loads((c / "meta.json").read_text())
        assert meta["data"]["images"] == 256 and meta["data"]["val"] == 13

    loaded = load_vae(run)  # no flags: the model config travels inside the checkpoint
    assert loaded.path.name == f"epoch{best_row['epoch']:04d}_step{best_row['global_step']:09d}"
    # the end of training fitted generate's gmm sampler beside the best weights, per class (the built-in
    # shapes are labeled), on every training image
    gmm = load_gmm(loaded.path)
    assert gmm.per_class and gmm.class_ids() == list(range(6)) and gmm.meta["points"] == 243
    assert loaded.meta["metrics"]["val_loss"] == pytest.approx(best_row["val_loss"])
    with torch.no_grad():
        images = loaded.model.sample(4, generator=torch.Generator().manual_seed(0))
    assert images.shape == (4, 3, 64, 64)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


@pytest.mark.timeout(300)
def test_resume_continues_and_matches_a_straight_run(
    tmp_path: Path, cache_dir: Path, two_epoch_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    train(run, cache_dir, "--epochs", "1")
    assert [r["epoch"] for r in metrics(run)] == [1]
    capsys.readouterr()
    train(run, cache_dir, "--epochs", "2", "--resume")
    assert "resuming at epoch 2 step 0" in capsys.readouterr().err

    n = steps_per_epoch(run)
    rows = metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2]  # no duplicated or missing rows
    assert [r["global_step"] for r in rows] == [n, 2 * n]
    info = json.loads((run / "run.json").read_text())
    assert len(info["resumed"]) == 1 and info["config"]["epochs"] == 2

    latest = list_checkpoints(run)[-1]
    assert latest.name == f"epoch0002_step{2 * n:09d}"
    trainer = load_trainer_state(latest)
    loop = trainer["loop_state"]
    assert (loop["epoch"], loop["step"], loop["global_step"]) == (3, 0, 2 * n)
    assert [r["epoch"] for r in loop["history"]] == [1, 2]
    # Adam's per-parameter step counter carried on from the first run instead of restarting at 0.
    adam_steps = {int(s["step"]) for s in trainer["optimizer"]["state"].values()}
    assert adam_steps == {2 * n}

    # Epoch order and noise are pure functions of (seed, epoch, rank, step), so 1 + resume 1 == 2 straight.
    straight_rows = metrics(two_epoch_run)
    for key in ("train_loss", "val_loss", "val_mse"):
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in straight_rows], rel=1e-5), key
    resumed = load_vae(run, which="latest").model.state_dict()
    straight = load_vae(two_epoch_run, which="latest").model.state_dict()
    for k, v in straight.items():
        assert torch.allclose(resumed[k].float(), v.float(), rtol=1e-5, atol=1e-6), k


# a Ray start-up of its own, then 512-image epochs until the first checkpoint: ~60 s on 2 idle cores
@pytest.mark.timeout(600)
def test_ctrl_c_mid_run_says_one_line_and_resume_loses_nothing(
    tmp_path: Path, cache_dir: Path, own_ray_env: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    small = ["--preset", "tiny", "--max-samples", "512", "--batch-size", "32", "--builtin-count", "512"]
    argv = [sys.executable, "-m", "vaeforge", "train", *small, "--epochs", "200", "--no-dashboard"]
    argv += ["--cache-dir", str(cache_dir), "--output", str(run)]
    log_path = tmp_path / "train.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(argv, env=own_ray_env, start_new_session=True, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 400
            while time.monotonic() < deadline and proc.poll() is None:
                if (run / "checkpoints").is_dir() and list_checkpoints(run):
                    break
                time.sleep(0.2)
            assert proc.poll() is None, f"ended before it could be interrupted: {log_path.read_text()}"
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group
            try:
                rc = proc.wait(timeout=90)  # the driver gives Ray 10 s to stop, then exits regardless
            except subprocess.TimeoutExpired:
                said = log_path.read_text()
                pytest.fail(f"still running 90 s after Ctrl-C; its stacks:\n{stacks(proc.pid)}\n{said}")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
    said = log_path.read_text()
    assert rc == 130, said
    lines = [line for line in said.splitlines() if line.strip()]
    assert lines[-1] == (
        "error: interrupted; finished checkpoints and shards are kept, re-run with --resume to continue"
    ), said
    # Ray's "Unhandled error ... ray.util.queue.Empty" from an interrupted blocking queue.get came here
    assert "Traceback" not in said and "Unhandled error" not in said, said

    done = [r["epoch"] for r in metrics(run)]
    assert done == list(range(1, len(done) + 1))
    assert list_checkpoints(run), "the finished epochs' checkpoint is kept"  # (the run dir holds one)
    capsys.readouterr()
    train(run, cache_dir, "--epochs", str(done[-1] + 1), "--resume")
    rows = metrics(run)
    assert [r["epoch"] for r in rows] == list(range(1, done[-1] + 2))  # nothing lost, nothing twice


@pytest.mark.timeout(300)
def test_two_workers_ddp_and_overwrite(tmp_path: Path, cache_dir: Path) -> None:
    run = tmp_path / "run"
    # A previous run in the way: --overwrite replaces what vaeforge wrote and keeps the user's files.
    (run / "checkpoints" / "epoch0009_step000000099").mkdir(parents=True)
    (run / "run.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"epoch": 9}\n')
    (run / "notes.txt").write_text("mine")
    train(run, cache_dir, "--epochs", "1", "--workers", "2", "--overwrite", "--no-fit-sampler")

    assert (run / "notes.txt").read_text() == "mine"
    assert not (run / "checkpoints" / "epoch0009_step000000099").exists()
    info = json.loads((run / "run.json").read_text())
    assert info["config"]["workers"] == 2
    n = steps_per_epoch(run)
    rows = metrics(run)
    # Every rank reported once (else Ray would have hung) and validation was summed over both ranks.
    assert [(r["epoch"], r["global_step"]) for r in rows] == [(1, n)]
    assert math.isfinite(rows[0]["val_loss"]) and rows[0]["val_psnr"] > 0
    (ckpt,) = list_checkpoints(run)
    assert ckpt.name == f"epoch0001_step{n:09d}"
    assert not (ckpt / "sampler_gmm.npz").exists()  # --no-fit-sampler
    assert load_trainer_state(ckpt)["loop_state"]["global_step"] == n
    model = load_vae(run).model
    assert model.decoder(torch.zeros(2, 16)).shape == (2, 3, 64, 64)


def write_png(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


@pytest.mark.timeout(300)
def test_user_folder_with_classes_and_a_corrupt_file(tmp_path: Path, cache_dir: Path) -> None:
    data = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for cls, tint in (("cats", (200, 60, 60)), ("dogs", (60, 60, 200))):
        for i in range(40):
            img = np.clip(rng.normal(tint, 30, (24, 24, 3)), 0, 255).astype(np.uint8)
            write_png(data / cls / f"{i:03d}.png", img)
    (data / "dogs" / "broken.png").write_bytes(b"this is not a png at all")
    run = tmp_path / "run"
    train(run, cache_dir, "--data", str(data), "--epochs", "1")

    report = json.loads((run / "run.json").read_text())["data"]
    assert report["classes"] == ["cats", "dogs"] and report["labeled"]
    assert report["images"] == 80
    assert sum(report["skipped"].values()) == 1
    (examples,) = report["skipped_examples"].values()
    assert [Path(e).name for e in examples] == ["broken.png"]
    rows = metrics(run)
    assert [r["epoch"] for r in rows] == [1] and math.isfinite(rows[0]["val_loss"])
    meta = json.loads((list_checkpoints(run)[-1] / "meta.json").read_text())
    assert meta["data"]["classes"] == ["cats", "dogs"]


@pytest.mark.timeout(300)
def test_conditional_run_learns_the_classes_and_resumes(tmp_path: Path, cache_dir: Path) -> None:
    run = tmp_path / "run"
    train(run, cache_dir, "--conditional", "--epochs", "1")
    loaded = load_vae(run)
    assert loaded.model.config.num_classes == 6  # the built-in shapes' classes
    assert json.loads((run / "run.json").read_text())["config"]["model"]["num_classes"] == 6
    z = torch.zeros(2, loaded.model.config.latent_dim)
    with torch.no_grad():
        images = loaded.model.eval().decoder(z, torch.tensor([0, 3]))
    assert not torch.allclose(images[0], images[1])  # same latent, different class, different image
    train(run, cache_dir, "--conditional", "--epochs", "2", "--resume")
    assert [r["epoch"] for r in metrics(run)] == [1, 2]


@pytest.mark.timeout(120)
def test_conditional_needs_labels(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "flat"
    for i in range(40):
        write_png(data / f"{i:03d}.png", np.full((8, 8, 3), i * 5, np.uint8))
    with pytest.raises(SystemExit) as exc:
        main(["train", *TINY, "--cache-dir", str(cache_dir), "--data", str(data), "--conditional",
              "--output", str(tmp_path / "run")])  # fmt: skip
    assert exc.value.code == 2
    assert "--conditional needs labeled data" in capsys.readouterr().err


def test_cosine_schedule_runs_from_lr_to_the_floor_and_constant_stays() -> None:
    total = 1000
    rates = [learning_rate(1e-3, "cosine", s, total) for s in range(total)]
    assert rates[0] == pytest.approx(1e-3) and rates[-1] == pytest.approx(1e-3 * LR_FLOOR)
    assert rates[total // 2] == pytest.approx(1e-3 * (1 + LR_FLOOR) / 2, rel=1e-2)  # halfway: the mean
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))  # never rises
    assert learning_rate(1e-3, "cosine", 5 * total, total) == rates[-1]  # past the end: held at the floor
    assert {learning_rate(1e-3, "constant", s, total) for s in (0, 500, 999)} == {1e-3}
    with pytest.raises(UserError, match="--lr-schedule must be one of constant, cosine"):
        TrainConfig(output="runs/x", lr_schedule="linear")
