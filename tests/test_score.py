"""`vaeforge score`: outliers rank first, mislabeled files are found, output reads back, errors are one line.

The models are fitted here for a few hundred Adam steps on a folder of smooth dark images. They are
smaller than the tiny preset (16x16 images, 3x3 kernels): on a shared 2-core CPU the tiny preset costs
~0.2 s a step, this one ~0.03 s. An unfitted model ranks the dark images above the noise, so the ranking
tests fail without the fit.
"""

from __future__ import annotations

import dataclasses
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from test_cli import user_error  # the same exit-2, one-line contract

from vaeforge.checkpoint import save_checkpoint
from vaeforge.cli import main
from vaeforge.config import ModelConfig, ScoreConfig, get_preset
from vaeforge.errors import UserError
from vaeforge.model import VAE, elbo_loss
from vaeforge.runtime import to_model_input
from vaeforge.score import grid_location, robust_threshold, run_score

MICRO = ModelConfig(
    image_size=16, enc_filters=(8, 16, 32), dec_filters=(16, 8), kernel_size=3, dense_dim=64, latent_dim=8
)
NOISE_AT = (5, 20, 36)  # positions of the outliers among img000.png .. img042.png
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def smooth(rng: np.random.Generator, lo: float, hi: float, size: int = 16) -> np.ndarray:
    """A gradient between two random colours with channels in [lo, hi]: what the model learns as normal."""
    c0, c1 = rng.uniform(lo, hi, size=(2, 3))
    t = np.linspace(0.0, 1.0, size)
    t = (t[:, None] + t[None, :]) / 2 if rng.integers(2) else np.broadcast_to(t[:, None], (size, size))
    return np.clip(c0 + (c1 - c0) * t[..., None], 0, 255).astype(np.uint8)


def fit(config: ModelConfig, images: np.ndarray, labels: np.ndarray | None = None, steps: int = 300) -> VAE:
    """A model initialised and fitted with seeded Adam steps on the ELBO, batches of 16, one thread."""
    torch.set_num_threads(1)  # the machine is shared; one thread wastes no time on contention
    torch.manual_seed(0)
    model = VAE(config)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x_all = to_model_input(torch.from_numpy(images), torch.device("cpu"))
    y_all = None if labels is None else torch.as_tensor(labels)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(images), (16,), generator=g)
        y = None if y_all is None else y_all[idx]
        loss = elbo_loss(x_all[idx], model(x_all[idx], generator=g, y=y)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def save_png(path: Path, image: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return str(path.resolve())


@pytest.fixture(scope="module")
def outliers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """43 images, 3 of them uniform noise, an empty file, and a model fitted on the 40 smooth dark ones."""
    root = tmp_path_factory.mktemp("outliers")
    rng = np.random.default_rng(0)
    normal = np.stack([smooth(rng, 0, 60) for _ in range(40)])
    it = iter(normal)
    paths, noise = [], []
    for i in range(43):
        image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) if i in NOISE_AT else next(it)
        paths.append(save_png(root / "data" / f"img{i:03d}.png", image))
        if i in NOISE_AT:
            noise.append(paths[-1])
    (root / "data" / "broken.png").write_bytes(b"")  # unreadable: counted, never scored
    ckpt = save_checkpoint(root / "ckpt", fit(MICRO, normal), {"epoch": 0, "metrics": {}})
    return {"root": root, "data": root / "data", "ckpt": ckpt, "paths": paths, "noise": noise}


def score_cli(*argv: str, capsys: pytest.CaptureFixture[str]) -> str:
    try:
        main(["score", *argv])
    except SystemExit as e:  # main() exits only on errors
        pytest.fail(f"vaeforge score exited with {e.code}: {capsys.readouterr().err}")
    return ANSI.sub("", capsys.readouterr().out)


def test_outliers_rank_first_and_the_table_reads_back(
    outliers: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out" / "scores.parquet"  # a directory that does not exist yet
    printed = score_cli("--checkpoint", str(outliers["ckpt"]), "--data", str(outliers["data"]),
                        "--output", str(out), "--top", "5", "--cache-dir", str(tmp_path / "cache"),
                        capsys=capsys)  # fmt: skip
    table = pq.read_table(out)
    assert table.num_rows == 43 and sorted(table["path"].to_pylist()) == sorted(outliers["paths"])
    types = {f.name: f.type for f in table.schema}
    assert types["path"] == pa.string() and types["score"] == pa.float64() and types["rank"] == pa.int64()
    assert types["label"] == pa.int64() and types["class"] == pa.string()
    rows = table.to_pylist()
    assert {r["path"] for r in rows[:3]} == set(outliers["noise"])  # the three noise files, first
    assert [r["rank"] for r in rows] == list(range(1, 44))
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True) and min(scores) > 0
    assert all(r["outlier"] for r in rows[:3]) and sum(r["outlier"] for r in rows) < 10
    assert all(r["label"] is None and r["class"] is None for r in rows)  # the folder has no classes
    assert all(r["best_label"] is None and r["label_mismatch"] is None for r in rows)  # unconditional
    for r in rows:
        assert r["bits_per_dim"] == pytest.approx(r["score"] / (16 * 16 * 3 * np.log(2)))
        assert r["recon_mse"] > 0 and r["kl"] >= 0
    frame = pd.read_parquet(out)  # pandas reads it too
    assert len(frame) == 43 and frame["path"].iloc[0] == rows[0]["path"]
    assert frame["score"].dtype == np.float64
    with Image.open(tmp_path / "out" / "scores_top.png") as grid:  # 5 pairs, 3 pairs to a row
        assert grid.size == (6 * 18 + 2, 2 * 18 + 2) and grid.mode == "RGB"
    assert "Most anomalous 5 of 43 images" in printed
    assert f"paths below {Path(outliers['paths'][0]).parent}\n" in printed  # the table shows names below it
    assert all(Path(p).name in printed for p in outliers["noise"])
    assert "median -ELBO" in printed and "images above it" in printed
    assert "unreadable inputs, not scored: 1 empty" in printed and "broken.png" not in str(rows)


def test_scores_are_deterministic(outliers: dict, tmp_path: Path) -> None:
    cfg = ScoreConfig(
        checkpoint=str(outliers["ckpt"]), data=str(outliers["data"]), output=str(tmp_path / "a.parquet"),
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    first = run_score(cfg).table.to_pylist()
    again = run_score(dataclasses.replace(cfg, output=str(tmp_path / "b.parquet"))).table  # a cache hit
    assert again.to_pylist() == first
    assert pq.read_table(tmp_path / "a.parquet").equals(pq.read_table(tmp_path / "b.parquet"))
    assert len(list((tmp_path / "cache").iterdir())) == 1
    # an image's score depends on its pixels and the seed, not on the batch or what else is scored
    subset = run_score(dataclasses.replace(cfg, batch_size=7, max_samples=20)).table.to_pylist()
    by_path = {r["path"]: r["score"] for r in first}
    assert len(subset) == 20
    for r in subset:
        assert r["score"] == pytest.approx(by_path[r["path"]], rel=1e-5)
    other_seed = run_score(dataclasses.replace(cfg, seed=1)).table.to_pylist()
    assert {r["path"]: r["score"] for r in other_seed} != by_path  # the seed does pick the noise


@pytest.fixture(scope="module")
def labeled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Dark and bright images in class folders, two of them filed under the wrong class, and a
    conditional model fitted with the true labels."""
    root = tmp_path_factory.mktemp("labeled")
    rng = np.random.default_rng(1)
    images = np.stack([smooth(rng, 190, 255) for _ in range(30)] + [smooth(rng, 0, 60) for _ in range(30)])
    truth = np.repeat([0, 1], 30)  # folder names sort as bright (0), dark (1)
    wrong = {3: "dark", 40: "bright"}  # index -> the folder it is misfiled in
    paths = {}
    for i, image in enumerate(images):
        folder = wrong.get(i, ["bright", "dark"][truth[i]])
        paths[i] = save_png(root / "data" / folder / f"{i:03d}.png", image)
    model = fit(dataclasses.replace(MICRO, num_classes=2), images, truth)
    ckpt = save_checkpoint(root / "ckpt", model, {"epoch": 0, "metrics": {}})
    return {"data": root / "data", "ckpt": ckpt, "misfiled": {paths[i]: truth[i] for i in wrong}}


def test_conditional_model_finds_mislabeled_files(
    labeled: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "scores.parquet"
    printed = score_cli("--checkpoint", str(labeled["ckpt"]), "--data", str(labeled["data"]),
                        "--output", str(out), "--top", "4", capsys=capsys)  # fmt: skip
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 60
    flagged = {r["path"]: r for r in rows if r["label_mismatch"]}
    assert set(flagged) == set(labeled["misfiled"])
    for path, true_label in labeled["misfiled"].items():
        r = flagged[path]
        assert r["best_label"] == true_label and r["best_class"] == ["bright", "dark"][true_label]
        assert r["label"] == 1 - true_label and r["label_margin"] > 10
    assert all(r["label_margin"] == 0 for r in rows if not r["label_mismatch"])
    assert {r["class"] for r in rows} == {"bright", "dark"}
    assert "labels: 2 images fit another class better" in printed
    assert all(Path(p).name in printed for p in labeled["misfiled"])
    # without the check: no best label, and one pass instead of three
    quick = run_score(ScoreConfig(checkpoint=str(labeled["ckpt"]), data=str(labeled["data"]),
                                  output=str(tmp_path / "q.parquet"), label_check=False))  # fmt: skip
    assert not quick.label_check and quick.table["best_label"].null_count == 60


def test_conditional_model_refuses_unlabeled_images(
    labeled: dict, outliers: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = user_error(["score", "--checkpoint", str(labeled["ckpt"]), "--data", str(outliers["data"]),
                       "--output", str(tmp_path / "s.parquet")], capsys)  # fmt: skip
    assert "conditional on 2 classes" in line and "has no labels" in line
    assert not (tmp_path / "s.parquet").exists()


def test_user_errors_are_one_line(outliers: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt, data = str(outliers["ckpt"]), str(outliers["data"])
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "model.pt").write_bytes(b"not a checkpoint")
    out = str(tmp_path / "s.parquet")
    cases = {
        "checkpoint not found": ["--checkpoint", str(tmp_path / "nope"), "--data", data, "--output", out],
        "corrupt or unreadable checkpoint": ["--checkpoint", str(damaged), "--data", data, "--output", out],
        "data path not found": ["--checkpoint", ckpt, "--data", str(tmp_path / "none"), "--output", out],
        "is a directory": ["--checkpoint", ckpt, "--data", data, "--output", str(tmp_path)],
        "--top must be at least 1": ["--checkpoint", ckpt, "--data", data, "--output", out, "--top", "0"],
        "--recon-loss must be one of": ["--checkpoint", ckpt, "--data", data, "--recon-loss", "l1"],
        "Missing option '--data'": ["--checkpoint", ckpt],
    }
    for expected, argv in cases.items():
        assert expected in user_error(["score", *argv], capsys), expected
    assert not Path(out).exists()


def test_output_to_object_storage(outliers: dict, s3_prefix: str, tmp_path: Path) -> None:
    """The table and the grid go to a URI as they go to a local path (one PUT each: all or nothing)."""
    from vaeforge import storage

    out = storage.join(s3_prefix, "scores", "s.parquet")
    cfg = ScoreConfig(checkpoint=str(outliers["ckpt"]), data=str(outliers["data"]), output=out, top=3,
                      cache_dir=str(tmp_path / "cache"))  # fmt: skip
    result = run_score(cfg)
    table = pq.read_table(pa.BufferReader(storage.read_bytes(out)))
    assert table.num_rows == 43 and table["path"].to_pylist() == result.table["path"].to_pylist()
    assert result.grid == storage.join(s3_prefix, "scores", "s_top.png")
    with Image.open(io.BytesIO(storage.read_bytes(result.grid))) as grid:
        assert grid.size == (4 * 18 + 2, 2 * 18 + 2)  # 3 pairs, 2 to a row


def test_tiny_preset_checkpoint_scores_builtin_images(tmp_path: Path) -> None:
    """The real preset end to end on a few built-in images (no fit: only the plumbing is checked)."""
    ckpt = save_checkpoint(tmp_path / "ckpt", VAE(get_preset("tiny")), {"epoch": 0, "metrics": {}})
    result = run_score(
        ScoreConfig(
            checkpoint=str(ckpt),
            data="builtin",
            output=str(tmp_path / "s.parquet"),
            max_samples=6,
            top=2,
            cache_dir=str(tmp_path / "cache"),
        )  # fmt: skip
    )
    rows = result.table.to_pylist()
    assert sorted(r["path"] for r in rows) == [f"builtin:{i:06d}" for i in range(6)]
    assert {r["class"] for r in rows} <= {"circle", "square", "triangle", "star", "ring", "cross"}
    assert result.grid == str(tmp_path / "s_top.png") and Path(result.grid).is_file()


def test_robust_threshold_and_grid_location() -> None:
    scores = np.array([10.0, 11.0, 12.0, 13.0, 14.0, 100.0])
    median, threshold = robust_threshold(scores)
    assert median == 12.5 and threshold == pytest.approx(12.5 + 3 * 1.4826 * 1.5)
    assert (scores > threshold).sum() == 1
    assert grid_location("scores.parquet") == "scores_top.png"
    assert grid_location("s3://bucket/run/scores.parquet") == "s3://bucket/run/scores_top.png"
    assert grid_location("/tmp/x/out") == "/tmp/x/out_top.png"
    with pytest.raises(UserError, match="--batch-size"):
        ScoreConfig(checkpoint="c", data="d", batch_size=0)
