"""fit-sampler, conditional generation with --classes and `vaeforge evaluate`, end to end through the CLI."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds

from vaeforge.checkpoint import load_vae
from vaeforge.cli import main
from vaeforge.sampling import load_fit, load_gmm

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session")]

TINY = ["--preset", "tiny", "--max-samples", "384", "--batch-size", "32", "--builtin-count", "384"]


def cli(*argv: str) -> None:
    try:
        main(list(argv))
    except SystemExit as e:  # main() exits only on errors
        pytest.fail(f"vaeforge {argv[0]} exited with {e.code}")


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory: pytest.TempPathFactory, ray_session: None) -> Path:
    """A tiny conditional run on the built-in shapes (6 classes), with a fitted mixture."""
    run = tmp_path_factory.mktemp("cond") / "run"
    cli("train", *TINY, "--conditional", "--epochs", "1", "--precision", "fp32", "--output", str(run))
    at_end = load_gmm(load_vae(run).path)  # training fitted one per class at its end
    assert at_end.per_class and at_end.class_ids() == list(range(6))
    kde_at_end = load_fit(load_vae(run).path, "kde")
    cli("fit-sampler", "--checkpoint", str(run))  # the same defaults, the same code: the same fits
    assert load_gmm(load_vae(run).path).sha256() == at_end.sha256()
    assert load_fit(load_vae(run).path, "kde").sha256() == kde_at_end.sha256()
    cli("fit-sampler", "--checkpoint", str(run), "--k", "3", "--max-points", "300", "--sampler", "gmm")
    assert load_fit(load_vae(run).path, "kde").sha256() == kde_at_end.sha256()  # only the gmm was refit
    return run


@pytest.mark.timeout(600)
def test_gmm_sampler_and_explicit_classes(cond_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    cli("generate", "--checkpoint", str(cond_run), "--classes", "0:30,2:10", "--sampler", "gmm",
        "--shard-size", "15", "--precision", "fp32", "--output", str(out))  # fmt: skip
    samples = list(wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False))
    assert len(samples) == 40  # --count defaults to the sum of the class counts
    assert Counter(int(s["cls"]) for s in samples) == {0: 30, 2: 10}
    metas = [json.loads(s["json"]) for s in samples]
    assert {m["sampler"] for m in metas} == {"gmm"}
    assert {m["class"] for m in metas if m["label"] == 2} == {"triangle"} or len(
        {m["class"] for m in metas}
    ) == 2
    manifest = json.loads((out / "_manifest.json").read_text())
    fit = manifest["sampler_fit"]
    assert manifest["config"]["classes"] == "0:30,2:10" and fit["k_per_class"] == 3
    assert sum(c["points"] for c in fit["per_class"].values()) == 300
    # every shard mixes the classes rather than holding one
    per_shard = Counter((m["shard"], m["label"]) for m in metas)
    assert all(per_shard[(s, 2)] >= 1 for s in range(2))


@pytest.mark.timeout(600)
def test_kde_sampler_fills_one_class(cond_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    cli("generate", "--checkpoint", str(cond_run), "--classes", "4:25", "--sampler", "kde",
        "--shard-size", "10", "--precision", "fp32", "--format", "parquet", "--output", str(out))  # fmt: skip
    import pyarrow.parquet as pq

    table = pq.read_table(sorted(str(p) for p in out.glob("*.parquet")))
    assert table.num_rows == 25 and set(table.column("label").to_pylist()) == {4}
    manifest = json.loads((out / "_manifest.json").read_text())
    kde = load_fit(load_vae(cond_run).path, "kde")
    assert (
        manifest["sampler_transform"] == "kde-fixed-point-v1" and manifest["sampler_sha256"] == kde.sha256()
    )
    assert manifest["sampler_fit"]["bandwidth"] == kde.bandwidth


@pytest.mark.timeout(900)
def test_evaluate_writes_metrics_and_a_complete_report(cond_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    cli("evaluate", "--checkpoint", str(cond_run), "--samples", "60", "--max-train", "200",
        "--classifier-steps", "20", "--temperature", "0.9", "--output", str(out))  # fmt: skip
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["samplers"]) == {"prior", "gmm", "kde"} and m["temperature"] == 0.9
    ref = m["memorization_reference"]
    # the training images the kde samples started from are checked too, not only evaluate's subset
    assert (
        ref["train_subset"] == 200 and ref["sample_sources"] > 0 and ref["n"] == 200 + ref["sample_sources"]
    )
    for s in m["samplers"].values():
        assert s["distribution"]["fid"] >= 0 and 0 <= s["distribution"]["coverage"] <= 1
        assert s["memorization"]["n_generated"] == 60 and s["memorization"]["n_train"] == ref["n"]
    assert m["likelihood"]["neg_elbo_nats"] > 0 and m["likelihood"]["conditional_on_label"]
    tstr = m["usefulness"]["tstr"]
    assert 0 <= tstr["tstr_accuracy"] <= 1 and 0 <= tstr["recon_accuracy"] <= 1
    assert tstr["n_synth"] == tstr["n_real_train"] == m["train_n"] == 200  # two training sets of one size
    assert "gain" in m["usefulness"]["augmentation"]
    page = (out / "report.html").read_text()
    assert "recon_accuracy" in page and "sampler temperature" in page
    for section in ("metrics", "samples", "samples-per-class", "reconstructions", "interpolations",
                    "latent-traversals", "nearest-neighbours"):  # fmt: skip
        assert f"id='{section}'" in page, section
    assert page.count("data:image/png;base64,") >= 8


@pytest.mark.timeout(900)
def test_unconditional_run_with_a_per_class_mixture_makes_labeled_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No --conditional: the end-of-training fit is per class (the shapes are labeled), so generate
    --classes labels the samples and evaluate can measure TSTR with them."""
    run = tmp_path / "run"
    cli("train", *TINY, "--epochs", "1", "--precision", "fp32", "--output", str(run))
    assert "gmm sampler" in capsys.readouterr().out
    out = tmp_path / "shards"
    cli("generate", "--checkpoint", str(run), "--sampler", "gmm", "--classes", "balanced", "--count", "24",
        "--precision", "fp32", "--format", "parquet", "--output", str(out))  # fmt: skip
    import pyarrow.parquet as pq

    table = pq.read_table(sorted(out.glob("*.parquet"))[0])
    assert Counter(table.column("label").to_pylist()) == {c: 4 for c in range(6)}
    cli("evaluate", "--checkpoint", str(run), "--samples", "60", "--max-train", "200",
        "--classifier-steps", "20", "--output", str(tmp_path / "eval"))  # fmt: skip
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["usefulness"]["sampler"] in ("gmm", "kde") and 0 <= m["usefulness"]["tstr"]["tstr_accuracy"] <= 1
    other = {"gmm": "kde", "kde": "gmm"}[m["usefulness"]["sampler"]]  # the one the default did not pick
    cli("evaluate", "--checkpoint", str(run), "--samples", "60", "--max-train", "200", "--classifier-steps",
        "20", "--output", str(tmp_path / "eval2"), "--usefulness-sampler", other)  # fmt: skip
    m2 = json.loads((tmp_path / "eval2" / "metrics.json").read_text())
    assert m2["usefulness"]["sampler"] == other and "tstr" in m2["usefulness"]


def test_classes_need_a_conditional_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from vaeforge.checkpoint import save_checkpoint
    from vaeforge.config import get_preset
    from vaeforge.model import VAE

    ckpt = save_checkpoint(tmp_path / "ckpt", VAE(get_preset("tiny")), {"epoch": 0, "metrics": {}})
    torch.manual_seed(0)
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--checkpoint", str(ckpt), "--count", "10", "--classes", "balanced",
              "--output", str(tmp_path / "o")])  # fmt: skip
    assert exc.value.code == 2
    assert "--classes needs a conditional model" in capsys.readouterr().err


def test_evaluate_temperature_scales_the_samples_spread(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """evaluate measures the samples `generate --temperature` would make: a near-zero temperature
    collapses every prior draw onto (nearly) one image (the mixture's draws scale the same way, in
    GaussianMixture.sample)."""
    import numpy as np
    import torch
    from test_generate import user_error

    from vaeforge.checkpoint import save_checkpoint
    from vaeforge.config import get_preset
    from vaeforge.evaluate import draw_samples
    from vaeforge.model import VAE

    torch.manual_seed(0)
    model = VAE(get_preset("tiny")).eval()
    ckpt = save_checkpoint(tmp_path / "ckpt", model, {"epoch": 0, "metrics": {}})

    def spread(t: float) -> float:
        images, _ = draw_samples(model, "prior", ckpt, 64, seed=0, temperature=t)
        return float(images.astype(np.float64).std(axis=0).mean())

    cold, warm = spread(0.01), spread(1.0)
    assert warm > 0 and cold < 0.1 * warm, (cold, warm)
    line = user_error(["evaluate", "--checkpoint", str(ckpt), "--temperature", "0"], capsys)
    assert "--temperature must be positive" in line
    line = user_error(["evaluate", "--checkpoint", str(ckpt), "--usefulness-sampler", "flow"], capsys)
    assert "unknown --usefulness-sampler 'flow'" in line


def test_usefulness_sampler_must_be_fitted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Asking usefulness for a sampler the checkpoint has no fit for fails before any sampling."""
    import torch
    from test_generate import user_error

    from vaeforge.checkpoint import save_checkpoint
    from vaeforge.config import get_preset
    from vaeforge.model import VAE

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "ckpt", VAE(get_preset("tiny")).eval(), {"epoch": 0, "metrics": {}})
    argv = ["evaluate", "--checkpoint", str(ckpt), "--data", "builtin", "--usefulness-sampler", "kde"]
    line = user_error(argv, capsys)
    assert "--usefulness-sampler kde" in line and "has no such fit" in line and "fit-sampler" in line
