"""Standard FID's feature space: pytorch-fid's InceptionV3 (pool3, 2048-d), loaded from a user-supplied file.

vaeforge never downloads these weights (no network; see features.py for the default feature space).
When the user has pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (or torch-fidelity's
`weights-inception-2015-12-05-6726825d.pth`, converted from the same TensorFlow graph under the same key
names), this module rebuilds the network they load it into and reproduces pytorch-fid's feature path,
without torchvision:

- the network is torchvision's Inception3 (num_classes=1008, no AuxLogits) with pytorch-fid's patches,
  which port quirks of the TensorFlow graph that FID was defined with: the average pools inside the
  A, C and E_1 blocks leave padding out of the mean (count_include_pad=False), and the last E block
  (Mixed_7c) max-pools its pool branch;
- preprocessing is pytorch-fid's: [0, 1] pixels, bilinear resize to 299x299 (align_corners=False), then
  2x - 1 to [-1, 1]; the features are the global average pool of Mixed_7c.

torch-fidelity resizes with its own TF1-style bilinear kernel and scales uint8 as (x - 128) / 128, so its
numbers may differ slightly from these; these follow pytorch-fid.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vaeforge.errors import UserError
from vaeforge.metrics.features import check_images, image_batch

FEATURE_SPACE = "inception-v3-pytorch-fid"
FEATURE_DIM = 2048
INPUT_SIZE = 299
NUM_CLASSES = 1008  # the TF graph's 1,008 outputs (1,000 ImageNet classes + unused ones); fc is not used
PYTORCH_FID_FILE = "~/.cache/torch/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth"


# ---------------------------------------------------------------- the network, small parts first


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 0.001, TensorFlow's) -> ReLU."""

    def __init__(self, cin: int, cout: int, **kwargs: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    """TensorFlow's 3x3 stride-1 SAME average pool: border means over the pixels that exist only."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d (35x35): 1x1, 5x5, double 3x3 and pooled branches; out 224 + pool_features."""

    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pool = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([self.branch1x1(x), b5, b3, pool], 1)


class InceptionB(nn.Module):
    """Mixed_6a: 35x35 -> 17x17 by stride-2 convs and a max pool; out 384 + 96 + cin."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """Mixed_6b..6e (17x17): factorised 7x7 branches of width c7; out 768."""

    def __init__(self, cin: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = conv(d)
        pool = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([self.branch1x1(x), b7, d, pool], 1)


class InceptionD(nn.Module):
    """Mixed_7a: 17x17 -> 8x8 by stride-2 convs and a max pool; out 320 + 192 + cin."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for conv in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b/7c (8x8): split 1x3/3x1 branches; out 2048. `max_pool`: pytorch-fid's FIDInceptionE_2
    (Mixed_7c), whose TensorFlow graph max-pools the pool branch where E_1 (Mixed_7b) averages."""

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool_3x3(x)
        parts = [
            self.branch1x1(x),
            self.branch3x3_2a(b3),
            self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(d),
            self.branch3x3dbl_3b(d),
            self.branch_pool(pooled),
        ]
        return torch.cat(parts, 1)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's InceptionV3 up to the 2048-d average pool. Attribute names are torchvision's, so the
    state_dict keys are those of pytorch-fid's weights file; `fc` is there only to take that file whole."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 299, 299) in [-1, 1] -> (B, 2048) pool3 features."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (B, 2048, 8, 8)
        return x.mean(dim=(2, 3))  # (B, 2048): AdaptiveAvgPool2d(1), flattened


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, 299, 299) in [-1, 1], the way pytorch-fid feeds its network."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, H, W) in [0, 1], like ToTensor()
    x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return x.mul_(2.0).sub_(1.0)


# ---------------------------------------------------------------- the weights file


def _required_keys(net: FIDInceptionV3) -> dict[str, tuple[int, ...]]:
    """Every state_dict entry the features need, with its shape (not fc, not num_batches_tracked)."""
    return {
        k: tuple(v.shape)
        for k, v in net.state_dict().items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }


def _more(names: list[str]) -> str:
    return names[0] + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")


def check_state_dict(state: Any, name: str, net: FIDInceptionV3) -> dict[str, torch.Tensor]:
    """The entries of `state` that `net` loads; UserError (one line, naming `name`) on any mismatch."""
    bad = f"{name} is not a pytorch-fid InceptionV3 state dict"
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise UserError(f"{bad}: it holds a {type(state).__name__}, not a dict of tensors")
    required = _required_keys(net)
    missing = [k for k in required if k not in state]
    if missing:
        raise UserError(f"{bad}: missing {_more(missing)}")
    fc = state.get("fc.weight")
    if isinstance(fc, torch.Tensor) and tuple(fc.shape) != (NUM_CLASSES, FEATURE_DIM):
        raise UserError(  # the one way to tell torchvision's own ImageNet weights apart: 1,000 classes
            f"{bad}: fc.weight is {tuple(fc.shape)}, not ({NUM_CLASSES}, {FEATURE_DIM}); torchvision's "
            "ImageNet Inception is a different network, use pytorch-fid's pt_inception-2015-12-05 file"
        )
    ignored = ("fc.", "AuxLogits.")  # heads the features do not use
    extra = [k for k in state if k not in required and not str(k).startswith(ignored)]
    extra = [k for k in extra if not str(k).endswith("num_batches_tracked")]
    if extra:
        raise UserError(f"{bad}: unexpected key {_more([str(k) for k in extra])}")
    wrong = [
        f"{k} is {tuple(state[k].shape) if isinstance(state[k], torch.Tensor) else type(state[k]).__name__}"
        f", expected {shape}"
        for k, shape in required.items()
        if not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != shape
    ]
    if wrong:
        raise UserError(f"{bad}: {_more(wrong)}")
    heads = {k: v.shape for k, v in net.state_dict().items() if k.startswith("fc.")}
    kept = [
        k for k, shape in heads.items() if isinstance(state.get(k), torch.Tensor) and state[k].shape == shape
    ]
    return {k: state[k] for k in [*required, *kept]}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class InceptionEmbedding:
    """pytorch-fid's pool3 features: call it on uint8 (N, H, W, 3) images to get float64 (N, 2048)."""

    version = FEATURE_SPACE
    dim = FEATURE_DIM

    def __init__(self, net: FIDInceptionV3, weights_sha256: str, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        # channels_last: oneDNN's CPU convolutions run ~2x faster on NHWC; only rounding changes.
        self.net = net.eval().to(self.device, memory_format=torch.channels_last)
        self.weights_sha256 = weights_sha256

    def __call__(
        self,
        images: np.ndarray,
        batch_size: int = 32,  # ~0.5 GB of activations at 299x299 on a CPU; more buys no speed there
        progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """Features of uint8 (N, H, W, 3) images; `progress(done, total)` is called after each batch."""
        check_images(images)
        out = np.empty((len(images), FEATURE_DIM), dtype=np.float64)
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                batch = image_batch(images, start, batch_size)  # (B, H, W, 3) uint8
                x = preprocess(batch.to(self.device)).contiguous(memory_format=torch.channels_last)
                out[start : start + len(batch)] = self.net(x).double().cpu().numpy()
                if progress is not None:
                    progress(start + len(batch), len(images))
        return out


def load_inception(path: str | Path, device: str | torch.device = "cpu") -> InceptionEmbedding:
    """The FID InceptionV3 with weights from pytorch-fid's (or torch-fidelity's) file at `path`.

    Raises:
        UserError: the file is missing, unreadable, or not that network's state dict (one line).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(
            f"Inception weights {path} not found; pass pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
            f"(pytorch-fid keeps it in {PYTORCH_FID_FILE}); vaeforge never downloads it"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types (UnpicklingError, RuntimeError, EOFError, ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{path} is not a readable torch weights file ({first})") from None
    net = FIDInceptionV3()
    full = net.state_dict()  # keeps num_batches_tracked and, when the file has none, fc
    full.update(check_state_dict(state, str(path), net))
    net.load_state_dict(full, strict=True)
    return InceptionEmbedding(net, file_sha256(path), device)
