"""Tests for the model side: seed64 parameter counts, shapes, the ELBO by hand, posterior, checkpoints."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from vaeforge.checkpoint import CheckpointError, load_vae, resolve_checkpoint, save_checkpoint
from vaeforge.config import PRESETS, ModelConfig, get_preset
from vaeforge.errors import UserError
from vaeforge.model import VAE, DiagonalGaussian, VAEOutput, elbo_loss, fold_batchnorm, psnr
from vaeforge.runtime import bf16_is_fast, make_optimizer, resolve_precision, restore_optimizer
from vaeforge.summary import count_params, summarize

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def seed64() -> VAE:
    torch.manual_seed(0)
    return VAE(PRESETS["seed64"])


def tiny_vae(seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    return VAE(PRESETS["tiny"])


# ---------------------------------------------------------------- parameter counts (the seed design's table)


def test_seed64_totals_match_the_design(seed64: VAE) -> None:
    enc_trainable, enc_frozen = count_params(seed64.encoder)
    dec_trainable, dec_frozen = count_params(seed64.decoder)
    assert enc_trainable + enc_frozen == 13_802_688
    assert enc_frozen == 4_032  # BatchNorm moving mean + variance, as Keras counts them
    assert dec_trainable + dec_frozen == 13_283_023
    assert dec_frozen == 3_014


def test_seed64_summary_rows_and_shapes(seed64: VAE) -> None:
    enc = summarize(seed64.encoder, torch.zeros(2, 3, 64, 64))
    dec = summarize(seed64.decoder, torch.zeros(2, 512))
    assert (enc.total, enc.non_trainable, dec.total, dec.non_trainable) == (
        13_802_688,
        4_032,
        13_283_023,
        3_014,
    )
    enc_rows = {r.name: r for r in enc.rows}
    dec_rows = {r.name: r for r in dec.rows}
    # Keras name in the seed's table -> this model's layer, parameter count, output shape
    expected = [
        ("conv2d", enc_rows["convs.0.0"], 2_432, (32, 64, 64)),
        ("conv2d_1", enc_rows["convs.1.0"], 51_264, (64, 32, 32)),
        ("dense_3", dec_rows["dense.0"], 525_312, (1024,)),
        ("dense_4", dec_rows["dense.3"], 8_396_800, (8192,)),
        ("conv2d_transpose", dec_rows["deconvs.0.0"], 3_277_056, (256, 8, 8)),
    ]
    for keras_name, row, params, shape in expected:
        assert (row.params, row.output_shape) == (params, shape), keras_name
    assert enc_rows["mean"].output_shape == (512,)
    assert dec.rows[-1].output_shape == (3, 64, 64)
    assert seed64.training  # summarize puts the module back into the mode it found


# ---------------------------------------------------------------- forward shapes


@pytest.mark.parametrize("preset", ["seed64", "tiny"])
def test_forward_shapes_and_range(preset: str, seed64: VAE) -> None:
    cfg = get_preset(preset)
    vae = seed64 if preset == "seed64" else tiny_vae()
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    posterior = vae.encoder(x)
    assert posterior.mean.shape == posterior.logvar.shape == (3, cfg.latent_dim)
    if preset == "seed64":
        assert cfg.latent_dim == 512
    out = vae(x, generator=torch.Generator().manual_seed(2))
    assert out.logits.shape == (3, 3, 64, 64)
    images = vae.decoder(posterior.mode())
    assert images.shape == (3, 3, 64, 64)
    assert images.min() >= 0 and images.max() <= 1
    vae.eval()
    try:
        assert vae.sample(4, generator=torch.Generator().manual_seed(3)).shape == (4, 3, 64, 64)
        assert vae.reconstruct(x).shape == (3, 3, 64, 64)
    finally:
        vae.train()


# ---------------------------------------------------------------- ELBO against numbers worked out by hand

# Sample A: q = N([1, 0], diag([1, 4])); a 1x1x2 image x = [1, 0.5] with logits [0, ln 3] -> p = [0.5, 0.75].
#   KL  = 0.5 * ((1 + 1 - 1 - 0) + (0 + 4 - 1 - ln 4)) = 0.5 * (4 - 1.3862944) = 1.3068528
#   MSE-sum = 0.5^2 + 0.25^2 = 0.3125; per-pixel mean 0.15625
#   BCE-sum = ln 2 + 0.5 * (ln(1/0.75) + ln(1/0.25)) = 0.6931472 + 0.8369882 = 1.5301354
# Sample B: q = N([0, 0], I); x = [0.5, 0.5] with logits [0, 0] -> p = [0.5, 0.5].
#   KL = 0; MSE-sum = 0; BCE-sum = 2 ln 2 = 1.3862944
KL_A, MSE_SUM_A, MSE_MEAN_A, BCE_A = 1.3068528, 0.3125, 0.15625, 1.5301354
BCE_B = 1.3862944


def hand_case(batch: str = "A") -> tuple[torch.Tensor, VAEOutput]:
    rows = {
        "A": ([1.0, 0.0], [0.0, math.log(4.0)], [0.0, math.log(3.0)], [1.0, 0.5]),
        "B": ([0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.5, 0.5]),
    }
    picked = [rows[k] for k in batch]
    mean = torch.tensor([r[0] for r in picked])  # (B, 2)
    logvar = torch.tensor([r[1] for r in picked])  # (B, 2)
    logits = torch.tensor([r[2] for r in picked]).view(-1, 1, 1, 2)  # (B, C=1, H=1, W=2)
    x = torch.tensor([r[3] for r in picked]).view(-1, 1, 1, 2)
    return x, VAEOutput(DiagonalGaussian(mean, logvar), logits)


@pytest.mark.parametrize("num_classes", [0, 4])
def test_fold_batchnorm_gives_the_same_images_with_no_batchnorm_left(num_classes: int) -> None:
    """Generation decodes with BatchNorm folded into the layers before it; with non-trivial running
    statistics and affine parameters, that must still be the same decoder."""
    torch.manual_seed(0)
    decoder = VAE(dataclasses.replace(PRESETS["tiny"], num_classes=num_classes)).decoder
    for module in decoder.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            for t in (module.running_mean, module.running_var, module.weight, module.bias):
                t.data = torch.rand_like(t) + 0.5
    decoder.eval()
    z = torch.randn(16, decoder.dense[0].in_features - num_classes)
    y = torch.arange(16) % num_classes if num_classes else None
    fused = fold_batchnorm(decoder)
    bn = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)
    assert not any(isinstance(m, bn) for m in fused.modules())
    assert sum(isinstance(m, bn) for m in decoder.modules()) > 0  # the original is untouched
    with torch.inference_mode():
        torch.testing.assert_close(fused(z, y), decoder(z, y), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("num_classes", [0, 4])
def test_inference_decoder_fuses_leaky_relu_and_gives_the_same_images(num_classes: int) -> None:
    """generate's decoder: BatchNorm folded and each transposed conv fused with its LeakyReLU (one oneDNN
    call on a CPU). fp32 matches the plain decoder to float rounding, bf16 to bf16 rounding, and negative
    pre-activations really go through the slope (a missing activation would fail here)."""
    from vaeforge.model import ConvTransposeLeakyReLU, inference_decoder

    torch.manual_seed(0)
    decoder = VAE(dataclasses.replace(PRESETS["tiny"], num_classes=num_classes)).decoder.eval()
    z = torch.randn(16, decoder.dense[0].in_features - num_classes)
    y = torch.arange(16) % num_classes if num_classes else None
    fast = inference_decoder(decoder).to(memory_format=torch.channels_last)
    fused = [m for m in fast.modules() if isinstance(m, ConvTransposeLeakyReLU)]
    assert len(fused) == len(decoder.deconvs)
    assert not any(isinstance(m, torch.nn.LeakyReLU) for m in fast.deconvs.modules() if m not in
                   {f.act for f in fused})  # fmt: skip
    with torch.inference_mode():
        torch.testing.assert_close(fast(z, y), decoder(z, y), atol=1e-5, rtol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(fast(z, y).float(), decoder(z, y).float(), atol=0.02, rtol=0)
        block = fused[0]
        x = torch.randn(2, block.conv.in_channels, 4, 4)
        plain = torch.nn.functional.leaky_relu(block.conv(x), block.slope)
        assert (plain < 0).any()
        torch.testing.assert_close(block(x), plain, atol=1e-5, rtol=1e-4)


def test_elbo_mse_by_hand() -> None:
    x, out = hand_case("A")
    t = elbo_loss(x, out, beta=1.0, recon_loss="mse")
    assert t.kl.tolist() == pytest.approx([KL_A], abs=1e-6)
    assert t.recon.tolist() == pytest.approx([MSE_SUM_A], abs=1e-6)
    assert t.mse.tolist() == pytest.approx([MSE_MEAN_A], abs=1e-6)
    assert t.loss.item() == pytest.approx(MSE_SUM_A + KL_A, abs=1e-6)  # 1.6193528


def test_elbo_bce_by_hand() -> None:
    x, out = hand_case("A")
    t = elbo_loss(x, out, beta=1.0, recon_loss="bce")
    assert t.recon.tolist() == pytest.approx([BCE_A], abs=1e-6)
    assert t.loss.item() == pytest.approx(2.8369882, abs=1e-6)  # 1.5301354 + 1.3068528
    assert t.mse.tolist() == pytest.approx([MSE_MEAN_A], abs=1e-6)  # PSNR input regardless of the loss


def test_elbo_beta_weights_only_the_kl() -> None:
    x, out = hand_case("A")
    t = elbo_loss(x, out, beta=2.0, recon_loss="mse")
    assert t.loss.item() == pytest.approx(2.9262056, abs=1e-6)  # 0.3125 + 2 * 1.3068528
    assert t.recon.tolist() == pytest.approx([MSE_SUM_A], abs=1e-6)
    t0 = elbo_loss(x, out, beta=0.0, recon_loss="mse")
    assert t0.loss.item() == pytest.approx(MSE_SUM_A, abs=1e-6)


def test_elbo_is_the_mean_over_the_batch() -> None:
    x, out = hand_case("AB")
    mse = elbo_loss(x, out, beta=1.0, recon_loss="mse")
    assert mse.kl.tolist() == pytest.approx([KL_A, 0.0], abs=1e-6)
    assert mse.recon.tolist() == pytest.approx([MSE_SUM_A, 0.0], abs=1e-6)
    assert mse.loss.item() == pytest.approx(0.8096764, abs=1e-6)  # (0.3125 + 1.3068528 + 0) / 2
    bce = elbo_loss(x, out, beta=1.0, recon_loss="bce")
    assert bce.recon.tolist() == pytest.approx([BCE_A, BCE_B], abs=1e-6)
    assert bce.loss.item() == pytest.approx(2.1116413, abs=1e-6)  # (2.8369882 + 1.3862944) / 2


def test_elbo_unknown_recon_loss() -> None:
    x, out = hand_case("A")
    with pytest.raises(ValueError, match="recon_loss"):
        elbo_loss(x, out, recon_loss="l1")


def test_psnr_values() -> None:
    assert psnr(torch.tensor([0.01, 1.0])).tolist() == pytest.approx([20.0, 0.0], abs=1e-5)
    assert math.isfinite(psnr(torch.tensor([0.0])).item())  # clamped, never inf


# ---------------------------------------------------------------- posterior


def test_posterior_sample_is_seeded_and_mode_is_the_mean() -> None:
    q = DiagonalGaussian(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(4.0)]]))
    a = q.sample(torch.Generator().manual_seed(7))
    b = q.sample(torch.Generator().manual_seed(7))
    c = q.sample(torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(q.mode(), torch.tensor([[1.0, 0.0]]))


def test_posterior_sample_has_the_right_spread() -> None:
    n = 20_000
    q = DiagonalGaussian(
        torch.tensor([[1.0, 0.0]]).expand(n, 2), torch.tensor([[0.0, math.log(4.0)]]).expand(n, 2)
    )
    z = q.sample(torch.Generator().manual_seed(0))  # (n, 2)
    assert z.mean(0).tolist() == pytest.approx([1.0, 0.0], abs=0.05)
    assert z.std(0).tolist() == pytest.approx([1.0, 2.0], abs=0.05)


def test_forward_noise_is_reproducible_with_a_generator() -> None:
    vae = tiny_vae().eval()  # eval: BatchNorm uses fixed stats, so only the noise could differ
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    first = vae(x, generator=torch.Generator().manual_seed(5)).logits
    second = vae(x, generator=torch.Generator().manual_seed(5)).logits
    other = vae(x, generator=torch.Generator().manual_seed(6)).logits
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


# ---------------------------------------------------------------- checkpoints


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_checkpoint_round_trip_from_file_and_dir(tmp_path: Path) -> None:
    vae = tiny_vae(seed=3)
    d = save_checkpoint(tmp_path / "ckpt", vae, {"epoch": 1, "metrics": {"val_loss": 1.0}}, {"x": 1})
    assert {p.name for p in d.iterdir()} == {"model.pt", "trainer.pt", "meta.json"}
    for path in (d / "model.pt", d):
        loaded = load_vae(path)
        assert loaded.path == d
        assert not loaded.model.training
        assert loaded.model.config == PRESETS["tiny"]  # rebuilt from the file, no flags
        assert loaded.meta["epoch"] == 1
        assert ModelConfig.from_dict(loaded.meta["model_config"]) == PRESETS["tiny"]
        assert_same_weights(loaded.model, vae)


def make_run(tmp_path: Path) -> tuple[Path, VAE, VAE]:
    """A run dir with two checkpoints: the older one has the lower held-out loss."""
    run = tmp_path / "run"
    better, later = tiny_vae(seed=1), tiny_vae(seed=2)
    save_checkpoint(run / "checkpoints/epoch0001_step000000007", better, {"metrics": {"val_loss": 5.0}})
    save_checkpoint(run / "checkpoints/epoch0002_step000000014", later, {"metrics": {"val_loss": 9.0}})
    return run, better, later


def test_load_from_run_dir_best_and_latest(tmp_path: Path) -> None:
    run, better, later = make_run(tmp_path)
    best = load_vae(run)
    assert best.path.name == "epoch0001_step000000007"
    assert_same_weights(best.model, better)
    latest = load_vae(run, which="latest")
    assert latest.path.name == "epoch0002_step000000014"
    assert_same_weights(latest.model, later)


def test_incomplete_checkpoint_is_ignored(tmp_path: Path) -> None:
    run, better, _ = make_run(tmp_path)
    # A checkpoint still being written (no meta.json yet) must not be picked, even if newest.
    half = run / "checkpoints/epoch0003_step000000021"
    half.mkdir()
    (half / "model.pt").write_bytes(b"partial")
    assert Path(resolve_checkpoint(run, "latest")).name == "epoch0002_step000000014"  # a location string


def test_run_dir_without_val_loss_falls_back_to_latest(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for name in ("epoch0001_step000000001", "epoch0002_step000000002"):
        save_checkpoint(run / "checkpoints" / name, tiny_vae(), {"metrics": {}})
    assert load_vae(run).path.name == "epoch0002_step000000002"


def test_corrupt_model_file_is_a_user_error(tmp_path: Path) -> None:
    d = save_checkpoint(tmp_path / "ckpt", tiny_vae(), {})
    (d / "model.pt").write_bytes(b"\x00not a torch file" * 10)
    for path in (d, d / "model.pt"):
        with pytest.raises(CheckpointError, match="corrupt or unreadable"):
            load_vae(path)
    assert issubclass(CheckpointError, UserError)


def test_foreign_torch_file_is_rejected(tmp_path: Path) -> None:
    f = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, f)
    with pytest.raises(CheckpointError, match="not a vaeforge checkpoint"):
        load_vae(f)


def test_missing_or_empty_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_vae(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_vae(tmp_path)


def test_unreadable_meta_is_a_user_error(tmp_path: Path) -> None:
    run, _, _ = make_run(tmp_path)
    (run / "checkpoints/epoch0001_step000000007/meta.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="unreadable checkpoint metadata"):
        load_vae(run)


def test_model_config_dict_round_trip() -> None:
    for cfg in PRESETS.values():
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(UserError, match="divisible"):
        ModelConfig(image_size=60)


# ---------------------------------------------------------------- precision


def test_fused_adam_resumes_an_unfused_checkpoint_and_stays_fused() -> None:
    """A run resumed from a checkpoint saved by the default Adam takes its moments and step counts, then
    steps exactly as the default Adam would have, on the fused kernel."""
    torch.manual_seed(0)
    model = VAE(get_preset("tiny"))
    grads = [[torch.randn_like(p) for p in model.parameters()] for _ in range(4)]

    def steps(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], which: range) -> None:
        for i in which:
            for p, g in zip(params, grads[i], strict=True):
                p.grad = g.clone()
            opt.step()

    plain = copy.deepcopy(model)
    default = torch.optim.Adam(plain.parameters(), lr=1e-2)
    steps(default, list(plain.parameters()), range(2))
    resumed = copy.deepcopy(plain)
    fused = make_optimizer(resumed.parameters(), 1e-3)  # the saved lr wins, as on --resume
    restore_optimizer(fused, copy.deepcopy(default.state_dict()))  # as from a file: no shared tensors
    assert fused.param_groups[0]["fused"] and fused.param_groups[0]["lr"] == 1e-2
    steps(default, list(plain.parameters()), range(2, 4))
    steps(fused, list(resumed.parameters()), range(2, 4))
    assert {int(s["step"]) for s in fused.state.values()} == {4}
    for a, b in zip(resumed.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_resolve_precision() -> None:
    assert resolve_precision("fp32", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"  # an explicit request is honoured
    assert resolve_precision("auto", CPU) == ("bf16" if bf16_is_fast(CPU) else "fp32")
    with pytest.raises(UserError, match="precision"):
        resolve_precision("fp16", CPU)


def test_conditional_model_takes_labels_and_adds_only_the_label_weights() -> None:
    base = get_preset("tiny")
    cond_cfg = dataclasses.replace(base, num_classes=6)
    plain, cond = VAE(base), VAE(cond_cfg)

    def count(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    # one extra input row per class in the encoder's and the decoder's first dense layer
    assert count(cond.encoder) - count(plain.encoder) == 6 * base.dense_dim
    assert count(cond.decoder) - count(plain.decoder) == 6 * base.dense_dim
    torch.manual_seed(0)
    x = torch.rand(4, 3, 64, 64)
    y = torch.tensor([0, 1, 2, 5])
    out = cond.eval()(x, generator=torch.Generator().manual_seed(0), y=y)
    assert out.logits.shape == (4, 3, 64, 64)
    z = torch.randn(2, base.latent_dim)
    a = cond.decoder(z, torch.tensor([0, 0]))
    b = cond.decoder(z, torch.tensor([3, 3]))
    assert not torch.allclose(a, b)  # the label changes the image
    with pytest.raises(ValueError, match="conditional"):
        cond(x)
    with pytest.raises(ValueError, match="unconditional"):
        plain(x, y=y)
