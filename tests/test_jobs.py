"""jobs/: the entry points hand their arguments to the CLI and nothing else, the job specs are
JobSubmissionClient.submit_job arguments whose entrypoints parse with the real CLI, and a job submitted with
`ray job submit --working-dir .` runs on an existing cluster, logging plain lines with the dashboard URL.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from entrypoints import REPO, parse_entrypoint
from typer import TyperException

from vaeforge import cli
from vaeforge.errors import UserError

JOBS = ("train", "generate", "pipeline")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# Cursor movement, line erasing and hidden cursors: what a redrawn bar leaves in a log. Colours are fine.
REDRAW = re.compile(r"\r(?!\n)|\x1b\[\??[0-9;]*[ABCDKJlh]")
# 64 built-in images -> 61 train / 3 held out -> 7 steps of 8: a few seconds per epoch.
TINY = ["--preset", "tiny", "--max-samples", "64", "--batch-size", "8", "--builtin-count", "64"]
TINY_GEN = ["--count", "25", "--shard-size", "10", "--precision", "fp32", "--gen-workers", "1"]


# ------------------------------------------------------------------------------------- without Ray


@pytest.mark.parametrize("name", JOBS)
def test_job_script_help_prints_the_command_options(name: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    done = subprocess.run(
        [sys.executable, f"jobs/{name}.py", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert f"{name} [OPTIONS]" in done.stdout  # the script runs the command it is named after
    expected = {"train": "--epochs", "generate": "--checkpoint", "pipeline": "--gen-workers"}[name]
    assert expected in done.stdout and "--address" in done.stdout


def test_job_script_passes_the_exit_code_on() -> None:
    done = subprocess.run(
        [sys.executable, "jobs/train.py", "--workers", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "error: --workers must be at least 1" in done.stderr


def test_job_scripts_hold_no_logic() -> None:
    """Each entry point is a docstring, two imports and `sys.exit(main(["NAME", *sys.argv[1:]]))`."""
    for name in JOBS:
        tree = ast.parse((REPO / "jobs" / f"{name}.py").read_text())
        docstring, *imports, guard = tree.body
        assert isinstance(docstring, ast.Expr) and all(
            isinstance(i, ast.Import | ast.ImportFrom) for i in imports
        )
        assert isinstance(guard, ast.If) and ast.unparse(guard.test) == "__name__ == '__main__'"
        assert [ast.unparse(s) for s in guard.body] == [f"sys.exit(main(['{name}', *sys.argv[1:]]))"]


@pytest.mark.parametrize("name", JOBS)
def test_job_spec_is_submit_job_kwargs_with_a_parsing_entrypoint(name: str) -> None:
    import inspect

    from ray.job_submission import JobSubmissionClient

    spec = yaml.safe_load((REPO / "jobs" / f"{name}.yaml").read_text())
    accepted = set(inspect.signature(JobSubmissionClient.submit_job).parameters) - {"self"}
    assert set(spec) <= accepted, set(spec) - accepted
    command, configs = parse_entrypoint(spec["entrypoint"])
    assert command == name
    configs = configs if isinstance(configs, tuple) else (configs,)
    for cfg in configs:
        # Ray runs the driver in a temporary copy of the working dir: relative outputs would vanish.
        for path in (cfg.output, getattr(cfg, "data", None), getattr(cfg, "checkpoint", None)):
            assert path is None or path.startswith(("/", "s3://")), path
    assert spec["runtime_env"]["working_dir"] == "."


@pytest.mark.parametrize(
    ("entrypoint", "error", "message"),
    [
        ("python jobs/train.py --no-such-option 1", TyperException, "No such option: --no-such-option"),
        ("python jobs/train.py --workers two", TyperException, "valid integer"),
        ("python jobs/generate.py --checkpoint run", UserError, "--count is required"),
        (
            "python jobs/generate.py --checkpoint run --count 10 --format tarball",
            UserError,
            "unknown --format",
        ),
        ("python jobs/pipeline.py --count 10 --workers 4 --batch-size 2", UserError, "below --workers"),
        ("python jobs/evaluate.py --checkpoint run", ValueError, "not a script in jobs/"),
        ("vaeforge train", ValueError, "python jobs/NAME.py"),
    ],
)
def test_a_wrong_entrypoint_fails_to_parse(entrypoint: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        parse_entrypoint(entrypoint)


# -------------------------------------------------------------------------------------------- with Ray


@pytest.fixture
def own_cluster() -> Iterator[tuple[str, dict[str, str]]]:
    """A Ray cluster started the way KubeRay starts a head (`ray start --head`): (dashboard URL, its env).

    Not the session's Ray: `ray job submit` reaches the cluster's dashboard agent, whose port defaults to
    52365 machine-wide and cannot be chosen through ray.init; on a shared machine where another Ray holds
    it, the session's job submissions were seen landing on that other Ray. Here every port is a free one.
    On teardown only this cluster's processes are killed, by pid (never `ray stop`).
    """
    ray_tmp = tempfile.mkdtemp(prefix="vfj", dir="/tmp")  # short: Ray's socket paths live under it
    venv_bin = str(Path(sys.executable).parent)  # so that the job's `python` is this interpreter
    env = {
        **os.environ,
        "RAY_TMPDIR": ray_tmp,
        "RAY_AUTH_MODE": "disabled",
        "PATH": f"{venv_bin}:{os.environ['PATH']}",
    }
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard, agent, client = _free_ports(4)
    start = [f"{venv_bin}/ray", "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}"]
    start += [f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}", "--num-cpus=4"]
    start += ["--include-dashboard=true", "--disable-usage-stats"]
    try:
        subprocess.run(start, env=env, cwd=ray_tmp, check=True, capture_output=True, timeout=180)
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        _kill_processes_with_env(f"RAY_TMPDIR={ray_tmp}")
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_ray_job_submit_runs_the_pipeline_on_an_existing_cluster(
    tmp_path: Path, own_cluster: tuple[str, dict[str, str]]
) -> None:
    """`ray job submit --working-dir . -- python jobs/pipeline.py ...`: the driver joins the cluster through
    the RAY_ADDRESS Ray sets, and `ray job logs` shows the dashboard URL for both stages and plain progress
    lines, even with FORCE_COLOR set (colours may stay; bars redrawn in place may not)."""
    dashboard, env = own_cluster
    ray_cli = str(Path(sys.executable).parent / "ray")
    job_id = f"vaeforge-test-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "run"  # absolute: the driver runs in Ray's copy of the working dir
    entrypoint = ["python", "jobs/pipeline.py", *TINY, *TINY_GEN, "--epochs", "1", "--output", str(out)]
    entrypoint += ["--cache-dir", str(tmp_path / "cache"), "--cpus-per-worker", "1"]
    runtime_env = json.dumps({"env_vars": {"FORCE_COLOR": "1"}})
    submit = [ray_cli, "job", "submit", "--address", dashboard, "--submission-id", job_id]
    submit += ["--working-dir", ".", "--runtime-env-json", runtime_env, "--", *entrypoint]
    done = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True, timeout=360)
    assert done.returncode == 0 and "succeeded" in done.stdout + done.stderr, done.stdout + done.stderr

    logs = subprocess.run(
        [ray_cli, "job", "logs", "--address", dashboard, job_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert ANSI.search(logs), "FORCE_COLOR did not reach the driver: this test would prove nothing"
    assert not REDRAW.search(logs), repr(logs[:2000])
    plain = ANSI.sub("", logs)
    assert len(re.findall(r"^ray: Ray at \S+, dashboard http://\S+:\d+$", plain, re.M)) == 2, plain
    assert re.search(r"^epoch 1/1: train loss", plain, re.M) and "shards 3/3, 25 images" in plain, plain
    assert (out / cli.SHARDS_DIR / "_SUCCESS").is_file()


def _free_ports(n: int) -> list[int]:
    with contextlib.ExitStack() as stack:  # held together, so the n ports differ
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _kill_processes_with_env(marker: str) -> None:
    """SIGKILL every live process whose environment holds `marker` (all of one Ray's processes inherit it)."""
    for _ in range(3):  # a process may start while the first sweep runs
        for pid in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError):
                if marker.encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    os.kill(int(pid), signal.SIGKILL)
        time.sleep(1)
