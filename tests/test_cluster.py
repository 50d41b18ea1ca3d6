"""What a user sees when the commands run on a cluster: the dashboard URL, plain progress lines in logs
(`ray job logs`, CI) even where FORCE_COLOR makes rich call any stream a terminal, and a GPU plan that works
on a cluster whose GPU nodes are added on demand.
"""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

import vaeforge.generate as generate_mod
from vaeforge.cluster import init_ray
from vaeforge.config import GenerateConfig
from vaeforge.errors import UserError
from vaeforge.progress import GenerateDisplay, TrainDisplay, wants_live

# What a bar redrawn in place leaves in a log: carriage returns, cursor movement, erased lines.
REDRAW = re.compile(r"\r(?!\n)|\x1b\[\??[0-9;]*[ABCDKJlh]")
TRAIN_EVENTS = [
    {"kind": "ray", "address": "10.0.0.7:6379", "dashboard": "http://10.0.0.7:8265"},
    {"kind": "start", "epochs": 2, "steps_per_epoch": 7, "epoch": 1, "step": 0, "global_step": 0}
    | {"world": 4, "device": "cuda", "precision": "bf16"},
    {"kind": "step", "epoch": 1, "step": 3, "images_per_s": 812.5, "loss": 1523.25},
    {"kind": "epoch", "epoch": 1, "train_loss": 1500.0, "val_loss": 1400.0, "val_mse": 0.05}
    | {"val_psnr": 13.0, "train_images_per_s": 800.0},
]
GENERATE_EVENTS = [
    {"kind": "plan", "shards": 3, "count": 30, "done": 0, "images_done": 0, "output": "s3://b/shards"},
    {"kind": "ray", "address": "local", "dashboard": "http://127.0.0.1:8265"},
    {"kind": "workers", "n": 2, "device": "cpu", "precision": "fp32", "threads": 1},
    *[{"kind": "shard", "count": 10}] * 3,
]


def show(display_cls: type, events: list[dict]) -> str:
    display = display_cls(Console(file=io.StringIO(), width=100))
    assert not display.live
    for event in events:
        display(event)
    display.close()
    return display.console.file.getvalue()


@pytest.mark.parametrize("force_color", [None, "1"])
def test_train_progress_in_a_log_is_plain_lines(
    monkeypatch: pytest.MonkeyPatch, force_color: str | None
) -> None:
    monkeypatch.delenv("TTY_INTERACTIVE", raising=False)
    if force_color:  # rich now calls the StringIO a terminal: colours yes, a live bar no
        monkeypatch.setenv("FORCE_COLOR", force_color)
        assert Console(file=io.StringIO()).is_terminal
    else:
        monkeypatch.delenv("FORCE_COLOR", raising=False)
    text = show(TrainDisplay, TRAIN_EVENTS)
    assert not REDRAW.search(text), repr(text)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines()
    assert plain == [
        "ray: Ray at 10.0.0.7:6379, dashboard http://10.0.0.7:8265",
        "train: 4 worker(s) on cuda, bf16, 7 steps/epoch",
        "epoch 1/2 step 3/7 812.5 img/s loss 1523.25",
        "epoch 1/2: train loss 1500.00 | held-out ELBO loss 1400.00, MSE 0.0500, PSNR 13.00 dB | 800.0 img/s",
    ]


def test_generate_progress_in_a_log_is_plain_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TTY_INTERACTIVE", raising=False)
    monkeypatch.setenv("FORCE_COLOR", "1")
    text = show(GenerateDisplay, GENERATE_EVENTS)
    assert not REDRAW.search(text), repr(text)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
    assert "ray: local Ray, dashboard http://127.0.0.1:8265" in plain
    assert re.search(r"^shards 1/3, 10 images", plain, re.M)  # the first line is due at once
    assert re.search(r"^shards 3/3, 30 images", plain, re.M)  # and the last is always shown


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_real_terminal_gets_the_live_bar_and_tty_interactive_overrides(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("TTY_INTERACTIVE", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert wants_live(Console(file=_Tty()))
    assert not wants_live(Console(file=io.StringIO()))
    monkeypatch.setenv("TTY_INTERACTIVE", "0")
    assert not wants_live(Console(file=_Tty()))
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    assert wants_live(Console(file=io.StringIO()))


@pytest.mark.ray
def test_init_ray_reports_the_dashboard_of_a_ray_already_running(ray_session: None) -> None:
    """The session's Ray was started by the fixture, not by init_ray; its dashboard is still reported."""
    info = init_ray(None, 1.0)
    assert info["address"] == "local"
    assert re.fullmatch(r"http://[\d.]+:\d+", info["dashboard"] or ""), info


@pytest.mark.parametrize(
    ("joined", "workers", "expected"),
    [
        (True, 4, (4, {"num_gpus": 1, "num_cpus": 1}, 1)),
        (True, None, "no GPU; on a cluster that adds GPU nodes on demand, also pass --workers N"),
        (False, 4, "--gpus was given but the Ray cluster has no GPU"),
    ],
)
def test_gpu_actors_on_a_cluster_whose_gpu_nodes_come_on_demand(
    monkeypatch: pytest.MonkeyPatch, joined: bool, workers: int | None, expected: tuple | str
) -> None:
    """KubeRay's GPU group starts at zero replicas: pending GPU actors are what makes the autoscaler add
    nodes, so on a joined cluster `--gpus --workers N` must ask for N of them rather than refuse."""
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})  # a CPU head, no GPU node yet
    if joined:
        monkeypatch.setenv("RAY_ADDRESS", "10.0.0.7:6379")
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = GenerateConfig(checkpoint="run", output="out", count=10, use_gpu=True, workers=workers)
    if isinstance(expected, tuple):
        assert generate_mod._worker_plan(cfg) == expected
    else:
        with pytest.raises(UserError, match=re.escape(expected)):
            generate_mod._worker_plan(cfg)


PINNED_API_PROBE = """
import json, socket, ray
from vaeforge.cluster import init_ray

@ray.remote(num_cpus=0)
def api_server():  # how any Ray worker (Train's PlacementGroupCleaner among them) finds the state API
    from ray.dashboard.utils import get_address_for_submission_client
    return get_address_for_submission_client(None)

out = {}
for dashboard in (False, True):
    info = init_ray(None, 1.0, dashboard=dashboard)
    url = ray.get(api_server.remote())
    port = int(url.rsplit(":", 1)[1])
    with socket.socket() as s:
        served = s.connect_ex(("127.0.0.1", port)) == 0
    out[str(dashboard)] = {"url": url, "served": served, "dashboard": info["dashboard"]}
    ray.shutdown()
print(json.dumps(out))
"""


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_a_local_ray_finds_only_its_own_state_api_beside_another_ray(ray_session: None) -> None:
    """The session's Ray (with its dashboard) is the other Ray on this machine. A worker of a Ray that
    init_ray starts must still find its own API server, or an unserved one without a dashboard: never
    the other Ray's, whose "no such controller" makes Ray Train remove a live run's placement group."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    proc = subprocess.run(
        [sys.executable, "-c", PINNED_API_PROBE], capture_output=True, text=True, timeout=220, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["False"]["url"].startswith("http://127.0.0.1:") and not out["False"]["served"]
    assert out["True"]["served"] and out["True"]["dashboard"] == out["True"]["url"]
