"""pytorch-fid's InceptionV3 without torchvision: keys, shapes, pooling quirks, preprocessing, weights-file
checks and `vaeforge evaluate --inception-weights`. Random weights only: nothing downloads."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_generate import user_error  # the same exit-2, one-line contract

from vaeforge.checkpoint import save_checkpoint
from vaeforge.config import get_preset
from vaeforge.errors import UserError
from vaeforge.metrics.distribution import fid
from vaeforge.metrics.inception import (
    FIDInceptionV3,
    InceptionA,
    InceptionE,
    check_state_dict,
    load_inception,
    preprocess,
)
from vaeforge.model import VAE

# The names of every BasicConv2d in pytorch-fid's network, written out from torchvision's Inception3 and
# pytorch-fid's fid_inception_v3 (num_classes=1008, aux_logits=False): not from vaeforge's code.
STEM = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
A = ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3",
     "branch_pool"]  # fmt: skip
B = ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]
C = ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", *(f"branch7x7dbl_{i}" for i in range(1, 6)),
     "branch_pool"]  # fmt: skip
D = ["branch3x3_1", "branch3x3_2", *(f"branch7x7x3_{i}" for i in range(1, 5))]
E = ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
     "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"]  # fmt: skip
BLOCKS = {"Mixed_5b": A, "Mixed_5c": A, "Mixed_5d": A, "Mixed_6a": B, "Mixed_6b": C, "Mixed_6c": C,
          "Mixed_6d": C, "Mixed_6e": C, "Mixed_7a": D, "Mixed_7b": E, "Mixed_7c": E}  # fmt: skip
CONVS = STEM + [f"{block}.{branch}" for block, branches in BLOCKS.items() for branch in branches]
PYTORCH_FID_KEYS = {
    f"{conv}.{leaf}"
    for conv in CONVS
    for leaf in ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")
} | {"fc.weight", "fc.bias"}

# Shapes read off the architecture sources, a sample from every block type.
SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_mean": (32,),
    "Conv2d_2b_3x3.conv.weight": (64, 32, 3, 3),
    "Conv2d_3b_1x1.conv.weight": (80, 64, 1, 1),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1),
    "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5c.branch_pool.conv.weight": (64, 256, 1, 1),
    "Mixed_5d.branch3x3dbl_1.conv.weight": (64, 288, 1, 1),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6a.branch3x3dbl_3.conv.weight": (96, 96, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6b.branch7x7_3.conv.weight": (192, 128, 7, 1),
    "Mixed_6c.branch7x7dbl_2.conv.weight": (160, 160, 7, 1),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_6e.branch_pool.conv.weight": (192, 768, 1, 1),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch1x1.conv.weight": (320, 1280, 1, 1),
    "Mixed_7b.branch3x3dbl_2.conv.weight": (384, 448, 3, 3),
    "Mixed_7c.branch3x3_2a.conv.weight": (384, 384, 1, 3),
    "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "Mixed_7c.branch_pool.bn.running_var": (192,),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}
# torchvision's inception_v3() (1000 classes, AuxLogits) has 27,161,264 parameters. Take away AuxLogits
# (conv0 768*128 + BN 2*128, conv1 128*768*5*5 + BN 2*768, fc 768*1000 + 1000 = 3,326,696) and the
# 1000-class fc (2,049,000), add the 1008-class fc (2,065,392): 23,850,960.
PARAMS = 27_161_264 - 3_326_696 - 2_049_000 + 2_065_392


@pytest.fixture(scope="module")
def random_state() -> dict[str, torch.Tensor]:
    """A random-init state dict with non-trivial BatchNorm statistics, in pytorch-fid's file layout."""
    torch.manual_seed(0)
    net = FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}


@pytest.fixture(scope="module")
def weights_file(random_state: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(random_state, path)
    return path


def images(seed: int, n: int, smooth: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if smooth:  # flat colours
        return np.repeat(rng.integers(0, 256, (n, 1, 1, 3), dtype=np.uint8), 64 * 64, axis=1).reshape(
            n, 64, 64, 3
        )
    return rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


# ---------------------------------------------------------------- architecture


def test_keys_shapes_and_parameter_count_are_pytorch_fids() -> None:
    net = FIDInceptionV3()
    state = net.state_dict()
    assert {k for k in state if not k.endswith("num_batches_tracked")} == PYTORCH_FID_KEYS
    assert len(CONVS) == 94 and len(PYTORCH_FID_KEYS) == 472
    assert {k: tuple(state[k].shape) for k in SHAPES} == SHAPES
    assert not any(k.startswith("AuxLogits") for k in state)
    assert PARAMS == 23_850_960
    assert sum(p.numel() for p in net.parameters()) == PARAMS
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 94 and {m.eps for m in bns} == {0.001}  # TensorFlow's epsilon
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.bias is None for m in convs)
    # the pool branch behaviours tested below sit where pytorch-fid puts them
    assert net.Mixed_7c.max_pool and not net.Mixed_7b.max_pool


def _only_pool_branch(block: torch.nn.Module, cin: int) -> None:
    """Zero every conv except the pool branch, which becomes the identity on the first `cin` channels."""
    for m in block.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.zeros_(m.weight)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.fill_(1.0 - m.eps)  # x / sqrt(var + eps) = x
    block.branch_pool.conv.weight.data[:cin, :cin, 0, 0] = torch.eye(cin)


@pytest.mark.parametrize("kind", ["A", "E_1", "E_2"])
def test_pool_branches_follow_tensorflow(kind: str) -> None:
    """A and E_1 average without the zero padding (count_include_pad=False); E_2 (Mixed_7c) max-pools."""
    cin = 2
    block = {"A": InceptionA(cin, 8), "E_1": InceptionE(cin, False), "E_2": InceptionE(cin, True)}[kind]
    _only_pool_branch(block, cin)
    x = torch.arange(1.0, 1.0 + cin * 25).reshape(1, cin, 5, 5)
    with torch.inference_mode():
        y = block.eval()(x)
    pool = y[0, -block.branch_pool.conv.out_channels :][:cin]  # the pool branch is concatenated last
    corner = x[0, 0, :2, :2]  # the 3x3 window at (0, 0) holds 4 real pixels and 5 of padding
    expected = corner.max() if kind == "E_2" else corner.sum() / 4  # not / 9: padding is left out
    assert pool[0, 0, 0].item() == pytest.approx(expected.item(), rel=1e-5)
    assert pool[1, 2, 2].item() == pytest.approx((x[0, 1, 3, 3] if kind == "E_2" else x[0, 1, 2, 2]).item())


def test_preprocess_is_pytorch_fids() -> None:
    """[0, 1] -> 299x299 bilinear with half-pixel centres (align_corners=False) -> [-1, 1]."""
    ramp = np.broadcast_to((np.arange(64) * 4).astype(np.uint8)[None, None, :, None], (1, 64, 64, 3))
    x = preprocess(torch.from_numpy(ramp.copy()))
    assert x.shape == (1, 3, 299, 299)
    # output column j samples input column (j + 0.5) * 64/299 - 0.5, clamped at 0 (align_corners=True
    # would sample j * 63/298 instead and give column 1 a value above 0).
    src = [max((j + 0.5) * 64 / 299 - 0.5, 0.0) for j in range(3)]
    expected = [2 * 4 * s / 255 - 1 for s in src]
    assert x[0, 0, 10, :3].tolist() == pytest.approx(expected, abs=1e-6)
    flat = preprocess(torch.full((2, 64, 64, 3), 255, dtype=torch.uint8))
    # bilinear weights sum to 1 only up to float rounding, which varies with the kernel torch picks
    torch.testing.assert_close(flat, torch.ones_like(flat), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- loading and features


def test_loaded_weights_give_2048_features_and_identical_sets_give_zero_fid(
    weights_file: Path, random_state: dict[str, torch.Tensor]
) -> None:
    net = load_inception(weights_file)
    assert net.weights_sha256 == hashlib.sha256(weights_file.read_bytes()).hexdigest()
    loaded = net.net.state_dict()
    for key in ("Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.bn.running_var", "fc.weight"):
        assert torch.equal(loaded[key], random_state[key]), key
    a = images(1, 3)
    feats = net(a, batch_size=2)
    assert feats.shape == (3, 2048) and feats.dtype == np.float64
    assert np.isfinite(feats).all() and (feats >= 0).all() and feats.std() > 0  # pooled ReLUs
    again = net(a, batch_size=3)  # other batches, same images: same features up to rounding
    np.testing.assert_allclose(again, feats, rtol=1e-4, atol=1e-6)
    same = fid(feats, again)
    other = fid(feats, net(images(2, 3, smooth=True)))
    assert same < 1e-6 * other and other > 0


def test_wrapped_and_headless_state_dicts_load(random_state: dict[str, torch.Tensor]) -> None:
    net = FIDInceptionV3()
    assert len(check_state_dict({"state_dict": random_state}, "w.pth", net)) == 472
    headless = {k: v for k, v in random_state.items() if not k.startswith("fc.")}
    aux = {"AuxLogits.fc.weight": torch.zeros(1008, 768)}  # heads the features never use are ignored
    assert len(check_state_dict({**headless, **aux}, "w.pth", net)) == 470


def _one_line_error(state: object) -> str:
    with pytest.raises(UserError) as exc:
        check_state_dict(state, "w.pth", FIDInceptionV3())
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("w.pth is not a pytorch-fid InceptionV3 state dict")
    return msg


def test_mismatched_state_dicts_are_one_line_user_errors(random_state: dict[str, torch.Tensor]) -> None:
    other = VAE(get_preset("tiny")).state_dict()
    assert "missing Conv2d_1a_3x3.conv.weight (and 469 more)" in _one_line_error(other)
    short = dict(random_state)
    del short["Mixed_5b.branch1x1.conv.weight"]
    assert _one_line_error(short).endswith("missing Mixed_5b.branch1x1.conv.weight")
    bent = {**random_state, "Mixed_6a.branch3x3.conv.weight": torch.zeros(384, 288, 1, 1)}
    assert "Mixed_6a.branch3x3.conv.weight is (384, 288, 1, 1), expected (384, 288, 3, 3)" in _one_line_error(
        bent
    )
    torchvision = {**random_state, "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}
    assert "torchvision" in _one_line_error(torchvision)
    assert "unexpected key extra.weight" in _one_line_error({**random_state, "extra.weight": torch.zeros(1)})
    assert "holds a list" in _one_line_error([1, 2])


def test_unreadable_files_are_one_line_user_errors(tmp_path: Path) -> None:
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    module = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), module)  # a pickled module: weights_only refuses to run its pickle
    vae = tmp_path / "vae.pth"
    torch.save(VAE(get_preset("tiny")).state_dict(), vae)
    for path, words in [
        (text, "is not a readable torch weights file"),
        (module, "is not a readable torch weights file"),
        (vae, "is not a pytorch-fid InceptionV3 state dict: missing Conv2d_1a_3x3.conv.weight"),
        (tmp_path / "missing.pth", "not found"),
    ]:
        with pytest.raises(UserError) as exc:
            load_inception(path)
        msg = str(exc.value)
        assert str(path) in msg and words in msg and "\n" not in msg, msg


# ---------------------------------------------------------------- through `vaeforge evaluate`


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny VAE, as in test_generate: no training (and no Ray) needed to evaluate it."""
    torch.manual_seed(0)
    return save_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "ckpt", VAE(get_preset("tiny")).eval(), {"epoch": 0, "metrics": {}}
    )


def test_evaluate_with_a_missing_weights_file_fails_fast(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.pth"
    # no --data: without the early check, evaluate would fail on the data instead
    line = user_error(["evaluate", "--checkpoint", str(ckpt), "--inception-weights", str(missing)], capsys)
    assert str(missing) in line and "never downloads" in line


def test_evaluate_reports_inception_fid(
    ckpt: Path, weights_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vaeforge.cli import main

    data = tmp_path / "real"
    data.mkdir()
    for i, img in enumerate(images(3, 20)):
        Image.fromarray(img).save(data / f"{i:02d}.png")
    out = tmp_path / "eval"
    main(["evaluate", "--checkpoint", str(ckpt), "--data", str(data), "--samples", "10", "--max-train", "10",
          "--no-usefulness", "--inception-weights", str(weights_file), "--output", str(out)])  # fmt: skip
    inc = json.loads((out / "metrics.json").read_text())["samplers"]["prior"]["inception"]
    assert inc["feature_space"] == "inception-v3-pytorch-fid" and inc["fid"] > 0
    assert inc["weights_sha256"] == hashlib.sha256(weights_file.read_bytes()).hexdigest()
    assert inc["n_real"] == inc["n_fake"] == 10
    assert "prior: inception_fid" in (out / "report.html").read_text()
    assert "Inception FID" in capsys.readouterr().out
