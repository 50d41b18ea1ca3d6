"""Ray start-up shared by train and generate: join a cluster or start a local Ray sized for the job."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np


def joins_cluster(address: str | None) -> bool:
    """True when the job runs on an existing cluster (--address or RAY_ADDRESS), not a local Ray."""
    return bool(address or os.environ.get("RAY_ADDRESS"))


def init_ray(address: str | None, num_cpus_needed: float, dashboard: bool = True) -> dict[str, Any]:
    """Join `address` (or RAY_ADDRESS), else start a local Ray sized so the workers fit on this machine,
    with its dashboard unless `dashboard` is False (a cluster's own dashboard is the cluster's business)."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    # Worker logs stay in Ray's log files (and `ray job logs`); progress reaches us through a queue.
    quiet = {"logging_level": "ERROR", "log_to_driver": os.environ.get("VAEFORGE_RAY_LOGS") == "1"}
    with _sigint_deferred():
        context = _start(ray, address, num_cpus_needed, dashboard, quiet)
    url = getattr(context, "dashboard_url", None) if context is not None else _running_dashboard()
    url = f"http://{url}" if url and not url.startswith("http") else url
    return {
        "address": address or "local",
        "node_id": ray.get_runtime_context().get_node_id(),
        "dashboard": url,
    }


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C that lands while Ray starts until ray.init has returned, then raise it.

    A KeyboardInterrupt inside ray.init unwinds through Ray's C++ core mid-connect, which aborts the
    process ("terminate called without an active exception", exit -6) instead of exiting cleanly.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


_connected_here = False  # set once this process's own ray.init has run (not a caller's or a test's Ray)


def connected_here() -> bool:
    """True when init_ray itself connected this process to Ray, so its exit is ours to manage."""
    return _connected_here


def shutdown_within(seconds: float) -> bool:
    """ray.shutdown(), given at most `seconds`; False when it had not returned by then.

    After a Ctrl-C the training thread can still be inside trainer.fit, and Ray's own shutdown (which it
    also runs at interpreter exit) can then wait on that thread's calls for minutes on a loaded machine.
    """
    import ray

    done = threading.Event()

    def stop() -> None:
        with contextlib.suppress(Exception):
            ray.shutdown()
        done.set()

    threading.Thread(target=stop, name="vaeforge-ray-shutdown", daemon=True).start()
    return done.wait(seconds)


def _start(ray: Any, address: str | None, num_cpus_needed: float, dashboard: bool, quiet: dict) -> Any:
    global _connected_here
    context = None
    if not ray.is_initialized():
        _connected_here = True
        if address:
            context = ray.init(address=address, **quiet)
        else:
            cpus = max(os.cpu_count() or 1, int(np.ceil(num_cpus_needed)))
            port = free_port(DASHBOARD_PORT)
            # Ray Train's PlacementGroupCleaner asks the state API whether the train controller is alive,
            # and a Ray worker finds that API by guessing among the machine's Rays. With two local Rays
            # (a test session beside a run, two users' jobs) it can ask the other one's dashboard, which
            # knows no such controller, so the cleaner removes the live run's placement group and the
            # worker dies mid-epoch. Pinning every process of ours to our own API server (or, with no
            # dashboard, to a port nobody serves: the cleaner then just keeps waiting) rules that out.
            env = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port if dashboard else free_port()}"}
            context = ray.init(
                num_cpus=cpus,
                include_dashboard=dashboard,
                dashboard_port=port,
                runtime_env={"env_vars": env},
                **quiet,
            )
    return context


DASHBOARD_PORT = 8265  # Ray's default; the next free one when it is taken, as Ray itself does


def free_port(first: int = 0) -> int:
    """`first` or the next port up that is free on this machine; any free port when `first` is 0."""
    for port in range(first, first + 100) if first else [0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise OSError(f"no free port in {first}..{first + 99}")


def _running_dashboard() -> str | None:
    """The dashboard of the Ray this process had already joined (tests, notebooks, a caller's ray.init).

    ray.init returns the URL only to its caller, and Ray has no public getter for it afterwards, so this reads
    the node record that ray.init itself reports from. None when that is unavailable.
    """
    from ray._private import worker

    return getattr(getattr(worker, "_global_node", None), "webui_url", None) or None
