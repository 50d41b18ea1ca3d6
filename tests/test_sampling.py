"""Latent samplers: the prior and the fitted Gaussian mixture recover known answers and are deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from vaeforge.checkpoint import load_vae, save_checkpoint
from vaeforge.config import GenerateConfig, get_preset
from vaeforge.errors import UserError
from vaeforge.fit_sampler import fit_and_store
from vaeforge.generate import run_generate
from vaeforge.generate_worker import ShardTask, ShardWorker
from vaeforge.model import VAE
from vaeforge.sampling import (
    CHOL_BITS,
    NOISE_CLIP,
    STREAM_BITS,
    GaussianMixture,
    SampleStreams,
    fit_class_gmm,
    fit_gmm,
    load_gmm,
    parse_classes,
    prior_latents,
    sample_generator,
    shard_class_quotas,
    shard_labels,
)


def three_blobs(n: int = 900, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points from a known 3-component mixture in 4-D: (x, true means, true weights)."""
    rng = np.random.default_rng(seed)
    means = np.array([[0, 0, 0, 0], [10, 0, 0, 0], [0, 10, 5, 0]], dtype=float)
    weights = np.array([0.5, 0.3, 0.2])
    comp = rng.choice(3, size=n, p=weights)
    scales = np.array([1.0, 0.5, 2.0])[comp, None]
    return means[comp] + scales * rng.standard_normal((n, 4)), means, weights


def test_gmm_recovers_a_known_mixture() -> None:
    x, means, weights = three_blobs()
    gmm = fit_gmm(x, k=3, seed=0)
    order = np.argsort([np.argmin(((means - m) ** 2).sum(1)) for m in gmm.means])
    np.testing.assert_allclose(gmm.means[order], means, atol=0.35)
    np.testing.assert_allclose(gmm.weights[order], weights, atol=0.05)
    # the blob with scale 2 has variance ~4 on every axis
    cov = gmm.chol[order][2] @ gmm.chol[order][2].T
    np.testing.assert_allclose(np.diag(cov), 4.0, rtol=0.3)


def test_gmm_fit_is_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    x, _, _ = three_blobs()
    a, b = fit_gmm(x, k=5, seed=1), fit_gmm(x, k=5, seed=1)
    assert a.sha256() == b.sha256()
    assert fit_gmm(x, k=5, seed=2).sha256() != a.sha256()
    a.save(tmp_path / "g.npz")
    loaded = GaussianMixture.load(tmp_path / "g.npz")
    assert loaded.sha256() == a.sha256() and loaded.meta == a.meta


def test_gmm_samples_follow_the_fit_and_do_not_depend_on_batching() -> None:
    x, means, weights = three_blobs(n=1500)
    gmm = fit_gmm(x, k=3, seed=0)
    whole = gmm.sample(seed=7, shard=2, start=0, n=3000)
    parts = np.concatenate([gmm.sample(7, 2, 0, 1000), gmm.sample(7, 2, 1000, 2000)])
    np.testing.assert_array_equal(whole, parts)
    np.testing.assert_array_equal(gmm.sample(7, 2, 123, 1)[0], whole[123])  # from its metadata alone
    nearest = np.argmin(((whole[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_allclose(np.bincount(nearest, minlength=3) / len(whole), weights, atol=0.04)
    cold = gmm.sample(7, 2, 0, 3000, temperature=0.1)  # same components, 10x closer to their means

    def spread(z: np.ndarray) -> float:
        return float(np.sqrt(((z[:, None, :] - gmm.means[None]) ** 2).sum(-1).min(1)).mean())

    assert abs(spread(cold) / spread(whole) - 0.1) < 0.01


def test_gmm_fixed_point_product_is_exact_to_float32_and_grouping_free() -> None:
    """At the seed model's latent size, with factor entries over six orders of magnitude: the fixed-point
    product stays inside the error bound of its two roundings (plus float32's), its typical error is ~1e-6,
    and each sample's bits do not depend on which other samples share its batch or component product."""
    d, k = 512, 4
    rng = np.random.default_rng(3)
    chol = np.tril(rng.standard_normal((k, d, d)) * 10.0 ** rng.uniform(-6, -1, (k, d, d)))
    chol += np.eye(d) * rng.uniform(0.2, 2.0, (k, 1, 1))
    gmm = GaussianMixture(np.full(k, 1 / k), rng.standard_normal((k, d)), chol, {})
    z = gmm.sample(1, 4, 0, 300)
    chol_q, exps, noise_exp = gmm._fixed_point
    assert np.abs(chol_q).max() <= 2**CHOL_BITS and (chol_q == np.rint(chol_q)).all()
    assert d * 2**CHOL_BITS * NOISE_CLIP * 2.0**noise_exp <= 2**52  # every partial sum is exact
    errors = []
    for j in (0, 17, 150, 299):  # float64 reference from the same generator draws
        g = sample_generator(1, 4, j)
        pick = min(int(np.searchsorted(np.cumsum(gmm.weights), g.random(), side="right")), k - 1)
        noise = g.standard_normal(d)
        ref = gmm.means[pick] + gmm.chol[pick] @ noise
        # noise rounded to half a step of 2^-noise_exp, factor entries to half a step of 2^-exps[pick]
        bound = (
            np.abs(gmm.chol[pick]).sum(1) * 2.0 ** -(noise_exp + 1)
            + np.cumsum(np.abs(noise)) * 2.0 ** -(int(exps[pick]) + 1)  # row i of a lower factor
            + np.abs(ref) * 2.0**-24
        )
        error = np.abs(z[j] - ref)
        assert (error <= bound).all()
        errors.append(error)
    assert np.sqrt(np.mean(np.square(errors))) < 1e-5
    regrouped = np.concatenate(
        [gmm.sample(1, 4, a, b - a) for a, b in ((0, 1), (1, 2), (2, 150), (150, 300))]
    )
    np.testing.assert_array_equal(regrouped, z)


def test_prior_temperature_scales_the_spread() -> None:
    z = prior_latents(0, 0, 0, 2000, 8, 1.0)
    hot = prior_latents(0, 0, 0, 2000, 8, 2.0)
    np.testing.assert_allclose(hot, 2 * z, rtol=1e-6)
    assert abs(z.std() - 1) < 0.05
    np.testing.assert_array_equal(prior_latents(0, 0, 5, 1, 8, 1.0)[0], z[5])


def test_sample_streams_are_per_sample_and_disjoint() -> None:
    """Sample i's generator depends on (seed, shard, i) only, whatever was drawn before; neighbouring
    samples, shards and seeds get unrelated draws, and a sample's block of the stream is far larger than
    any latent needs."""
    streams = SampleStreams(0, 3)
    first = streams(7).standard_normal(512)
    streams(8).standard_normal(10_000)  # draw a lot from another sample in between
    np.testing.assert_array_equal(streams(7).standard_normal(512), first)
    np.testing.assert_array_equal(sample_generator(0, 3, 7).standard_normal(512), first)
    others = [SampleStreams(0, 3)(8), SampleStreams(0, 4)(7), SampleStreams(1, 3)(7)]
    for g in others:
        assert abs(np.corrcoef(first, g.standard_normal(512))[0, 1]) < 0.2
    assert 2**STREAM_BITS > 100 * 512  # draws per sample block, against a latent's ~512
    z = prior_latents(0, 3, 0, 4000, 16, 1.0)
    assert abs(float(np.corrcoef(z[:-1].ravel(), z[1:].ravel())[0, 1])) < 0.02  # index i vs i + 1
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02


def two_labeled_blobs(n: int = 1200) -> tuple[np.ndarray, np.ndarray]:
    """Class 0 around (0, 0, 0), class 1 around (20, 0, 0) in 3-D, 3:1, each of two sub-clusters."""
    rng = np.random.default_rng(5)
    labels = (rng.random(n) < 0.25).astype(np.int64)
    sub = rng.integers(0, 2, n)
    centers = np.array([[0.0, 0, 0], [0, 6, 0], [20, 0, 0], [20, 0, 6]])[2 * labels + sub]
    return centers + 0.5 * rng.standard_normal((n, 3)), labels


def test_per_class_mixture_draws_each_label_from_its_own_class() -> None:
    x, labels = two_labeled_blobs()
    gmm = fit_class_gmm(x, labels, k=2, seed=0)
    assert gmm.per_class and gmm.k == 4 and gmm.class_ids() == [0, 1]
    assert gmm.classes.tolist() == [0, 0, 1, 1]
    assert gmm.meta["per_class"]["1"]["points"] == int((labels == 1).sum())
    np.testing.assert_allclose(gmm.weights[2:].sum(), (labels == 1).mean())  # P(class) * P(comp | class)
    want = np.array([0, 1] * 500)
    z = gmm.sample(3, 0, 0, len(want), labels=want)
    assert (z[want == 0, 0] < 10).all() and (z[want == 1, 0] > 10).all()  # never another class's region
    # both sub-clusters of a class are used, in proportion
    assert 0.35 < (z[want == 0, 1] > 3).mean() < 0.65 and 0.35 < (z[want == 1, 2] > 3).mean() < 0.65
    # regenerable from (seed, shard, index, label) alone, whatever the batch
    np.testing.assert_array_equal(gmm.sample(3, 0, 7, 1, labels=want[7:8])[0], z[7])
    # without labels a per-class fit samples the whole training distribution: class 1 about a quarter
    free = gmm.sample(3, 0, 0, 4000)
    assert abs((free[:, 0] > 10).mean() - (labels == 1).mean()) < 0.03


def test_per_class_mixture_saves_and_refuses_an_unfitted_class(tmp_path: Path) -> None:
    x, labels = two_labeled_blobs()
    gmm = fit_class_gmm(x, labels, k=2, seed=0)
    gmm.save(tmp_path / "g.npz")
    back = GaussianMixture.load(tmp_path / "g.npz")
    assert back.sha256() == gmm.sha256() and back.classes.tolist() == gmm.classes.tolist()
    pooled = GaussianMixture(gmm.weights, gmm.means, gmm.chol, gmm.meta)
    assert pooled.sha256() != gmm.sha256()  # the class of each component is part of the fit's identity
    with pytest.raises(UserError, match="no component for class 4"):
        gmm.sample(0, 0, 0, 2, labels=np.array([0, 4]))
    with pytest.raises(UserError, match="labeled images"):
        fit_class_gmm(x, np.full(len(x), -1), k=2)


# ------------------------------------------------------------------------ the fitted sampler in generate


@pytest.fixture
def fitted_ckpt(tmp_path: Path) -> Path:
    """A tiny checkpoint with a mixture fitted on 300 random images beside it."""
    torch.manual_seed(0)
    model = VAE(get_preset("tiny")).eval()
    ckpt = save_checkpoint(tmp_path / "ckpt", model, {"epoch": 0, "metrics": {}})
    images = np.random.default_rng(0).integers(0, 256, (300, 64, 64, 3), dtype=np.uint8)
    fit_and_store(load_vae(ckpt), images, None, k=3, seed=0)
    return ckpt


def test_gmm_generation_regenerates_from_metadata(fitted_ckpt: Path, tmp_path: Path) -> None:
    cfg = GenerateConfig(
        checkpoint=str(fitted_ckpt), output=str(tmp_path), count=40, sampler="gmm", precision="fp32"
    )
    worker = ShardWorker(str(fitted_ckpt), cfg, 1, "ckpt-id")
    info = worker.run(ShardTask(3, 40, str(tmp_path / "s.tar")))
    assert info["count"] == 40
    sample = next(iter(wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False).decode("rgb8")))
    meta = sample["json"]
    assert (meta["sampler"], meta["shard"], meta["index"]) == ("gmm", 3, 0)
    gmm = load_gmm(fitted_ckpt)
    z = gmm.sample(meta["seed"], meta["shard"], meta["index"], 1)
    np.testing.assert_array_equal(worker.decode(z)[0], sample["png"])


def test_unconditional_model_labels_samples_from_a_per_class_mixture(tmp_path: Path) -> None:
    """--classes on an unconditional model: the label picks the class's components, the decoder never
    sees it, and each sample regenerates from (seed, shard, index, label)."""
    from vaeforge.generate import class_totals

    torch.manual_seed(0)
    model = VAE(get_preset("tiny")).eval()
    ckpt = save_checkpoint(
        tmp_path / "ckpt", model, {"epoch": 0, "metrics": {}, "data": {"classes": ["a", "b"]}}
    )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (200, 64, 64, 3), dtype=np.uint8)
    images[100:] //= 4  # class 1 is darker, so its latents sit elsewhere
    labels = np.repeat([0, 1], 100)
    where, gmm = fit_and_store(load_vae(ckpt), images, labels, k=2, seed=0)["gmm"]
    assert gmm.per_class and where == str(ckpt / "sampler_gmm.npz")
    cfg = GenerateConfig(
        checkpoint=str(ckpt), output=str(tmp_path), count=30, sampler="gmm", classes="0:10,1:20",
        precision="fp32",
    )  # fmt: skip
    totals = class_totals(cfg, 0, load_vae(ckpt).meta, load_gmm(ckpt))
    assert totals == [10, 20]
    worker = ShardWorker(str(ckpt), cfg, 1, "ckpt-id")
    worker.run(ShardTask(0, 30, str(tmp_path / "s.tar"), class_counts=(10, 20)))
    samples = list(wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False).decode("rgb8"))
    assert sorted(int(s["cls"]) for s in samples) == [0] * 10 + [1] * 20
    for s in samples[:6]:
        meta = s["json"]
        assert meta["class"] == ["a", "b"][meta["label"]]
        z = gmm.sample(meta["seed"], meta["shard"], meta["index"], 1, labels=np.array([meta["label"]]))
        np.testing.assert_array_equal(worker.decode(z)[0], s["png"])
    # a pooled fit cannot label an unconditional model's samples
    fit_and_store(load_vae(ckpt), images, labels, k=2, seed=0, per_class=False)
    with pytest.raises(UserError, match="fit-sampler --per-class"):
        class_totals(cfg, 0, load_vae(ckpt).meta, load_gmm(ckpt))


def test_gmm_without_a_fit_says_how_to_fit_one(tmp_path: Path) -> None:
    ckpt = save_checkpoint(tmp_path / "ckpt", VAE(get_preset("tiny")), {"epoch": 0, "metrics": {}})
    cfg = GenerateConfig(checkpoint=str(ckpt), output=str(tmp_path), count=1, sampler="gmm")
    with pytest.raises(UserError, match="vaeforge fit-sampler"):
        ShardWorker(str(ckpt), cfg, 1, "ckpt-id")


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_refit_mixture_is_a_different_plan(fitted_ckpt: Path, tmp_path: Path, ray_session: None) -> None:
    cfg = GenerateConfig(
        checkpoint=str(fitted_ckpt),
        output=str(tmp_path / "out"),
        count=30,
        shard_size=10,
        sampler="gmm",
        precision="fp32",
        progress=False,
    )
    run_generate(cfg)
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["sampler_sha256"] == load_gmm(fitted_ckpt).sha256()
    assert manifest["sampler_fit"]["k"] == 3
    images = np.random.default_rng(1).integers(0, 256, (300, 64, 64, 3), dtype=np.uint8)
    fit_and_store(load_vae(fitted_ckpt), images, None, k=3, seed=0)  # other data: other mixture
    with pytest.raises(UserError, match="sampler_sha256"):
        run_generate(cfg)


# ------------------------------------------------------------------------------------ class plans


def test_parse_classes() -> None:
    assert parse_classes("balanced", 3, None, 10) == [4, 3, 3]
    assert parse_classes("all", 3, [10, 30, 60], 100) == [10, 30, 60]
    assert parse_classes("all", 3, None, 9) == [3, 3, 3]  # no recorded counts: equal shares
    assert parse_classes("2:1_000,0:5", 3, None, None) == [5, 0, 1000]
    for bad in ("7:10", "a:b", "1:10,", "1:-3"):
        with pytest.raises(UserError, match="--classes"):
            parse_classes(bad, 3, None, None)
    with pytest.raises(UserError, match="--count is 99"):
        parse_classes("1:10", 3, None, 99)


def test_shard_quotas_are_exact_and_mixed() -> None:
    totals = [7, 0, 1000, 13, 280]
    sizes = [100] * 13 + [0, 0]  # 1,300 samples, two empty tails
    quotas = shard_class_quotas(totals, [*sizes[:12], 100, 0, 0])
    assert [sum(q) for q in quotas] == [100] * 13 + [0, 0]
    assert [sum(col) for col in zip(*quotas, strict=True)] == totals
    assert all(60 <= q[2] <= 94 for q in quotas[:13])  # every shard holds its share of the big class
    labels = shard_labels(quotas[0])
    assert np.bincount(labels, minlength=5).tolist() == list(quotas[0])
    # interleaved: no run of one class is longer than the big class's share warrants
    runs = np.diff(np.flatnonzero(np.diff(labels) != 0))
    assert runs.max() <= 8
    np.testing.assert_array_equal(shard_labels((2, 0, 2)), [0, 2, 0, 2])
