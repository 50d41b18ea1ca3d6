"""report.html is self-contained and holds what it is given; latent pictures have the right shapes."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import torch
from PIL import Image

from vaeforge.config import get_preset
from vaeforge.explore import (
    active_dimensions,
    apply_attribute,
    attribute_vectors,
    interpolations,
    traversals,
)
from vaeforge.model import VAE
from vaeforge.report import Figure, Metric, Section, render_report


def test_report_embeds_every_figure_and_metric() -> None:
    tiles = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    page = render_report(
        "evaluation <run>",
        {"checkpoint": "runs/x"},
        [Metric("FID", 12.3456, "lower is better"), Metric("TSTR", None, "n/a without labels")],
        [
            Section("Samples", "prior draws", [Figure(tiles, 3, "prior")]),
            Section("Nearest neighbours", "pairs", [Figure(tiles[:2], 2, "closest")]),
            Section("Empty", "nothing to show"),
        ],
    )
    assert "evaluation &lt;run&gt;" in page  # escaped
    assert "12.35" in page and "n/a" in page
    assert "http" not in page and "<script" not in page  # opens offline
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(uris) == 2
    grid = Image.open(io.BytesIO(base64.b64decode(uris[0])))
    assert grid.size == (3 * 10 + 2, 2 * 10 + 2)  # 3 columns x 2 rows of 8 px tiles, 2 px padding
    for anchor in ("samples", "nearest-neighbours", "empty", "metrics"):
        assert f"id='{anchor}'" in page


def test_latent_pictures_shapes_and_attribute_vectors() -> None:
    torch.manual_seed(0)
    model = VAE(get_preset("tiny")).eval()
    d = model.config.latent_dim
    rng = np.random.default_rng(0)
    za, zb = rng.standard_normal((2, d), dtype=np.float32), rng.standard_normal((2, d), dtype=np.float32)
    row = interpolations(model, za, zb, steps=5)
    assert row.shape == (10, 64, 64, 3) and row.dtype == np.uint8
    scale = np.full(d, 0.01, dtype=np.float32)
    scale[[3, 7, 9]] = [1.0, 3.0, 2.0]
    means = rng.standard_normal((50, d)).astype(np.float32) * scale
    dims, active = active_dimensions(means, 3)
    assert list(dims) == [7, 9, 3] and active == 3  # the widest-spread dims first; the rest are inactive
    assert traversals(model, means[0], dims, means, steps=4).shape == (12, 64, 64, 3)
    labels = np.array([0] * 25 + [1] * 24 + [-1])
    means[:25] += 5.0
    vec = attribute_vectors(means, labels, 3)
    assert vec.shape == (3, d) and not vec[2].any()  # class 2 has no images
    np.testing.assert_allclose(
        vec[0] - vec[1], means[:25].mean(0) - means[25:49].mean(0), rtol=1e-4, atol=1e-4
    )
    assert apply_attribute(model, means[:2], vec[0], (0.0, 1.0)).shape == (4, 64, 64, 3)
