"""`vaeforge pipeline`: train, then generate from the trained run. Its options are train's and generate's,
both configs are checked before training, and a tiny run end to end yields shards that webdataset reads back;
re-running with --resume keeps both stages' work. Train and generate print the dashboard URL.

Ray tests use the session's shared Ray (the `ray_session` fixture).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import typer

from vaeforge import cli
from vaeforge.checkpoint import list_checkpoints, resolve_checkpoint
from vaeforge.config import GenerateConfig, TrainConfig

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# 64 built-in images -> 61 train / 3 held out -> 7 steps of 8: a few seconds per epoch.
TINY = ["--preset", "tiny", "--max-samples", "64", "--batch-size", "8", "--builtin-count", "64"]
TINY_GEN = ["--count", "25", "--shard-size", "10", "--precision", "fp32", "--gen-workers", "1"]
DASHBOARD_LINE = r"^ray: local Ray, dashboard http://\S+:\d+$"


def test_pipeline_takes_every_train_and_generate_option() -> None:
    """Its options come from train's and generate's signatures; a new option there appears here too."""
    names = set(inspect.signature(cli.pipeline).parameters)
    train_names = set(inspect.signature(cli.train).parameters)
    gen_names = {cli.PIPELINE_RENAMED.get(n, n) for n in inspect.signature(cli.generate).parameters}
    assert names == train_names | (gen_names - set(cli.PIPELINE_DERIVED))
    train_cfg, gen_cfg = cli.pipeline_configs(
        {**_defaults(), "output": "s3://bucket/run", "workers": 4, "gen_workers": 2, "count": "1e3"}
    )
    assert isinstance(train_cfg, TrainConfig) and isinstance(gen_cfg, GenerateConfig)
    assert train_cfg.output == "s3://bucket/run/train" and train_cfg.workers == 4
    assert gen_cfg.checkpoint == "s3://bucket/run/train" and gen_cfg.output == "s3://bucket/run/shards"
    assert gen_cfg.workers == 2 and gen_cfg.count == 1000 and gen_cfg.batch_size == 256


def _defaults() -> dict:
    group = typer.main.get_command(cli.app)
    with typer.Context(group) as parent:
        ctx = group.get_command(parent, "pipeline").make_context("pipeline", ["--count", "1"], parent=parent)
    return dict(ctx.params)


def test_pipeline_checks_generate_options_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["pipeline", *TINY, "--count", "10", "--format", "tarball", "--output", str(tmp_path / "p")])
    assert exc.value.code == 2
    assert "unknown --format 'tarball'" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()  # nothing trained, nothing written
    with pytest.raises(SystemExit) as exc:
        cli.main(["pipeline", *TINY, "--count", "10", "--sampler", "gmm", "--no-fit-sampler",
                  "--output", str(tmp_path / "p")])  # fmt: skip
    assert exc.value.code == 2 and "drop --no-fit-sampler" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def run_cli(argv: list[str]) -> tuple[str, str]:
    """`vaeforge ...` in this process (the session's Ray is reused): (stdout, stderr); fails on any exit."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main(argv)
    except SystemExit as e:  # main() exits only on errors
        pytest.fail(f"vaeforge {argv[0]} exited with {e.code}: {err.getvalue()}")
    return ANSI.sub("", out.getvalue()), ANSI.sub("", err.getvalue())


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory, ray_session: None) -> tuple[Path, str, str]:
    root = tmp_path_factory.mktemp("pipeline") / "run"
    cache = tmp_path_factory.mktemp("cache")
    argv = ["pipeline", *TINY, *TINY_GEN, "--epochs", "1", "--cache-dir", str(cache), "--output", str(root)]
    return (root, *run_cli(argv))


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_pipeline_trains_then_generates_from_the_run(pipeline_run: tuple[Path, str, str]) -> None:
    import webdataset as wds

    root, out, err = pipeline_run
    run, shards = root / cli.TRAIN_DIR, root / cli.SHARDS_DIR
    assert json.loads((run / "run.json").read_text())["config"]["epochs"] == 1
    assert len(list_checkpoints(run)) == 1
    manifest = json.loads((shards / "_manifest.json").read_text())
    assert (shards / "_SUCCESS").is_file() and manifest["count"] == 25 and len(manifest["shards"]) == 3
    assert manifest["checkpoint"] == str(resolve_checkpoint(run, "best"))  # generated from this run
    samples = list(
        wds.WebDataset(str(shards / "samples-{000000..000002}.tar"), shardshuffle=False).decode("rgb8")
    )
    assert len(samples) == 25
    assert all(s["png"].shape == (64, 64, 3) and s["png"].dtype == np.uint8 for s in samples)
    assert f"done: run in {run}" in out and f"done: {shards}" in out


@pytest.mark.ray
def test_pipeline_prints_the_dashboard_for_both_stages(pipeline_run: tuple[Path, str, str]) -> None:
    _, _, err = pipeline_run
    assert len(re.findall(DASHBOARD_LINE, err, re.M)) == 2, err


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_train_and_generate_print_the_dashboard(pipeline_run: tuple[Path, str, str], tmp_path: Path) -> None:
    root, _, _ = pipeline_run
    run = shutil.copytree(root / cli.TRAIN_DIR, tmp_path / "train")  # resumed below; the fixture stays as is
    _, err = run_cli(["generate", "--checkpoint", str(run), "--count", "5", "--output", str(tmp_path / "g")])
    assert re.search(DASHBOARD_LINE, err, re.M), err
    # Training already reached --epochs, so --resume only starts Ray and stops again.
    _, err = run_cli(["train", *TINY, "--epochs", "1", "--resume", "--output", str(run)])
    assert re.search(DASHBOARD_LINE, err, re.M), err


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_pipeline_rerun_with_resume_keeps_training_and_shards(
    pipeline_run: tuple[Path, str, str], tmp_path: Path
) -> None:
    root, _, _ = pipeline_run
    copy = shutil.copytree(root, tmp_path / "run")
    before = {p.name for p in list_checkpoints(copy / cli.TRAIN_DIR)}
    out, err = run_cli(["pipeline", *TINY, *TINY_GEN, "--epochs", "1", "--resume", "--output", str(copy)])
    assert "resuming at epoch 2 step 0" in err  # nothing left to train
    assert {p.name for p in list_checkpoints(copy / cli.TRAIN_DIR)} == before
    assert "(0 made now, 3 shards kept)" in out
