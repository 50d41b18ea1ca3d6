"""Keras-style layer table (layer, output shape, parameters) for a module; pure torch, returns rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LayerRow:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int


@dataclass
class Summary:
    rows: list[LayerRow]
    total: int
    trainable: int
    non_trainable: int


def count_params(module: nn.Module) -> tuple[int, int]:
    """(trainable, non_trainable) the way Keras counts them: BatchNorm running stats are non-trainable.

    num_batches_tracked is a PyTorch bookkeeping counter, not a parameter, so it is left out.
    """
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    stats = sum(
        b.numel()
        for n, b in module.named_buffers()
        if n.rsplit(".", 1)[-1] in ("running_mean", "running_var")
    )
    return trainable, frozen + stats


def summarize(module: nn.Module, example: torch.Tensor) -> Summary:
    """Run `example` through `module` in eval mode and record every leaf layer's output shape."""
    rows: list[LayerRow] = []
    hooks = []
    for name, sub in module.named_modules():
        if list(sub.children()):
            continue

        def hook(m: nn.Module, _inp: object, out: object, name: str = name) -> None:
            shape = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else ()
            rows.append(LayerRow(name, type(m).__name__, shape, sum(count_params(m))))

        hooks.append(sub.register_forward_hook(hook))
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            module(example)
    finally:
        for h in hooks:
            h.remove()
        module.train(was_training)
    trainable, non_trainable = count_params(module)
    return Summary(rows, trainable + non_trainable, trainable, non_trainable)
