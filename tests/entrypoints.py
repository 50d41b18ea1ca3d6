"""Test helper: parse a job entrypoint (`python jobs/NAME.py ARGS`) with the real CLI, without running it.

Used by test_jobs.py (jobs/*.yaml) and test_k8s.py (the RayJobs' entrypoints), so that neither can drift
from the options the code accepts.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import typer

from vaeforge import cli

REPO = Path(__file__).resolve().parents[1]
# How each command's parsed options become its config objects: the CLI's own builders.
BUILDERS = {"train": cli.train_config, "generate": cli.generate_config, "pipeline": cli.pipeline_configs}


def parse_entrypoint(entrypoint: str) -> tuple[str, Any]:
    """(command, config objects) for `python jobs/NAME.py ARGS`; raises what the CLI would have raised.

    ARGS go through Typer's (vendored) click exactly as on the command line, so an unknown option or a bad
    type raises a TyperException; then through the config builder, so a bad value such as an unknown
    --format raises UserError. Nothing runs.
    """
    argv = shlex.split(entrypoint)
    if len(argv) < 2 or argv[0] != "python":
        raise ValueError(f"entrypoint must be `python jobs/NAME.py ARGS`, got {entrypoint!r}")
    script = Path(argv[1])
    if script.parent != Path("jobs") or not (REPO / script).is_file():
        raise ValueError(f"{script} is not a script in jobs/")
    name = script.stem
    group = typer.main.get_command(cli.app)
    with typer.Context(group) as parent:
        command = group.get_command(parent, name)
        if command is None:
            raise ValueError(f"jobs/{name}.py has no `vaeforge {name}` command")
        ctx = command.make_context(name, argv[2:], parent=parent, resilient_parsing=False)
    return name, BUILDERS[name](dict(ctx.params))
