"""CLI tests: every user mistake is one `error:` line and exit code 2; model-summary; `python -m vaeforge`.

None of these reach Ray: each mistake is caught before training starts.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vaeforge.cli import main

ANSI = re.compile(r"\x1b\[[0-9;]*m")  # rich colours the output when FORCE_COLOR is set
TINY = ["--preset", "tiny", "--max-samples", "64", "--batch-size", "8", "--builtin-count", "64"]


def user_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI expecting a user error; returns the one `error:` line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    err = ANSI.sub("", captured.err)
    assert "Traceback" not in err + captured.out
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, err
    assert lines[-1] == errors[0]  # the error is the last thing said, on one line
    return errors[0]


def train_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["train", *TINY, "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "run"), *extra]


def test_missing_data_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = user_error(train_args(tmp_path, "--data", str(tmp_path / "nope")), capsys)
    assert "data path not found" in line and "nope" in line
    assert not (tmp_path / "run").exists()  # nothing is written before the data is known to be good


def test_empty_data_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    line = user_error(train_args(tmp_path, "--data", str(empty)), capsys)
    assert "no images found" in line


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--preset", "huge"], "unknown preset 'huge'; choose one of: seed64, tiny"),
        (["--workers", "0"], "--workers must be at least 1"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--precision", "fp16"], "--precision must be one of auto, bf16, fp32"),
        (["--recon-loss", "l1"], "--recon-loss must be one of mse, bce"),
        (["--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
        (["--no-such-option"], "No such option: --no-such-option"),
        (["--workers", "two"], "Invalid value for '--workers'"),
    ],
)
def test_bad_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], expected: str
) -> None:
    assert expected in user_error(train_args(tmp_path, *extra), capsys)


def test_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert "No such command" in user_error(["trian"], capsys)


def test_ctrl_c_is_one_line_and_exit_130(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # typer hands a KeyboardInterrupt back as the return value 130 when not standalone; it must still
    # end in the one line that says what was kept, not in a bare exit.
    def interrupted(cfg: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("vaeforge.cli._run_train", interrupted)
    with pytest.raises(SystemExit) as exc:
        main(train_args(tmp_path))
    assert exc.value.code == 130
    captured = capsys.readouterr()
    lines = [line for line in ANSI.sub("", captured.err).splitlines() if line.strip()]
    assert lines[-1] == (
        "error: interrupted; finished checkpoints and shards are kept, re-run with --resume to continue"
    )
    assert "Traceback" not in captured.err + captured.out


STUCK_RAY = """
import sys, threading, time
import ray
import vaeforge.cli as cli
import vaeforge.cluster as cluster

cluster._connected_here = True  # as if this process had started its own Ray
ray.shutdown = lambda: time.sleep(600)  # a Ray that will not stop
cli.RAY_SHUTDOWN_S = 1.0
# a thread still inside a blocking call, as the training thread is mid-fit: interpreter exit would wait on it
threading.Thread(target=time.sleep, args=(600,)).start()

def interrupted(cfg):
    raise KeyboardInterrupt

cli._run_train = interrupted
cli.main(sys.argv[1:])
"""


def test_ctrl_c_exits_even_when_ray_and_a_thread_will_not_stop(tmp_path: Path) -> None:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", STUCK_RAY, *train_args(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 130, done.stderr
    assert time.monotonic() - started < 60  # 600 s if either the shutdown or the thread were waited on
    lines = [line for line in ANSI.sub("", done.stderr).splitlines() if line.strip()]
    assert lines[-1].startswith("error: interrupted;"), done.stderr
    assert "Traceback" not in done.stderr


def test_output_holding_another_run_is_kept(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    previous = json.dumps({"config": {"epochs": 5}})
    (run / "run.json").write_text(previous)
    line = user_error(train_args(tmp_path), capsys)
    assert "holds another run" in line and "--resume" in line and "--overwrite" in line
    assert (run / "run.json").read_text() == previous  # nothing already written is lost


def test_output_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "run").write_text("a file")
    assert "is a file" in user_error(train_args(tmp_path), capsys)


def test_resume_with_nothing_to_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "run").mkdir()
    assert "nothing to resume" in user_error(train_args(tmp_path, "--resume"), capsys)


@pytest.mark.parametrize("run_json", [None, "{not json", "{}", '{"config": {"model": {"enc_filters": 3}}}'])
def test_resume_with_a_missing_or_damaged_run_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], run_json: str | None
) -> None:
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)  # e.g. only checkpoints/ was copied over
    if run_json is not None:
        (tmp_path / "run" / "run.json").write_text(run_json)
    line = user_error(train_args(tmp_path, "--resume"), capsys)
    assert "run.json is missing or damaged" in line and "--overwrite" in line


def test_resume_with_a_different_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"config": {"model": {"latent_dim": 512}}}))
    assert "different model config" in user_error(train_args(tmp_path, "--resume"), capsys)


def test_model_summary_seed64(capsys: pytest.CaptureFixture[str]) -> None:
    main(["model-summary"])
    out = ANSI.sub("", capsys.readouterr().out)
    assert out.count("Total params:") == 2
    for figure in ("Total params: 13,802,688", "Total params: 13,283,023"):
        assert figure in out
    for figure in ("Non-trainable params: 4,032", "Non-trainable params: 3,014"):
        assert figure in out
    assert "Trainable params: 13,798,656" in out and "Trainable params: 13,280,009" in out


def test_model_summary_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    main(["model-summary", "--preset", "tiny"])
    out = ANSI.sub("", capsys.readouterr().out)
    assert out.count("Total params:") == 2 and 'Model: "encoder" (preset tiny)' in out


def test_model_summary_unknown_preset(capsys: pytest.CaptureFixture[str]) -> None:
    assert "unknown preset" in user_error(["model-summary", "--preset", "huge"], capsys)


def run_module(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "FORCE_COLOR"}
    return subprocess.run(
        [sys.executable, "-m", "vaeforge", *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_python_dash_m_help() -> None:
    done = run_module("--help")
    assert done.returncode == 0, done.stderr
    assert "train" in done.stdout and "model-summary" in done.stdout


def test_python_dash_m_user_error() -> None:
    done = run_module("train", "--workers", "0")
    assert done.returncode == 2
    assert done.stderr.strip() == "error: --workers must be at least 1, got 0"
    assert done.stdout == ""
