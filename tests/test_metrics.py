"""Known-answer tests for vaeforge.metrics: pinned feature space, FID/KID/PRDC, memorisation, ELBO, TSTR."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from vaeforge.config import PRESETS
from vaeforge.data.builtin import generate_shapes
from vaeforge.metrics import (
    FEATURE_DIM,
    FEATURE_SPACE,
    ClassifierConfig,
    accuracy,
    augmentation_gain,
    distribution_metrics,
    extract_features,
    fid,
    frechet_distance,
    heldout_likelihood,
    kid,
    memorization,
    prdc,
    train_classifier,
    tstr,
)
from vaeforge.metrics.classifier import stratified_subset
from vaeforge.metrics.distribution import frechet_from_samples, gaussian_stats
from vaeforge.metrics.features import make_weights, weights_sha256
from vaeforge.metrics.neighbours import knn_radii, nearest
from vaeforge.model import VAE, elbo_loss
from vaeforge.runtime import to_model_input


def gaussian(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)) + shift


# ---------------------------------------------------------------- feature space


def pattern_images() -> np.ndarray:
    """4 fixed 64x64 RGB images from integer arithmetic alone: the same bytes on every machine."""
    n, h, w, c = np.meshgrid(np.arange(4), np.arange(64), np.arange(64), np.arange(3), indexing="ij")
    return ((n * 37 + h * 5 + w * 3 + c * 101 + (h * w) // 7) % 256).astype(np.uint8)


def test_feature_weights_are_pinned() -> None:
    # If this fails the feature space changed: bump FEATURE_SPACE, then update the checksum.
    assert FEATURE_SPACE == "vaeforge-randconv-v1"
    assert (
        weights_sha256(make_weights()) == "3fd2c2b252dd0b528941377a95a6d808b99ae365d6b8e802c9be2bc51cb8c47d"
    )


def test_features_of_a_fixed_input_are_pinned() -> None:
    f = extract_features(pattern_images())
    assert f.shape == (4, FEATURE_DIM) == (4, 1984) and f.dtype == np.float64
    # Tolerances allow other CPUs' float32 summation orders, not a change of architecture or pooling.
    first = [[1.1804773808, 0.7081090808, 1.0927830935], [1.0905023813, 0.6822400093, 1.0385484695]]
    np.testing.assert_allclose(f[[0, 3], :3], first, rtol=1e-4)
    np.testing.assert_allclose(f[1, -3:], [0.3520608246, 0.0, 0.7088857889], rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(
        f.sum(axis=1), [1035.7416967289, 1032.5903502091, 1038.7889585865, 1033.5223760364], rtol=1e-5
    )


def test_features_are_deterministic_and_batch_independent() -> None:
    images, _ = generate_shapes(20, seed=3)
    images.setflags(write=False)  # as the data cache's memory maps are: torch must not warn about it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a, b = extract_features(images), extract_features(images)
    assert np.array_equal(a, b)
    np.testing.assert_allclose(extract_features(images, batch_size=3), a, rtol=1e-5, atol=1e-7)
    assert not np.allclose(a[0], a[1])  # different images, different features


@pytest.mark.parametrize("bad", [np.zeros((2, 64, 64, 3), np.float32), np.zeros((2, 64, 64), np.uint8)])
def test_features_reject_bad_input(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        extract_features(bad)


# ---------------------------------------------------------------- FID


def test_frechet_distance_matches_closed_form_for_commuting_covariances() -> None:
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))  # shared eigenvectors
    d1, d2 = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(d1 + d2 - 2 * np.sqrt(d1 * d2))
    got = frechet_distance(mu1, (q * d1) @ q.T, mu2, (q * d2) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_closed_form_in_2d() -> None:
    # For 2x2 M with eigenvalues >= 0, tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)): no shared basis needed.
    s1, s2 = np.array([[2.0, 0.6], [0.6, 1.0]]), np.array([[0.5, -0.2], [-0.2, 1.5]])
    m = s1 @ s2
    tr_sqrt = math.sqrt(np.trace(m) + 2 * math.sqrt(np.linalg.det(m)))
    expected = 1.0**2 + 2.0**2 + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(np.zeros(2), s1, np.array([1.0, -2.0]), s2) == pytest.approx(expected, rel=1e-9)


def test_fid_of_samples_approaches_the_gaussians_closed_form() -> None:
    d = 8
    a = gaussian(20_000, d, 1)  # N(0, I)
    b = gaussian(20_000, d, 2) * 2.0 + 0.5  # N(0.5, 4 I)
    expected = d * 0.5**2 + d * (1 + 4 - 2 * 2)  # |mu|^2 + tr(I + 4I - 2 * 2I)
    assert fid(a, b) == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("n, d", [(40, 64), (200, 16)])  # fewer and more samples than dims: both routes
def test_fid_routes_agree(n: int, d: int) -> None:
    a, b = gaussian(n, d, 9), gaussian(n + 7, d, 10) * 1.5 + 0.2
    cov_route = frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
    assert fid(a, b) == pytest.approx(cov_route, rel=1e-6)
    assert frechet_from_samples(a, b) == pytest.approx(cov_route, rel=1e-6)


def test_identical_sets_score_perfectly() -> None:
    x = gaussian(400, 16, 4)
    assert fid(x, x) == pytest.approx(0.0, abs=1e-8)
    p = prdc(x, x)
    assert p.precision == p.recall == p.coverage == 1.0
    kid_same, _ = kid(x, x, subset_size=200, subsets=20)
    kid_shifted, _ = kid(x, x + 1.0, subset_size=200, subsets=20)
    assert abs(kid_same) < 0.02 * kid_shifted


def test_disjoint_sets_score_zero() -> None:
    p = prdc(gaussian(300, 16, 5), gaussian(300, 16, 6, shift=100.0))
    assert (p.precision, p.recall, p.density, p.coverage) == (0.0, 0.0, 0.0, 0.0)


def test_prdc_on_a_hand_worked_line() -> None:
    # Reals at 0..9 (every k=1 radius is 1); fakes at 0.5, 4.2, 20, 30 (k=1 radii 3.7, 3.7, 10, 10).
    real = np.arange(10.0)[:, None]
    fake = np.array([0.5, 4.2, 20.0, 30.0])[:, None]
    for block_bytes in (16, 2**20):  # one row per block, and everything in one block
        p = prdc(real, fake, k_pr=1, k_dc=1, block_bytes=block_bytes)
        # precision: 0.5 and 4.2 lie in real balls; recall: reals 0..7 lie in the fake balls of 0.5 / 4.2;
        # density: 0.5 is in the balls of 0 and 1, 4.2 in those of 4 and 5 -> 4 / (1 * 4);
        # coverage: reals 0, 1, 4, 5 have a fake within 1.
        assert (p.precision, p.recall, p.density, p.coverage) == (0.5, 0.8, 1.0, 0.4)


def test_chunked_neighbours_match_brute_force() -> None:
    a, b = gaussian(50, 5, 7), gaussian(30, 5, 8)
    full_aa = np.linalg.norm(a[:, None] - a[None], axis=2)
    radii = knn_radii(a, (1, 3), block_bytes=8 * 50 * 7)
    for k in (1, 3):
        np.testing.assert_allclose(radii[k], np.sort(full_aa, axis=1)[:, k], atol=1e-9)
    full_ab = np.linalg.norm(a[:, None] - b[None], axis=2)
    dist, idx = nearest(a, b, block_bytes=8 * 30 * 4)
    np.testing.assert_array_equal(idx, full_ab.argmin(axis=1))
    np.testing.assert_allclose(dist, full_ab.min(axis=1), atol=1e-9)


@pytest.fixture(scope="module")
def shape_features() -> dict[str, np.ndarray]:
    """Features of built-in shapes: a 'real' set, a fresh set from the same distribution, and its images."""
    real, _ = generate_shapes(300, seed=0)
    other, _ = generate_shapes(300, seed=1)
    return {"real": extract_features(real), "other": extract_features(other), "other_images": other}


def test_more_shift_means_larger_fid_and_kid(shape_features: dict[str, np.ndarray]) -> None:
    real, images = shape_features["real"], shape_features["other_images"]
    scores = []
    for brightness in (0, 30, 80):
        shifted = np.clip(images.astype(np.int16) + brightness, 0, 255).astype(np.uint8)
        m = distribution_metrics(real, extract_features(shifted), feature_space=FEATURE_SPACE, kid_subsets=20)
        scores.append(m)
    assert scores[0].feature_space == FEATURE_SPACE
    assert scores[0].fid < scores[1].fid < scores[2].fid
    assert scores[0].kid_mean < scores[1].kid_mean < scores[2].kid_mean
    assert scores[0].precision > scores[2].precision and scores[0].coverage > scores[2].coverage
    assert scores[0].recall > 0.5 and scores[0].coverage > 0.5  # same distribution: mostly covered


# ---------------------------------------------------------------- memorisation


@pytest.mark.parametrize("space", ["features", "pixels"])
def test_memorization_flags_copies_not_fresh_samples(space: str) -> None:
    images, _ = generate_shapes(500, seed=0)
    vectors = extract_features(images) if space == "features" else images.reshape(500, -1).astype(np.float64)
    train, holdout, fresh = vectors[:300], vectors[300:400], vectors[400:500]
    copied = [5, 17, 123, 250]  # training images the "generator" reproduced exactly
    generated = np.concatenate([fresh[:40], train[copied]])  # copies at generated indices 40..43
    report = memorization(generated, train, holdout, feature_space=space, top=4)
    assert report.near_duplicates == 4 and report.near_duplicate_fraction == 4 / 44
    assert sorted(report.closest_pairs) == [
        (40 + i, t, pytest.approx(0.0, abs=1e-5)) for i, t in enumerate(copied)
    ]
    clean = memorization(fresh, train, holdout, feature_space=space)
    assert clean.near_duplicates == 0
    assert 0.5 < clean.ratio_p05 < 2.0  # fresh samples sit where held-out real images do


# ---------------------------------------------------------------- likelihood


def test_heldout_likelihood_is_the_elbo_with_a_stated_convention() -> None:
    torch.manual_seed(0)
    model = VAE(PRESETS["tiny"]).eval()
    images, _ = generate_shapes(12, seed=2)
    result = heldout_likelihood(model, images, seed=7)
    x = to_model_input(torch.from_numpy(images), torch.device("cpu"))
    with torch.no_grad():
        out = model(x, generator=torch.Generator().manual_seed(7))
        terms = elbo_loss(x, out, beta=1.0, recon_loss="mse")
        mse = (model.reconstruct(x) - x).pow(2).flatten(1).mean(1)
        # mse recon + (D/2) ln(pi) must be the exact NLL of a Gaussian decoder with variance 1/2
        gauss_nll = -torch.distributions.Normal(out.recon, math.sqrt(0.5)).log_prob(x).flatten(1).sum(1)
    d = 64 * 64 * 3
    assert result.neg_elbo_nats == pytest.approx(float((terms.recon + terms.kl).mean()), rel=1e-6)
    assert result.bits_per_dim == pytest.approx(result.neg_elbo_nats / (d * math.log(2)), rel=1e-12)
    assert result.constant_nats == pytest.approx(d / 2 * math.log(math.pi))
    assert result.recon_nats + result.constant_nats == pytest.approx(float(gauss_nll.mean()), rel=1e-5)
    assert result.mse == pytest.approx(float(mse.mean()), rel=1e-6)
    assert result.psnr_db == pytest.approx(float((10 * torch.log10(1 / mse)).mean()), rel=1e-6)
    assert heldout_likelihood(model, images, seed=7, batch_size=5).kl_nats == pytest.approx(result.kl_nats)
    assert heldout_likelihood(model, images, recon_loss="bce").constant_nats is None


# ---------------------------------------------------------------- usefulness

FAST = ClassifierConfig(steps=100, seed=0)  # 32x32 shapes keep these tests to seconds


@pytest.fixture(scope="module")
def small_shapes() -> dict[str, np.ndarray]:
    real, real_y = generate_shapes(1200, image_size=32, seed=0)
    synth, synth_y = generate_shapes(600, image_size=32, seed=1)  # a perfect "generator": same distribution
    return {
        "train": real[:600],
        "train_y": real_y[:600],
        "test": real[600:],
        "test_y": real_y[600:],
        "synth": synth,
        "synth_y": synth_y,
    }


def test_tstr_beats_chance_and_wrong_labels_do_not(small_shapes: dict[str, np.ndarray]) -> None:
    s = small_shapes
    r = tstr(s["synth"], s["synth_y"], s["train"], s["train_y"], s["test"], s["test_y"], config=FAST)
    assert r.num_classes == 6 and r.chance == pytest.approx(1 / 6)
    assert r.real_accuracy > r.chance + 0.15 and r.tstr_accuracy > r.chance + 0.15
    shuffled = np.random.default_rng(0).permutation(s["synth_y"])  # a generator whose labels mean nothing
    model = train_classifier(s["synth"], shuffled, num_classes=6, config=FAST)
    assert accuracy(model, s["test"], s["test_y"]) < r.chance + 0.1


def test_reconstruction_accuracy_splits_the_gap_between_decoder_and_sampler(
    small_shapes: dict[str, np.ndarray],
) -> None:
    """Perfect reconstructions teach exactly what the real images do (same classifier, init and batch
    order); reconstructions that lost everything (a decoder that outputs the mean image) teach nothing."""
    s = small_shapes
    args = (s["synth"], s["synth_y"], s["train"], s["train_y"], s["test"], s["test_y"])
    perfect = tstr(*args, config=FAST, reconstructions=s["train"].copy())
    assert perfect.recon_accuracy == perfect.real_accuracy
    blurred = np.broadcast_to(s["train"].mean(axis=0).astype(np.uint8), s["train"].shape).copy()
    lost = tstr(*args, config=FAST, reconstructions=blurred)
    assert lost.recon_accuracy is not None and lost.recon_accuracy < lost.chance + 0.1
    assert (lost.real_accuracy, lost.tstr_accuracy) == (perfect.real_accuracy, perfect.tstr_accuracy)
    assert tstr(*args, config=FAST).recon_accuracy is None
    with pytest.raises(ValueError, match="one per real training image"):
        tstr(*args, config=FAST, reconstructions=s["train"][:10])


def test_augmentation_gain_of_good_synthetic_data_is_positive(small_shapes: dict[str, np.ndarray]) -> None:
    s = small_shapes
    r = augmentation_gain(
        s["synth"], s["synth_y"], s["train"], s["train_y"], s["test"], s["test_y"], config=FAST
    )
    assert r.n_subset == 60 and r.n_synth == 600
    assert r.gain == pytest.approx(r.augmented_accuracy - r.subset_accuracy) and r.gain > 0.05
    # samples whose labels mean nothing: the same real batches, plus noise, must not look like a gain
    shuffled = np.random.default_rng(0).permutation(s["synth_y"])
    bad = augmentation_gain(
        s["synth"], shuffled, s["train"], s["train_y"], s["test"], s["test_y"], config=FAST
    )
    assert bad.subset_accuracy == r.subset_accuracy  # the real-only side is the same classifier
    assert bad.gain < r.gain - 0.2 and bad.gain < 0.05


def test_classifier_is_deterministic_and_leaves_global_rng_alone(small_shapes: dict[str, np.ndarray]) -> None:
    before = torch.get_rng_state()
    cfg = ClassifierConfig(steps=5, seed=3)
    a = train_classifier(small_shapes["train"], small_shapes["train_y"], config=cfg)
    b = train_classifier(small_shapes["train"], small_shapes["train_y"], config=cfg)
    assert torch.equal(torch.get_rng_state(), before)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name


def test_stratified_subset_and_unlabelled_input(small_shapes: dict[str, np.ndarray]) -> None:
    idx = stratified_subset(small_shapes["train_y"], 0.1, seed=0)
    assert np.bincount(small_shapes["train_y"][idx]).tolist() == [10] * 6
    assert np.array_equal(idx, stratified_subset(small_shapes["train_y"], 0.1, seed=0))
    with pytest.raises(ValueError, match="unlabelled"):
        train_classifier(small_shapes["train"][:4], np.array([0, 1, -1, 2]))
