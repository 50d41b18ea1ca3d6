"""Device, precision and thread choices shared by training and generation; pure torch."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from vaeforge.errors import UserError


def claim_cpu(threads: int) -> None:
    """Set torch's thread count, first undoing Ray's worker niceness (15) where we are allowed to.

    On a small node the training or decoding process is the job, yet at nice 15 every Ray housekeeping
    process (controller, dashboard agent, queue) preempts it; measured on 2 cores, that cost ~10% of
    steps/s. Linux niceness is per thread and inherited at creation, so this runs before torch starts
    its thread pool. Without the privilege (non-root containers) it is a no-op.
    """
    with contextlib.suppress(OSError):  # PermissionError without CAP_SYS_NICE
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    torch.set_num_threads(threads)


def bf16_is_fast(device: torch.device) -> bool:
    """True when bf16 autocast runs on real bf16 hardware (AMX/AVX512-BF16 on CPU, Ampere+ on GPU).

    On CPUs without it (plain AVX2) oneDNN emulates bf16 and a VAE step is ~30x *slower* than fp32,
    so `auto` must not pick it there.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_precision(requested: str, device: torch.device) -> str:
    """Map auto|bf16|fp32 to the precision actually used on `device`."""
    if requested == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    if requested not in ("bf16", "fp32"):
        raise UserError(f"--precision must be auto, bf16 or fp32, got {requested!r}")
    return requested


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """bf16 autocast for the forward pass; a no-op for fp32."""
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        yield


def make_optimizer(params, lr: float) -> torch.optim.Adam:
    """Adam with the fused step: one kernel over all parameters, on CPUs and GPUs.

    The default multi-tensor step makes ~10 passes over the seed64 model's 27 M parameters and their two
    moment buffers; on one CPU core it took ~105 ms against the fused step's ~20 ms, about 5% of a bf16
    training step (bench/bench_train.py prints both). The update is the same to float rounding.
    """
    return torch.optim.Adam(params, lr=lr, fused=True)


def restore_optimizer(opt: torch.optim.Optimizer, state: dict) -> None:
    """Load a checkpoint's moments and hyperparameters into `opt`, keeping `opt`'s own step kernel.

    load_state_dict also copies the saved `fused`/`foreach` flags, so a checkpoint from before the fused
    step (or from a machine that could not fuse) would otherwise switch the resumed run back.
    """
    kernel = {k: opt.param_groups[0][k] for k in ("fused", "foreach")}
    opt.load_state_dict(state)
    for group in opt.param_groups:
        group.update(kernel)


def to_model_input(batch_u8: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [0, 1], channels_last (the NHWC storage is kept)."""
    x = batch_u8.to(device, non_blocking=True).permute(0, 3, 1, 2)  # a view: stays NHWC in memory
    return x.float().div_(255.0).contiguous(memory_format=torch.channels_last)


def to_uint8_hwc(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] -> (B, H, W, 3) uint8 on the CPU, rounded rather than truncated."""
    return (
        images.float().clamp(0, 1).mul(255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu()
    )
