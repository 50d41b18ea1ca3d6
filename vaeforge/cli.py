"""Typer CLI: parses options, builds the config objects, prints for people. Nothing imports this module.

Heavy modules (torch, ray) are imported inside the commands: the data decoder's process pool re-imports
`__main__`, and `vaeforge --help` should answer instantly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from typer.exceptions import TyperException

from vaeforge.config import PRECISIONS, RECON_LOSSES, TrainConfig, get_preset
from vaeforge.errors import UserError

app = typer.Typer(
    help="Learn the style of an image collection with a VAE on Ray, then mass-produce images in that style.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()


@app.command()
def train(
    data: str = typer.Option(
        None,
        help="Image folder, WebDataset .tar shards (path, glob, braces) or Parquet; default: built-in.",
    ),
    output: Path = typer.Option(Path("runs/train"), help="Run directory: checkpoints, metrics, pictures."),
    preset: str = typer.Option("seed64", help="Model preset: seed64 (the design's VAE) or tiny."),
    workers: int = typer.Option(1, help="Ray Train workers (DDP ranks)."),
    epochs: int = typer.Option(10, help="Epochs to train in total (a resumed run continues up to this)."),
    batch_size: int = typer.Option(64, help="Global batch size, split evenly across workers."),
    lr: float = typer.Option(1e-3, help="Adam learning rate."),
    beta: float = typer.Option(1.0, help="Weight of the KL term (1.0 is the true ELBO)."),
    recon_loss: str = typer.Option("mse", help=f"Reconstruction term: {', '.join(RECON_LOSSES)}."),
    seed: int = typer.Option(0, help="Seed for init, shuffling, the split and the noise."),
    precision: str = typer.Option(
        "auto", help=f"{'|'.join(PRECISIONS)}; auto uses bf16 where hardware runs it."
    ),
    gpus: bool = typer.Option(
        None, "--gpus/--no-gpus", help="Force GPU use on or off (default: if present)."
    ),
    cpus_per_worker: float = typer.Option(None, help="CPUs per worker (default: local cores / workers)."),
    address: str = typer.Option(
        None, help="Ray cluster to join (default: RAY_ADDRESS, else start local Ray)."
    ),
    max_samples: int = typer.Option(None, help="Use at most this many images from the source."),
    builtin_count: int = typer.Option(8192, help="Size of the built-in dataset when --data is not given."),
    val_fraction: float = typer.Option(0.05, help="Held-out fraction for validation."),
    cache_dir: str = typer.Option(None, help="Decoded-image cache (default: ~/.cache/vaeforge)."),
    max_failures: int = typer.Option(
        0, help="Worker-group restarts allowed; each resumes from the last checkpoint."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in --output from its latest checkpoint."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run in --output."),
) -> None:
    """Train the VAE with Ray Train (DDP over --workers), writing checkpoints, metrics and pictures."""
    cfg = TrainConfig(
        output=str(output),
        model=get_preset(preset),
        preset=preset,
        data=data,
        workers=workers,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        beta=beta,
        recon_loss=recon_loss,
        seed=seed,
        precision=precision,
        use_gpu=gpus,
        cpus_per_worker=cpus_per_worker,
        address=address,
        max_samples=max_samples,
        builtin_count=builtin_count,
        val_fraction=val_fraction,
        cache_dir=cache_dir,
        max_failures=max_failures,
        resume=resume,
        overwrite=overwrite,
    )
    from vaeforge.progress import TrainDisplay
    from vaeforge.train import run_training

    display = TrainDisplay(err)
    try:
        result = run_training(cfg, display)
    finally:
        display.close()
    last = result.history[-1] if result.history else {}
    out.print(f"[bold green]done[/]: run in {result.output}")
    out.print(f"  best checkpoint   {result.best_checkpoint}")
    out.print(f"  latest checkpoint {result.latest_checkpoint}")
    out.print(f"  metrics           {result.output / 'metrics.jsonl'}")
    out.print(f"  pictures          {result.output / 'samples'}")
    if last:
        out.print(f"  held-out ELBO loss {last['val_loss']:.2f}, PSNR {last['val_psnr']:.2f} dB")


@app.command("model-summary")
def model_summary(preset: str = typer.Option("seed64", help="Model preset to describe.")) -> None:
    """Print Keras-style tables of the encoder and decoder: layer, output shape, parameters."""
    import torch

    from vaeforge.model import VAE
    from vaeforge.summary import summarize

    cfg = get_preset(preset)
    vae = VAE(cfg)
    size = cfg.image_size
    parts = [
        ("encoder", vae.encoder, torch.zeros(2, cfg.channels, size, size)),
        ("decoder", vae.decoder, torch.zeros(2, cfg.latent_dim)),
    ]
    for name, module, example in parts:
        s = summarize(module, example)
        table = Table(title=f'Model: "{name}" (preset {preset})', title_justify="left")
        table.add_column("Layer (type)")
        table.add_column("Output Shape")
        table.add_column("Param #", justify="right")
        for row in s.rows:
            table.add_row(f"{row.name} ({row.kind})", str((None, *row.output_shape)), f"{row.params:,}")
        out.print(table)
        out.print(f"Total params: {s.total:,}")
        out.print(f"Trainable params: {s.trainable:,}")
        out.print(f"Non-trainable params: {s.non_trainable:,}\n")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    try:
        code = app(args=argv, standalone_mode=False)
    except UserError as e:
        _fail(str(e), 2)
    except KeyboardInterrupt:
        _fail("interrupted; finished checkpoints and shards are kept, re-run with --resume to continue", 130)
    except TyperException as e:  # click's usage errors (unknown option, bad value) and Abort (Ctrl-C)
        if not hasattr(e, "format_message"):
            _fail(
                "interrupted; finished checkpoints and shards are kept, re-run with --resume to continue", 130
            )
        ctx = getattr(e, "ctx", None)
        hint = f" (see `vaeforge {ctx.command.name} --help`)" if ctx and ctx.parent else ""
        _fail(f"{e.format_message()}{hint}", getattr(e, "exit_code", 2))
    if isinstance(code, int) and code:
        sys.exit(code)


def _fail(message: str, code: int) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(code)
