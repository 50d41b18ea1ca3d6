"""Test helper: find and end the processes of a Ray that a `python -m vaeforge` subprocess started on its own.

Every process of that Ray inherits its RAY_TMPDIR, so they are found by environment and ended by pid:
never with `ray stop`, which would stop the shared test Ray and any user's Ray too. The `own_ray_env`
fixture (conftest.py) gives such a subprocess its environment and cleans up after it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def ray_processes(ray_tmp: str) -> list[int]:
    """Live pids of the Ray started with RAY_TMPDIR=ray_tmp: all its processes inherit that environment."""
    marker = f"RAY_TMPDIR={ray_tmp}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z" and marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.append(int(pid))
        except (OSError, IndexError):  # gone meanwhile, or not ours to read
            continue
    return found


def kill_ray(ray_tmp: str) -> list[int]:
    """SIGKILL what is left of that Ray, by pid, and wait until it is gone; returns the pids it found."""
    stray = ray_processes(ray_tmp)
    for pid in stray:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while ray_processes(ray_tmp) and time.monotonic() < deadline:
        time.sleep(0.1)
    return stray
