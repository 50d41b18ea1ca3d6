"""Typer CLI: parses options, builds the config objects, prints for people. Only jobs/ imports it (main).

Heavy modules (torch, ray) are imported inside the commands: the data decoder's process pool re-imports
`__main__`, and `vaeforge --help` should answer instantly.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import inspect
import os
import sys
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from typer.exceptions import TyperException

from vaeforge.config import (
    IMAGE_FORMATS,
    LR_FLOOR,
    LR_SCHEDULES,
    OUTPUT_FORMATS,
    PRECISIONS,
    RECON_LOSSES,
    EvaluateConfig,
    GenerateConfig,
    ScoreConfig,
    TrainConfig,
    get_preset,
    parse_count,
)
from vaeforge.errors import UserError

app = typer.Typer(
    help="Learn the style of an image collection with a VAE on Ray, then mass-produce images in that style.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)  # paths stay whole when piped, for copy and paste


@app.command()
def train(
    data: str = typer.Option(
        None,
        help="Image folder, WebDataset .tar shards (path, glob, braces) or Parquet, local or a URI "
        "(s3://, gs://, ...); default: built-in.",
    ),
    # Locations are strings, not Paths: Path("s3://b/x") would turn into "s3:/b/x".
    output: str = typer.Option(
        "runs/train", help="Run directory (local or a URI): checkpoints, metrics, pictures."
    ),
    preset: str = typer.Option("seed64", help="Model preset: seed64 (the design's VAE) or tiny."),
    workers: int = typer.Option(1, help="Ray Train workers (DDP ranks)."),
    epochs: int = typer.Option(10, help="Epochs to train in total (a resumed run continues up to this)."),
    batch_size: int = typer.Option(64, help="Global batch size, split evenly across workers."),
    lr: float = typer.Option(1e-3, help="Adam learning rate."),
    lr_schedule: str = typer.Option(
        "constant",
        help=f"{'|'.join(LR_SCHEDULES)}; cosine decays --lr to {LR_FLOOR:.0%} of it over --epochs "
        "(resume-safe).",
    ),
    beta: float = typer.Option(1.0, help="Weight of the KL term (1.0 is the true ELBO)."),
    recon_loss: str = typer.Option("mse", help=f"Reconstruction term: {', '.join(RECON_LOSSES)}."),
    conditional: bool = typer.Option(
        False, "--conditional", help="Condition on the data's class labels (generate --classes then works)."
    ),
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
    dashboard: bool = typer.Option(
        True,
        "--dashboard/--no-dashboard",
        help="Start Ray's dashboard with a local Ray (it takes ~2.5% of a 2-core machine's CPU).",
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
    fit_sampler: bool = typer.Option(
        True,
        "--fit-sampler/--no-fit-sampler",
        help="At the end, fit `generate --sampler gmm`'s mixture and `--sampler kde`'s kernel density on "
        "the best checkpoint (per class when the data is labeled).",
    ),
) -> None:
    """Train the VAE with Ray Train (DDP over --workers), writing checkpoints, metrics and pictures."""
    _run_train(train_config(dict(locals())))  # locals() here is exactly the parsed options


@app.command()
def generate(
    checkpoint: str = typer.Option(
        ..., help="Run directory (its best checkpoint), checkpoint directory or model.pt; local or a URI."
    ),
    count: str = typer.Option(
        None, help="Images to generate: 1e6, 1000000 or 1_000_000 (default: the sum of --classes C:N)."
    ),
    output: str = typer.Option(
        "runs/generated", help="Directory (local or a URI) for the shards, _manifest.json and _SUCCESS."
    ),
    format: str = typer.Option("webdataset", help=f"Output format: {', '.join(OUTPUT_FORMATS)}."),
    image_format: str = typer.Option(
        "png", help=f"Image encoding: {', '.join(IMAGE_FORMATS)} (npy: raw uint8)."
    ),
    quality: int = typer.Option(95, help="JPEG/WebP quality."),
    shard_size: int = typer.Option(10_000, help="Samples per shard."),
    seed: int = typer.Option(0, help="Fixes every latent: sample i of shard s comes from seed (seed, s, i)."),
    sampler: str = typer.Option(
        "prior",
        help="prior: N(0, I); gmm: the mixture `vaeforge fit-sampler` fitted to the encoder means; kde: "
        "its kernel density on every training latent (the best TSTR and FID in the README's benchmark).",
    ),
    temperature: float = typer.Option(1.0, help="Scales the spread of any sampler."),
    classes: str = typer.Option(
        None,
        help="all (training proportions; a conditional model's default), balanced, or C:N,C:N (e.g. "
        "3:10000). An unconditional model takes it with --sampler gmm or kde fitted per class.",
    ),
    prefix: str = typer.Option("samples", help="Shard file prefix: PREFIX-000000.tar."),
    batch_size: int = typer.Option(256, help="Decoder batch size."),
    workers: int = typer.Option(
        None, help="Actors (default: one per GPU, else one 1-thread actor per core)."
    ),
    gpus: bool = typer.Option(
        None, "--gpus/--no-gpus", help="Force GPU use on or off (default: if present)."
    ),
    precision: str = typer.Option(
        "auto", help=f"{'|'.join(PRECISIONS)}; auto uses bf16 where hardware runs it."
    ),
    encode_threads: int = typer.Option(
        None, help="Encoder threads per actor (default: 2 on GPU, 0 = inline on CPU)."
    ),
    max_retries: int = typer.Option(3, help="Retries per shard before the run stops."),
    address: str = typer.Option(
        None, help="Ray cluster to join (default: RAY_ADDRESS, else start local Ray)."
    ),
    dashboard: bool = typer.Option(
        True,
        "--dashboard/--no-dashboard",
        help="Start Ray's dashboard with a local Ray (it takes ~2.5% of a 2-core machine's CPU).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a different run in --output."),
) -> None:
    """Sample a trained VAE into WebDataset or Parquet shards, exactly once; re-run the command to resume."""
    _run_generate(generate_config(dict(locals())))  # locals() here is exactly the parsed options


# `vaeforge pipeline` takes every train option and every generate option, defined once above: its
# signature is built from theirs. Where both commands have an option, it either means the same thing in
# both stages (shared: one value serves both) or not (renamed: generate's gets a --gen- prefix).
PIPELINE_SHARED = ("seed", "precision", "gpus", "address", "dashboard", "overwrite")
PIPELINE_RENAMED = {"workers": "gen_workers", "batch_size": "gen_batch_size"}
PIPELINE_DERIVED = ("checkpoint", "output")  # generate's, set from the pipeline's --output
TRAIN_DIR, SHARDS_DIR = "train", "shards"


def pipeline(**opts: Any) -> None:
    """Train, then generate from the trained run: OUTPUT/train holds the run, OUTPUT/shards the images.

    Takes every train and generate option (generate's --workers and --batch-size as --gen-workers and
    --gen-batch-size). Re-run with --resume to continue: training picks up at its latest checkpoint and
    generation keeps every finished shard.
    """
    # Both configs are built, so both are checked, before training starts: a bad --format fails in a second,
    # not after hours of training.
    train_cfg, gen_cfg = pipeline_configs(opts)
    result = _run_train(train_cfg)
    _run_generate(dataclasses.replace(gen_cfg, checkpoint=str(result.output)))


def pipeline_configs(opts: dict[str, Any]) -> tuple[TrainConfig, GenerateConfig]:
    """Split the pipeline's options into train's and generate's and build both configs the usual way."""
    root = opts["output"]
    train_opts = {name: opts[name] for name in _option_names(train) if name != "output"}
    train_opts["output"] = _join(root, TRAIN_DIR)
    gen_opts = {
        name: opts[PIPELINE_RENAMED.get(name, name)]
        for name in _option_names(generate)
        if name not in PIPELINE_DERIVED
    }
    gen_opts.update(checkpoint=_join(root, TRAIN_DIR), output=_join(root, SHARDS_DIR))
    train_cfg, gen_cfg = train_config(train_opts), generate_config(gen_opts)
    if gen_cfg.sampler != "prior" and not train_cfg.fit_sampler:
        raise UserError(
            f"--sampler {gen_cfg.sampler} samples from the fit made when training ends: drop --no-fit-sampler"
        )
    return train_cfg, gen_cfg


def _option_names(command: Any) -> list[str]:
    return list(inspect.signature(command).parameters)


def _join(root: Any, name: str) -> str:
    """root/name as a string: joining strings keeps a URI such as s3://bucket/run intact; Path would not."""
    return f"{str(root).rstrip('/')}/{name}"


def _pipeline_signature() -> inspect.Signature:
    """train's options, then generate's (shared ones once, clashing ones renamed), each in a help panel."""
    output = typer.Option(
        "runs/pipeline",
        help=f"Pipeline directory: the run in OUTPUT/{TRAIN_DIR}, shards in OUTPUT/{SHARDS_DIR}.",
    )
    params = {
        "output": inspect.Parameter("output", inspect.Parameter.KEYWORD_ONLY, default=output, annotation=str)
    }
    for name, p in inspect.signature(train, eval_str=True).parameters.items():
        if name != "output":
            panel = "Both stages" if name in PIPELINE_SHARED else "Training"
            params[name] = _in_panel(p, name, panel)
    for name, p in inspect.signature(generate, eval_str=True).parameters.items():
        if name in PIPELINE_DERIVED or name in PIPELINE_SHARED:
            continue
        new = PIPELINE_RENAMED.get(name, name)
        if new in params:  # a new option in both commands must be declared shared or renamed above
            raise RuntimeError(
                f"generate option {name!r} clashes with train's: add it to PIPELINE_SHARED or _RENAMED"
            )
        params[new] = _in_panel(p, new, "Generation")
    return inspect.Signature(list(params.values()))


def _in_panel(p: inspect.Parameter, name: str, panel: str) -> inspect.Parameter:
    info = copy.copy(p.default)  # the command's own OptionInfo stays untouched
    info.rich_help_panel = panel
    return p.replace(name=name, kind=inspect.Parameter.KEYWORD_ONLY, default=info)


pipeline.__signature__ = _pipeline_signature()  # type: ignore[attr-defined]  # what Typer reads
app.command()(pipeline)


def train_config(opts: dict[str, Any]) -> TrainConfig:
    """The one way options become a TrainConfig: `train`, `pipeline` and so jobs/ all come through here."""
    opts = dict(opts)
    opts["use_gpu"] = opts.pop("gpus")
    opts.update(output=str(opts["output"]), model=get_preset(opts["preset"]))
    return TrainConfig(**opts)


def generate_config(opts: dict[str, Any]) -> GenerateConfig:
    """The one way options become a GenerateConfig, for `generate` and `pipeline`."""
    opts = dict(opts)
    opts["use_gpu"] = opts.pop("gpus")
    from vaeforge.sampling import explicit_total

    count = opts["count"] if opts["count"] is not None else explicit_total(opts["classes"])
    if count is None:
        raise UserError("--count is required (it may be left out only with --classes C:N,C:N)")
    opts.update(output=str(opts["output"]), count=parse_count(count))
    return GenerateConfig(**opts)


def _run_train(cfg: TrainConfig) -> Any:
    from vaeforge.progress import TrainDisplay
    from vaeforge.storage import join
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
    out.print(f"  metrics           {join(result.output, 'metrics.jsonl')}")
    out.print(f"  pictures          {join(result.output, 'samples')}")
    if last:
        out.print(f"  held-out ELBO loss {last['val_loss']:.2f}, PSNR {last['val_psnr']:.2f} dB")
    for name, (where, fit) in (result.samplers or {}).items():
        out.print(f"  {name} sampler       {where}")
        print_fit(fit)
    return result


def _run_generate(cfg: GenerateConfig) -> None:
    from vaeforge.generate import run_generate
    from vaeforge.progress import GenerateDisplay

    display = GenerateDisplay(err)
    try:
        result = run_generate(cfg, display)
    finally:
        display.close()
    out.print(f"[bold green]done[/]: {result.output}")
    out.print(f"  shards     {result.shards} x {cfg.format} ({cfg.image_format}), _manifest.json, _SUCCESS")
    out.print(f"  images     {cfg.count:,} ({result.images:,} made now, {result.resumed_shards} shards kept)")
    out.print(f"  bytes      {result.bytes:,}")
    out.print(f"  speed      {result.images_per_s:,.1f} images/s ({result.seconds:.1f}s after Ray start-up)")
    if (spent := result.time_summary()) is not None:
        out.print(f"  actors     {spent}")


@app.command("fit-sampler")
def fit_sampler(
    checkpoint: str = typer.Option(..., help="Run directory (its best checkpoint) or checkpoint directory."),
    k: int = typer.Option(
        None, help="Mixture components (full covariance): in all, or per class (default 10 / 3)."
    ),
    per_class: bool = typer.Option(
        None,
        "--per-class/--pooled",
        help="One mixture per class, so a draw for class c lands where the encoder puts class c "
        "(default: per class when the training images are labeled).",
        show_default=False,
    ),
    seed: int = typer.Option(0, help="Seeds the initialisation and the subset; the fit is deterministic."),
    max_points: int = typer.Option(20_000, help="Training images encoded for the fit (a seeded subset)."),
    data: str = typer.Option(None, help="Images to fit on when the checkpoint has no run.json beside it."),
    sampler: str = typer.Option(
        "all", help="Which fit to make: gmm (the mixture), kde (the kernel density) or all."
    ),
) -> None:
    """Fit the latent samplers to where the encoder puts the training images, for `generate --sampler
    gmm|kde`: a Gaussian mixture, and a kernel density on every training latent."""
    from vaeforge.fit_sampler import KDE_MAX_POINTS, run_fit_sampler
    from vaeforge.sampling import FITTED

    if sampler not in (*FITTED, "all"):
        raise UserError(f"unknown --sampler {sampler!r}; choose {', '.join(FITTED)} or all")
    kinds = FITTED if sampler == "all" else (sampler,)
    what = {"gmm": f"up to {max_points:,} for the mixture", "kde": f"up to {KDE_MAX_POINTS:,} for the kde"}
    err.print(f"fit-sampler: encoding training images ({', '.join(what[k] for k in kinds)}) and fitting")
    fits = run_fit_sampler(checkpoint, k, seed, max_points, data, per_class, kinds)
    for where, fit in fits.values():
        out.print(f"[bold green]done[/]: {where}")
        print_fit(fit)


def print_fit(fit: Any) -> None:
    """What fit-sampler and the end of training say about a fitted sampler."""
    m = fit.meta
    if m.get("kind") == "kde":
        how = f"per class, {len(fit.class_ids())} classes" if fit.per_class else "pooled"
        h = m["bandwidth"]
        out.print(f"  kde on {m['points']:,} latents ({how}), bandwidth {h:g} ({m['bandwidth_selection']})")
        if m["heldout_loglik"]:
            ll = m["heldout_loglik"][f"{h:g}"]
            out.print(f"  held-out log-likelihood {ll:.2f} on {m['heldout_points']:,} latents")
        out.print(f"  sha256 {fit.sha256()[:16]}")
        return
    how = f"{len(fit.class_ids())} classes x up to {m['k_per_class']}" if fit.per_class else "pooled"
    out.print(f"  {m['k']} components ({how}) on {m['points']:,} latents, {m['iterations']} EM iterations")
    out.print(f"  mean log-likelihood {m['mean_loglik']:.2f}, sha256 {fit.sha256()[:16]}")


@app.command()
def evaluate(
    checkpoint: str = typer.Option(..., help="Run directory (its best checkpoint) or checkpoint directory."),
    data: str = typer.Option(None, help="Real held-out images to compare with (default: the run's split)."),
    samples: int = typer.Option(5000, help="Samples per sampler, and real images compared."),
    output: str = typer.Option(None, help="Where metrics.json and report.html go (default: RUN/eval)."),
    seed: int = typer.Option(0, help="Fixes the samples, subsets and classifiers."),
    max_train: int = typer.Option(10_000, help="Training images for nearest neighbours and classifiers."),
    usefulness: bool = typer.Option(
        True, "--usefulness/--no-usefulness", help="TSTR and augmentation (labeled data, conditional model)."
    ),
    classifier_steps: int = typer.Option(600, help="Training steps of each usefulness classifier."),
    usefulness_sampler: str = typer.Option(
        None,
        help="The sampler whose samples TSTR and augmentation use (default: the labeled one with the "
        "best FID).",
    ),
    temperature: float = typer.Option(
        1.0,
        help="Scales either sampler's spread, as `generate --temperature` does: measure what you generate.",
    ),
    inception_weights: str = typer.Option(
        None,
        metavar="PATH",
        help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth: also report standard FID (InceptionV3 "
        "pool3 at 299x299). Never downloaded. Slow without a GPU: the real images and every sampler's "
        "samples (15,000 images at the default --samples) took 0.4-1.4 s an image on a busy 2-core CPU.",
    ),
) -> None:
    """Score a checkpoint: held-out ELBO, FID/KID/precision/recall/density/coverage per sampler,
    memorisation, usefulness; writes metrics.json and a self-contained report.html."""
    from vaeforge.evaluate import run_evaluate

    cfg = EvaluateConfig(
        checkpoint=checkpoint,
        data=data,
        output=output,
        samples=samples,
        seed=seed,
        max_train=max_train,
        usefulness=usefulness,
        classifier_steps=classifier_steps,
        usefulness_sampler=usefulness_sampler,
        temperature=temperature,
        inception_weights=inception_weights,
    )
    result = run_evaluate(cfg, lambda msg: err.print(f"evaluate: {msg}", highlight=False))
    m = result.metrics
    out.print(f"[bold green]done[/]: {result.output / 'report.html'}  (+ metrics.json)")
    if "likelihood" in m:
        lk = m["likelihood"]
        out.print(f"  held-out -ELBO {lk['neg_elbo_nats']:.1f} nats ({lk['bits_per_dim']:.3f} bits/dim)")
    for name, sm in m["samplers"].items():
        d = sm["distribution"]
        inception = f"  Inception FID {sm['inception']['fid']:.2f}" if "inception" in sm else ""
        out.print(
            f"  {name:6s} FID {d['fid']:.2f}  precision {d['precision']:.3f}  recall {d['recall']:.3f}  "
            f"density {d['density']:.3f}  coverage {d['coverage']:.3f}{inception}"
        )
    use = m["usefulness"]
    if "tstr" in use:
        t, a = use["tstr"], use["augmentation"]
        out.print(
            f"  TSTR {t['tstr_accuracy']:.3f} vs real->real {t['real_accuracy']:.3f} "
            f"({use['sampler']} samples)"
        )
        real, synth, recon = t["real_accuracy"], t["tstr_accuracy"], t["recon_accuracy"]
        out.print(
            f"  trained on reconstructions {recon:.3f}: of the {real - synth:.3f} gap, the decoder "
            f"accounts for {real - recon:.3f} and the sampler for {recon - synth:.3f}"
        )
        out.print(
            f"  augmentation {a['subset_accuracy']:.3f} -> {a['augmented_accuracy']:.3f} ({a['gain']:+.3f})"
        )
    else:
        out.print(f"  usefulness not measured: {use['skipped']}")


@app.command()
def score(
    checkpoint: str = typer.Option(..., help="Run directory (its best checkpoint) or checkpoint directory."),
    data: str = typer.Option(
        ..., help="Images to score: a folder, WebDataset shards, Parquet or builtin, as `train --data` takes."
    ),
    output: str = typer.Option(
        "scores.parquet", help="Parquet file (local or a URI) for the scores; the grid goes beside it."
    ),
    top: int = typer.Option(16, help="Most anomalous images to print and to draw in OUTPUT-STEM_top.png."),
    batch_size: int = typer.Option(256, help="Images per forward pass."),
    seed: int = typer.Option(0, help="Fixes each image's posterior sample (with a hash of its pixels)."),
    max_samples: int = typer.Option(None, help="Score only the first N usable images."),
    cache_dir: str = typer.Option(None, help="Decoded-image cache (default: ~/.cache/vaeforge)."),
    recon_loss: str = typer.Option(
        None, help=f"Reconstruction term ({', '.join(RECON_LOSSES)}); default: the run's, else mse."
    ),
    label_check: bool = typer.Option(
        True,
        "--label-check/--no-label-check",
        help="Conditional models: score under every class too, to find mislabeled files (a pass per class).",
    ),
    gpus: bool = typer.Option(
        None, "--gpus/--no-gpus", help="Force GPU use on or off (default: if present)."
    ),
) -> None:
    """Score each image by its negative ELBO (most anomalous first): outliers and mislabeled files.

    Writes OUTPUT (Parquet: path, score, bits_per_dim, recon_mse, kl, outlier, label, class, rank, and
    best_label / label_margin / label_mismatch for conditional models) and OUTPUT-STEM_top.png, the top
    images each beside its reconstruction.
    """
    opts = dict(locals())  # exactly the parsed options
    opts["use_gpu"] = opts.pop("gpus")
    cfg = ScoreConfig(**opts)
    from vaeforge.score import run_score

    _print_scores(run_score(cfg, lambda msg: err.print(f"score: {msg}", highlight=False)), top)


def _print_scores(result: Any, top: int) -> None:
    """The top table, the threshold, the label check's findings and where everything went."""
    rows = result.table.slice(0, top).to_pylist()
    root = _common_dir(result.table["path"].to_pylist())
    if root:
        out.print(f"paths below {root}")  # its own line: soft-wrapped, so a long root stays whole
    out.print(
        _table(
            f"Most anomalous {len(rows)} of {result.table.num_rows:,} images",
            [">rank", ">-ELBO nats", ">recon MSE", "label", "path"],
            [
                [r["rank"], f"{r['score']:.1f}", f"{r['recon_mse']:.5f}", _label(r), _below(r["path"], root)]
                for r in rows
            ],
        )
    )
    out.print(
        f"median -ELBO {result.median:.1f} nats ({result.recon_loss}, beta 1); outlier threshold "
        f"median + 3 x 1.4826 MAD = {result.threshold:.1f}: {result.outliers:,} images above it"
    )
    if result.label_check:
        out.print(f"labels: {result.mismatches:,} images fit another class better (label_mismatch)")
        if result.mismatches > result.table.num_rows / 2:  # a model that ignores y flags (K-1)/K of them
            out.print(
                "  [yellow]most of them: the model hardly uses its labels, so this check says little[/]"
            )
        _print_mismatches(result.table, top, root)
    if result.skipped:
        out.print(
            "unreadable inputs, not scored: " + ", ".join(f"{n} {k}" for k, n in result.skipped.items())
        )
    out.print(
        f"[bold green]done[/]: {result.output}  (top images beside their reconstructions: {result.grid})"
    )


def _print_mismatches(scores: Any, top: int, root: str) -> None:
    """Images whose best class is not their label, the largest margin first."""
    import pyarrow.compute as pc

    by_margin = scores.filter(pc.field("label_mismatch")).sort_by([("label_margin", "descending")])
    rows = by_margin.slice(0, top).to_pylist()
    if rows:
        out.print(
            _table(
                "Largest label margins: -ELBO under the given label minus under the best one",
                [">rank", ">margin nats", "label", "best", "path"],
                [
                    [
                        r["rank"],
                        f"{r['label_margin']:.1f}",
                        _label(r),
                        _label(r, "best_"),
                        _below(r["path"], root),
                    ]
                    for r in rows
                ],
            )
        )


def _common_dir(paths: list[str]) -> str:
    """The directory all these absolute local paths share ("" otherwise): tables show paths below it, so
    the file names stay readable in a narrow terminal."""
    if not paths or not all(p.startswith("/") for p in paths):
        return ""  # URIs, builtin:N: shown whole
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    return "" if root == "/" else root


def _below(path: str, root: str) -> str:
    return path[len(root) + 1 :] if root else path


def _label(row: dict[str, Any], prefix: str = "") -> str:
    label = row[f"{prefix}label"]
    return "" if label is None else f"{label} {row[f'{prefix}class']}"


def _table(title: str, headers: list[str], rows: list[list[Any]]) -> Table:
    """A rich table; a header starting with '>' is right-aligned (numbers), the last column folds (paths)."""
    table = Table(title=title, title_justify="left")
    for h in headers[:-1]:
        table.add_column(h.lstrip(">"), justify="right" if h.startswith(">") else "left")
    table.add_column(headers[-1], overflow="fold")
    for row in rows:
        table.add_row(*(str(v) for v in row))
    return table


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


INTERRUPTED = "interrupted; finished checkpoints and shards are kept, re-run with --resume to continue"


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    try:
        code = app(args=argv, standalone_mode=False)
    except UserError as e:
        _fail(str(e), 2)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        _fail(
            f"disk full writing {e.filename or 'output'}; free space and re-run the same command to resume", 2
        )
    except KeyboardInterrupt:
        _interrupted()
    except TyperException as e:  # click's usage errors (unknown option, bad value) and Abort (Ctrl-C)
        if not hasattr(e, "format_message"):
            _interrupted()
        ctx = getattr(e, "ctx", None)
        hint = f" (see `vaeforge {ctx.command.name} --help`)" if ctx and ctx.parent else ""
        _fail(f"{e.format_message()}{hint}", getattr(e, "exit_code", 2))
    if code == 130:  # typer turns a KeyboardInterrupt into this return value when not standalone
        _interrupted()
    if isinstance(code, int) and code:
        sys.exit(code)


RAY_SHUTDOWN_S = 10.0  # what a Ctrl-C gives Ray to stop cleanly before the process exits regardless


def _interrupted() -> None:
    """Ctrl-C: say what was kept, then exit within seconds.

    Finished work is already on disk: a shard or checkpoint counts only once it is complete, and one cut
    off here is redone on --resume. When this process started its own Ray, the training or sampling thread
    may still be inside a Ray call, and interpreter exit (Ray's atexit shutdown, thread joins) can then wait
    on it: a loaded CI machine once sat past two minutes there. So Ray gets RAY_SHUTDOWN_S to stop (the
    local Ray's processes go with it) and then the process ends regardless.
    """
    from vaeforge import cluster

    err.print(f"[bold red]error:[/] {INTERRUPTED}", highlight=False, soft_wrap=True)
    if not cluster.connected_here():
        sys.exit(130)  # a caller's Ray (a notebook, the test session) is the caller's to stop
    sys.stdout.flush()
    sys.stderr.flush()
    cluster.shutdown_within(RAY_SHUTDOWN_S)
    os._exit(130)


def _fail(message: str, code: int) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(code)
