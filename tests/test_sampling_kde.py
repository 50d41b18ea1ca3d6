"""The kde sampler: bandwidth selection with known answers, per-class centres, exact regeneration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from vaeforge.checkpoint import load_vae, save_checkpoint
from vaeforge.config import GenerateConfig, get_preset
from vaeforge.errors import UserError
from vaeforge.fit_sampler import fit_and_store
from vaeforge.generate_worker import ShardTask, ShardWorker
from vaeforge.model import VAE
from vaeforge.sampling import load_fit
from vaeforge.sampling_kde import BANDWIDTHS, KDE_TRANSFORM, LatentKDE, fit_kde


def two_classes(n: int = 1000, d: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class 0 ~ N(0, I), class 1 ~ N(100, 4 I): far apart, with different spreads."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], n // 2)
    x = rng.standard_normal((n, d)) * np.where(labels == 1, 2.0, 1.0)[:, None] + 100.0 * labels[:, None]
    return x, labels


def test_bandwidth_is_chosen_by_heldout_likelihood() -> None:
    """Smooth data gets a wide kernel; data made of near-copies gets the narrowest one (a held-out
    point then sits on a copy of itself, so any width beyond the jitter costs likelihood)."""
    x, labels = two_classes(4000)
    kde = fit_kde(x, labels, np.arange(len(x)), seed=0)
    assert kde.meta["bandwidth_selection"] == "held-out likelihood"
    assert 0.3 <= kde.bandwidth <= 0.7  # Silverman's rule gives 0.37 for 2000 points in 4-D
    scores = kde.meta["heldout_loglik"]
    assert scores[f"{kde.bandwidth:g}"] == max(scores.values()) and len(scores) == len(BANDWIDTHS)
    rng = np.random.default_rng(1)
    copies = np.repeat(x[::20], 20, axis=0) + 1e-4 * rng.standard_normal((len(x), 4))
    assert fit_kde(copies, np.repeat(labels[::20], 20), np.arange(len(x))).bandwidth == min(BANDWIDTHS)
    # too few points to hold any out: the default, and a given bandwidth is kept
    assert fit_kde(x[:30], None, np.arange(30)).meta["bandwidth_selection"].startswith("default")
    assert fit_kde(x, labels, np.arange(len(x)), bandwidth=0.25).bandwidth == 0.25


def test_samples_sit_around_their_class_centres_with_the_kernel_spread() -> None:
    x, labels = two_classes(4000)
    kde = fit_kde(x, labels, np.arange(len(x)) + 7, seed=0, bandwidth=0.5)  # sources offset by 7
    assert kde.class_ids() == [0, 1]
    want = np.repeat([0, 1], 3000)
    z = kde.sample(3, 1, 0, len(want), temperature=1.0, labels=want)
    src = kde.sources(3, 1, 0, len(want), labels=want) - 7
    assert (labels[src] == want).all()  # each sample started from a point of its own class
    offsets = z - x[src]
    for c, sd in ((0, 1.0), (1, 2.0)):  # the offset is h * L_c @ noise: std h * the class's std
        np.testing.assert_allclose(offsets[want == c].std(0), 0.5 * sd, rtol=0.1)
        np.testing.assert_allclose(offsets[want == c].mean(0), 0.0, atol=0.05 * sd)
    np.testing.assert_allclose(
        (kde.sample(3, 1, 0, 100, 0.5, want[:100]) - x[src[:100]]).std(), 0.25, rtol=0.2
    )
    pooled = kde.sample(3, 1, 0, 4000)  # no labels: the whole training distribution, half of each class
    assert abs((pooled[:, 0] > 50).mean() - 0.5) < 0.05
    with pytest.raises(UserError, match="no training latent of class 5"):
        kde.sample(0, 0, 0, 2, labels=np.array([0, 5]))


def test_a_sample_regenerates_alone_and_the_fit_round_trips(tmp_path: Path) -> None:
    x, labels = two_classes(400, d=16)
    kde = fit_kde(x, labels, np.arange(len(x)), seed=0)
    want = np.arange(40) % 2
    batch = kde.sample(5, 2, 100, 40, 1.0, want)
    for j in (0, 7, 39):
        np.testing.assert_array_equal(kde.sample(5, 2, 100 + j, 1, 1.0, want[j : j + 1])[0], batch[j])
    np.testing.assert_array_equal(kde.sample(5, 2, 110, 10, 1.0, want[10:20]), batch[10:20])
    assert not np.array_equal(kde.sample(6, 2, 100, 40, 1.0, want), batch)
    kde.save(tmp_path / "k.npz")
    back = LatentKDE.load(tmp_path / "k.npz")
    assert back.sha256() == kde.sha256() and back.meta == kde.meta
    np.testing.assert_array_equal(back.sample(5, 2, 100, 40, 1.0, want), batch)
    other = fit_kde(x, labels, np.arange(len(x)), seed=0, bandwidth=kde.bandwidth * 2)
    assert other.sha256() != kde.sha256()
    assert fit_kde(x, labels, np.arange(len(x)), seed=0).sha256() == kde.sha256()  # deterministic


def test_kde_generation_regenerates_from_metadata(tmp_path: Path) -> None:
    """fit_and_store writes both fits; a kde shard's sample decodes again from its json alone."""
    torch.manual_seed(0)
    model = VAE(get_preset("tiny")).eval()
    ckpt = save_checkpoint(
        tmp_path / "ckpt", model, {"epoch": 0, "metrics": {}, "data": {"classes": ["a", "b"]}}
    )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (200, 64, 64, 3), dtype=np.uint8)
    labels = np.repeat([0, 1], 100)
    fits = fit_and_store(load_vae(ckpt), images, labels, k=2, seed=0, index=np.arange(10, 200))
    assert set(fits) == {"gmm", "kde"} and fits["kde"][0] == str(ckpt / "sampler_kde.npz")
    kde = load_fit(ckpt, "kde")
    assert kde.transform == KDE_TRANSFORM and kde.meta["train_n"] == 190 and len(kde.points) == 190
    assert sorted(kde.source.tolist()) == list(range(190))  # positions in the training split (index)
    cfg = GenerateConfig(
        checkpoint=str(ckpt), output=str(tmp_path), count=20, sampler="kde", classes="1:20", precision="fp32"
    )
    worker = ShardWorker(str(ckpt), cfg, 1, "ckpt-id")
    worker.run(ShardTask(2, 20, str(tmp_path / "s.tar"), class_counts=(0, 20)))
    samples = list(wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False).decode("rgb8"))
    assert {int(s["cls"]) for s in samples} == {1}
    meta = samples[3]["json"]
    assert meta["sampler"] == "kde"
    z = kde.sample(meta["seed"], meta["shard"], meta["index"], 1, labels=np.array([meta["label"]]))
    np.testing.assert_array_equal(worker.decode(z)[0], samples[3]["png"])


def test_kde_without_a_fit_says_how_to_fit_one(tmp_path: Path) -> None:
    ckpt = save_checkpoint(tmp_path / "ckpt", VAE(get_preset("tiny")), {"epoch": 0, "metrics": {}})
    cfg = GenerateConfig(checkpoint=str(ckpt), output=str(tmp_path), count=1, sampler="kde")
    with pytest.raises(UserError, match="--sampler kde needs a fitted kernel density.*vaeforge fit-sampler"):
        ShardWorker(str(ckpt), cfg, 1, "ckpt-id")
