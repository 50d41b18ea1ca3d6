"""The seed design's convolutional VAE: posterior, encoder, decoder, VAE and ELBO loss. Pure torch, no I/O."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vaeforge.config import ModelConfig


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))); hides the reparameterisation trick from the model code."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor) -> None:
        self.mean = mean  # (B, D)
        # Clamp so exp() can neither overflow in bf16 nor collapse to exactly zero variance.
        self.logvar = logvar.clamp(-30.0, 20.0)  # (B, D)

    def sample(
        self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """mean + std * eps; eps (B, D) is `noise` when the caller fixes it per image, else drawn."""
        eps = noise
        if eps is None:
            eps = torch.randn(
                self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
            )
        return self.mean + torch.exp(0.5 * self.logvar) * eps  # (B, D)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, in nats: 0.5 * sum(mu^2 + var - 1 - logvar)."""
        mean, logvar = self.mean.float(), self.logvar.float()
        return 0.5 * torch.sum(mean.pow(2) + logvar.exp() - 1.0 - logvar, dim=1)  # (B,)


def _with_label(h: torch.Tensor, y: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """Append the one-hot label to a conditional model's flat input; an unconditional one takes none."""
    if num_classes == 0:
        if y is not None:
            raise ValueError("this model is unconditional; it takes no labels")
        return h
    if y is None:
        raise ValueError(f"this model is conditional on {num_classes} classes; pass labels y")
    return torch.cat([h, F.one_hot(y.long(), num_classes).to(h.dtype)], dim=1)  # (B, F + K)


def _conv_block(cin: int, cout: int, k: int, stride: int, slope: float) -> nn.Sequential:
    # padding=k//2 gives Keras 'same' output sizes for stride 1 and for stride 2 on even inputs.
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2),
        nn.BatchNorm2d(cout),
        nn.LeakyReLU(slope),
    )


def _deconv_block(cin: int, cout: int, k: int, slope: float) -> nn.Sequential:
    # output_padding=1 makes a stride-2 transposed conv exactly double the size, as Keras 'same' does.
    return nn.Sequential(
        nn.ConvTranspose2d(cin, cout, k, stride=2, padding=k // 2, output_padding=1),
        nn.BatchNorm2d(cout),
        nn.LeakyReLU(slope),
    )


class Encoder(nn.Module):
    """x (B, 3, 64, 64) in [0, 1] -> DiagonalGaussian over z (B, latent_dim)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        k, slope, filters = cfg.kernel_size, cfg.leaky_slope, cfg.enc_filters
        chans = (cfg.channels, *filters)
        self.convs = nn.Sequential(
            *[_conv_block(chans[i], chans[i + 1], k, 1 if i == 0 else 2, slope) for i in range(len(filters))]
        )
        self.num_classes = cfg.num_classes
        flat = filters[-1] * cfg.bottleneck_size**2
        self.dense = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat + cfg.num_classes, cfg.dense_dim),
            nn.BatchNorm1d(cfg.dense_dim),
            nn.SELU(),
        )
        self.mean = nn.Linear(cfg.dense_dim, cfg.latent_dim)
        self.logvar = nn.Linear(cfg.dense_dim, cfg.latent_dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> DiagonalGaussian:
        h = self.convs(x).flatten(1)  # (B, 512*4*4)
        h = self.dense(_with_label(h, y, self.num_classes))  # (B, 1024)
        return DiagonalGaussian(self.mean(h), self.logvar(h))


class Decoder(nn.Module):
    """z (B, latent_dim) -> image (B, 3, 64, 64) in [0, 1]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        k, slope = cfg.kernel_size, cfg.leaky_slope
        self.top_channels, self.top_size = cfg.enc_filters[-1], cfg.bottleneck_size
        self.num_classes = cfg.num_classes
        self.dense = nn.Sequential(
            nn.Linear(cfg.latent_dim + cfg.num_classes, cfg.dense_dim),
            nn.BatchNorm1d(cfg.dense_dim),
            nn.SELU(),
            nn.Linear(cfg.dense_dim, self.top_channels * self.top_size**2),
        )
        chans = (self.top_channels, *cfg.dec_filters)
        self.deconvs = nn.Sequential(
            *[_deconv_block(chans[i], chans[i + 1], k, slope) for i in range(len(chans) - 1)]
        )
        # Final stride-1 layer to RGB; BatchNorm before the sigmoid, as in the seed.
        self.to_rgb = nn.Sequential(
            nn.ConvTranspose2d(chans[-1], cfg.channels, k, stride=1, padding=k // 2),
            nn.BatchNorm2d(cfg.channels),
        )

    def logits(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.dense(_with_label(z, y, self.num_classes))  # (B, 8192)
        h = h.view(-1, self.top_channels, self.top_size, self.top_size)  # (B, 512, 4, 4)
        h = self.deconvs(h)  # (B, 32, 64, 64)
        return self.to_rgb(h)  # (B, 3, 64, 64), pre-sigmoid

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self.logits(z, y))


def fold_batchnorm(decoder: Decoder) -> Decoder:
    """An inference copy of `decoder` with every BatchNorm folded into the layer before it.

    In eval mode a BatchNorm is an affine map per channel, so it can live in the preceding Linear or
    ConvTranspose2d's weights and bias. That drops 6 of the seed64 decoder's passes over its activations:
    about 8% faster on a CPU core (92-104 -> 104-107 img/s, fp32, batch 256). Outputs agree to ~1e-6; after
    rounding to uint8 about 2 pixel values in 100,000 differ by one level. The original is left untouched.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    fused = copy.deepcopy(decoder).eval()
    blocks = [fused.dense, *fused.deconvs, fused.to_rgb]
    for block in blocks:
        for i in range(1, len(block)):
            layer, norm = block[i - 1], block[i]
            if isinstance(norm, (nn.BatchNorm1d, nn.BatchNorm2d)):
                if isinstance(layer, nn.Linear):
                    block[i - 1] = fuse_linear_bn_eval(layer, norm)
                else:
                    block[i - 1] = fuse_conv_bn_eval(layer, norm, transpose=True)
                block[i] = nn.Identity()
    for module in fused.modules():
        if isinstance(module, nn.LeakyReLU):
            module.inplace = True  # inference never needs the pre-activation again
    return fused.requires_grad_(False)


class ConvTransposeLeakyReLU(nn.Module):
    """Inference-only ConvTranspose2d followed by LeakyReLU, as one oneDNN call on a CPU.

    Eager PyTorch runs the activation as a second pass over the conv's output; in bf16 on AMX that pass
    was ~15% of the seed64 decoder's time, because the activations (up to 256 x 32 x 64 x 64) do not fit
    in cache. oneDNN applies it inside the conv (a post-op), through the op TorchInductor emits for the
    same pattern. Elsewhere (a GPU, a torch without oneDNN) it runs the two modules as before.
    """

    def __init__(self, conv: nn.ConvTranspose2d, act: nn.LeakyReLU) -> None:
        super().__init__()
        self.conv, self.slope = conv, act.negative_slope
        self.act = nn.LeakyReLU(act.negative_slope, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # oneDNN has no bf16 kernel for it without AVX512 (BW/VL/DQ) or AVX-NE-CONVERT: on a plain AVX2
        # CPU it raises, so there a bf16 decode (--precision bf16) takes the two-module path
        low_precision = x.dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu")
        if x.device.type == "cpu" and _ONEDNN_FUSION and (_ONEDNN_BF16 or not low_precision):
            c = self.conv
            # oneDNN keeps its input's layout; channels_last (NHWC) is the fast one, and a no-op after
            # the first block
            x = x.contiguous(memory_format=torch.channels_last)
            return torch.ops.mkldnn._convolution_transpose_pointwise(
                x, c.weight, c.bias, list(c.padding), list(c.output_padding), list(c.stride),
                list(c.dilation), c.groups, "leaky_relu", [self.slope], "",
            )  # fmt: skip
        return self.act(self.conv(x))


_ONEDNN_FUSION = torch.backends.mkldnn.is_available() and hasattr(
    torch.ops.mkldnn, "_convolution_transpose_pointwise"
)
_ONEDNN_BF16 = _ONEDNN_FUSION and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def inference_decoder(decoder: Decoder) -> Decoder:
    """What generation decodes with: BatchNorm folded (fold_batchnorm), then each transposed conv fused with
    its LeakyReLU (ConvTransposeLeakyReLU). The seed64 decoder on one CPU core, batch 256, channels_last:
    bf16 ~15-20% faster than fold_batchnorm alone (491-531 -> 589-616 img/s, a busy machine); fp32 ~2%.
    Outputs agree with the plain decoder to float rounding (bf16: one bf16 step, 0.0039, at most).
    """
    fused = fold_batchnorm(decoder)
    for i, block in enumerate(fused.deconvs):
        conv, act = block[0], block[-1]
        if isinstance(conv, nn.ConvTranspose2d) and isinstance(act, nn.LeakyReLU):
            fused.deconvs[i] = nn.Sequential(ConvTransposeLeakyReLU(conv, act))
    return fused.requires_grad_(False)


@dataclass
class VAEOutput:
    posterior: DiagonalGaussian
    logits: torch.Tensor  # (B, 3, H, W) decoder output before the sigmoid

    @property
    def recon(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)


class VAE(nn.Module):
    """Encode, sample with the reparameterisation trick, decode."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None, y: torch.Tensor | None = None
    ) -> VAEOutput:
        """y: (B,) int class labels, required by a conditional model and refused by an unconditional one."""
        posterior = self.encoder(x, y)
        z = posterior.sample(generator)  # (B, D)
        return VAEOutput(posterior, self.decoder.logits(z, y))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Deterministic reconstruction through the posterior mean."""
        return self.decoder(self.encoder(x, y).mode(), y)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        device = next(self.parameters()).device
        z = torch.randn(n, self.config.latent_dim, generator=generator, device=device) * temperature
        return self.decoder(z, y)


@dataclass
class ELBOTerms:
    loss: torch.Tensor  # scalar: mean over the batch of recon + beta * kl, what the optimiser minimises
    recon: torch.Tensor  # (B,) reconstruction term per image, nats-like units summed over pixels
    kl: torch.Tensor  # (B,) KL per image in nats
    mse: torch.Tensor  # (B,) mean squared error per image, for PSNR


def elbo_loss(x: torch.Tensor, out: VAEOutput, beta: float = 1.0, recon_loss: str = "mse") -> ELBOTerms:
    """Negative ELBO per image: a reconstruction term summed over pixels plus beta times the KL.

    "mse" is the summed squared error (a fixed-variance Gaussian decoder); "bce" is the summed
    Bernoulli cross-entropy computed from logits for numerical stability.
    """
    logits = out.logits.float()
    recon_img = torch.sigmoid(logits)
    sq = (recon_img - x).pow(2).flatten(1)  # (B, C*H*W)
    if recon_loss == "mse":
        recon = sq.sum(dim=1)
    elif recon_loss == "bce":
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(dim=1)
    else:
        raise ValueError(f"recon_loss must be 'mse' or 'bce', got {recon_loss!r}")
    kl = out.posterior.kl()
    return ELBOTerms(loss=(recon + beta * kl).mean(), recon=recon, kl=kl, mse=sq.mean(dim=1))


def psnr(mse: torch.Tensor) -> torch.Tensor:
    """PSNR in dB for images in [0, 1]."""
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))
