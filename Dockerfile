# The vaeforge image for KubeRay: head, GPU workers and the RayJob submitter all run it.
#
# Base: rayproject/ray at the Ray pinned in constraints.txt (tests/test_k8s.py checks they match), not
# python:3.11-slim plus Ray from the pins, because KubeRay's pods rely on what the Ray images ship: bash for
# the `ray start` command, wget for KubeRay's health probes, the `ray` user (uid 1000, group users) and its
# home /home/ray. The CPU variant is enough for GPU nodes: on PyPI, torch==2.13.0 for Linux is the CUDA
# build and brings its own CUDA libraries, so a node needs only the NVIDIA driver (the -gpu variant would
# add a second CUDA toolkit, gigabytes of it).
FROM rayproject/ray:2.60.0-py311

# KubeRay runs `ray start` in the WORKDIR, and a job's driver runs where `ray start` ran: the RayJobs'
# `python jobs/NAME.py` entrypoints resolve here.
WORKDIR /home/ray/vaeforge

# The dependencies first, from the package metadata alone (an empty package stands in for the code), so
# that a code or README change does not reinstall torch. Every install goes through the pins.
COPY --chown=ray:users pyproject.toml constraints.txt ./
RUN mkdir vaeforge && touch vaeforge/__init__.py README.md \
    && pip install --no-cache-dir -c constraints.txt . \
    && pip uninstall --yes vaeforge \
    && rm -rf vaeforge README.md build ./*.egg-info

# Then the package itself; its dependencies are in place already.
COPY --chown=ray:users README.md ./
COPY --chown=ray:users vaeforge ./vaeforge
RUN pip install --no-cache-dir --no-deps -c constraints.txt . && rm -rf build ./*.egg-info
COPY --chown=ray:users jobs ./jobs
