"""Decoder forward speed as generation runs it: the plain decoder against fold_batchnorm and against
model.inference_decoder (folded + LeakyReLU fused into each transposed conv), measured in one run.

    .venv/bin/python bench/bench_decoder.py [--precision auto] [--batch 256] [--rounds 5]

One thread, channels_last, batch 256, including the uint8 conversion, as one CPU actor decodes. The three
decoders are timed in turn, round after round, so drift of a shared machine hits each alike; the figure
per decoder is its median round, and the ratios are to the plain decoder.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vaeforge.config import get_preset
from vaeforge.model import VAE, fold_batchnorm, inference_decoder
from vaeforge.runtime import autocast, resolve_precision, to_uint8_hwc


def rate(decoder: torch.nn.Module, z: torch.Tensor, precision: str, seconds: float) -> float:
    device = torch.device("cpu")
    with torch.inference_mode(), autocast(precision, device):
        to_uint8_hwc(decoder(z))  # warm-up: oneDNN builds its kernels on the first call
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            to_uint8_hwc(decoder(z))
            n += len(z)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=5.0, help="Length of each timed run.")
    args = ap.parse_args()
    torch.set_num_threads(1)
    precision = resolve_precision(args.precision, torch.device("cpu"))
    torch.manual_seed(0)
    plain = VAE(get_preset("seed64")).eval().decoder
    decoders = {
        "plain": plain.to(memory_format=torch.channels_last),
        "fold_batchnorm": fold_batchnorm(plain).to(memory_format=torch.channels_last),
        "inference_decoder": inference_decoder(plain).to(memory_format=torch.channels_last),
    }
    z = torch.randn(args.batch, plain.dense[0].in_features)
    rates: dict[str, list[float]] = {name: [] for name in decoders}
    for _ in range(args.rounds):
        for name, dec in decoders.items():
            rates[name].append(rate(dec, z, precision, args.seconds))
    base = statistics.median(rates["plain"])
    print(f"seed64 decoder, {precision}, batch {args.batch}, 1 thread, median of {args.rounds} rounds")
    for name, r in rates.items():
        m = statistics.median(r)
        print(
            f"  {name:<18} {m:8.1f} img/s  ratio to plain {m / base:.3f}  (rounds {min(r):.0f}-{max(r):.0f})"
        )


if __name__ == "__main__":
    main()
