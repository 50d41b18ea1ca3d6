"""A self-contained report.html: a metrics table with one-line definitions and images as PNG data URIs.

No network, no scripts, no external files: the page opens the same in a browser, a CI artifact viewer or
an e-mail attachment.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vaeforge.grids import make_grid


@dataclass
class Figure:
    """One grid of (N, H, W, 3) uint8 tiles, `ncols` per row, with a caption under it."""

    images: np.ndarray
    ncols: int
    caption: str = ""


@dataclass
class Section:
    """A heading, a sentence on how to read it, and its figures (or only text when there are none)."""

    title: str
    description: str
    figures: list[Figure] = field(default_factory=list)
    anchor: str = ""  # id in the page; derived from the title when empty

    @property
    def id(self) -> str:
        return self.anchor or "".join(c if c.isalnum() else "-" for c in self.title.lower()).strip("-")


@dataclass
class Metric:
    """A row of the metrics table."""

    name: str
    value: float | int | str | None
    definition: str  # one line: what it measures and which way is better


_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; } td, th { padding: 4px 10px; border-bottom: 1px solid #eee; }
td.v { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
figure { display: inline-block; margin: 0.5em 1em 1em 0; vertical-align: top; }
figure img { image-rendering: pixelated; border: 1px solid #ccc; }
figcaption { color: #555; font-size: 0.9em; max-width: 40em; } .meta { color: #666; }
"""


def png_data_uri(images: np.ndarray, ncols: int) -> str:
    buf = io.BytesIO()
    make_grid(np.asarray(images, dtype=np.uint8), max(1, ncols)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _format(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return html.escape(f"{value:,}" if isinstance(value, int) else str(value))


def _figure(fig: Figure) -> str:
    if len(fig.images) == 0:
        return ""
    src = png_data_uri(fig.images, fig.ncols)
    cap = f"<figcaption>{html.escape(fig.caption)}</figcaption>" if fig.caption else ""
    return f'<figure><img src="{src}" alt="{html.escape(fig.caption)}">{cap}</figure>'


def render_report(title: str, meta: dict[str, Any], metrics: list[Metric], sections: list[Section]) -> str:
    """The whole page as one string; `meta` is shown as key/value lines under the title."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "".join(f"<div class='meta'>{html.escape(k)}: {html.escape(str(v))}</div>" for k, v in meta.items()),
        "<nav><p>"
        + " · ".join(f"<a href='#{s.id}'>{html.escape(s.title)}</a>" for s in sections)
        + "</p></nav>",
        "<h2 id='metrics'>Metrics</h2><table><tr><th>metric</th><th>value</th><th>definition</th></tr>",
        "".join(
            f"<tr><td>{html.escape(m.name)}</td><td class='v'>{_format(m.value)}</td>"
            f"<td>{html.escape(m.definition)}</td></tr>"
            for m in metrics
        ),
        "</table>",
    ]
    for s in sections:
        parts.append(f"<h2 id='{s.id}'>{html.escape(s.title)}</h2><p>{html.escape(s.description)}</p>")
        parts.extend(_figure(f) for f in s.figures)
    parts.append("</body></html>")
    return "\n".join(parts)
