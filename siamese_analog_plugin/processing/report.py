"""The HTML report of a search: what the paper's figures show, in one self-contained page.

The distribution of dissimilarity over the area with its quartiles, then the best analog
sites with their lon/lat and a thumbnail of each cell beside its Mars reference. Pictures are
PNGs embedded as base64, so the file can be mailed or opened anywhere. No ``qgis`` import.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

import numpy as np

__all__ = ["write_report", "report_html"]

THUMB = 96


def _png(array: np.ndarray) -> str:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import image

    buf = io.BytesIO()
    image.imsave(buf, np.clip(array, 0, 1), cmap="gray", vmin=0.0, vmax=1.0, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _histogram_png(values: np.ndarray, quartiles: np.ndarray) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.0), dpi=100)
    try:
        ax.hist(values, bins=min(50, max(5, values.size // 4)), color="#4575b4")
        for q, style, label in zip(quartiles, (":", "-", ":"), ("Q1", "median", "Q3")):
            ax.axvline(q, color="#d73027", ls=style, lw=1.4, label=f"{label} {q:.3g}")
        ax.set_xlabel("dissimilarity (low = more Mars-like)")
        ax.set_ylabel("cells")
        ax.legend(fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def report_html(result, raster: str, top: int = 10, title: str = "Mars analog sites",
                raster_label: str | None = None, warnings: list[str] = ()) -> str:
    """The report page as a string (see :func:`write_report`); ``warnings`` are shown at the top."""
    from ..engine.imagery import GreyReader

    values = result.dissimilarity[result.scored]
    esc = html.escape
    parts = [f"<html><head><meta charset='utf-8'><title>{esc(title)}</title>",
             "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#eee}"
             "img{image-rendering:pixelated}</style></head><body>",
             f"<h2>{esc(title)}</h2>"]
    grid = result.grid
    facts = [
        ("Imagery", raster_label or raster),
        ("Mars reference(s)", ", ".join(Path(r.path).name for r in result.references)),
        ("Cells", f"{len(grid):,} of {grid.cell_size_m:g} m (stride {grid.stride_m:g} m); "
                  f"{int(result.scored.sum()):,} scored"),
        ("Device", f"{result.device}; {result.seconds:.1f} s, {result.cells_per_s:,.0f} cells/s"),
        ("Model", result.model_path or "in memory"),
    ]
    parts.append("<table>" + "".join(f"<tr><th style='text-align:left'>{esc(k)}</th>"
                                     f"<td style='text-align:left'>{esc(str(v))}</td></tr>" for k, v in facts)
                 + "</table>")
    for warning in warnings:
        parts.append(f"<p style='color:#a00'><b>Warning:</b> {esc(warning)}</p>")
    parts.append("<h3>Dissimilarity over the area</h3><p>Lower is more Mars-like. Red lines: quartiles.</p>")
    if values.size:
        q = np.percentile(values, [25, 50, 75])
        parts.append(f"<img alt='histogram' src='data:image/png;base64,{_histogram_png(values, q)}'/>")
        stats = [("minimum", values.min()), ("Q1 (25 %)", q[0]), ("median", q[1]), ("Q3 (75 %)", q[2]),
                 ("maximum", values.max()), ("mean", values.mean())]
        parts.append("<table><tr>" + "".join(f"<th>{esc(n)}</th>" for n, _ in stats) + "</tr><tr>"
                     + "".join(f"<td>{v:.4f}</td>" for _, v in stats) + "</tr></table>")
    best = result.best(top)
    parts.append(f"<h3>Best {len(best)} analog sites</h3>"
                 "<p>Each cell as the encoder sees it (grey), beside the Mars reference it is closest to. "
                 "Lon/lat: cell centre, degrees, in the imagery's geographic CRS.</p>")
    parts.append("<table><tr><th>rank</th><th>cell id</th><th>dissimilarity</th><th>percentile (%)</th>"
                 "<th>lon</th><th>lat</th><th>cell</th><th>reference</th></tr>")
    ref_png = {i: _png(r.patch) for i, r in enumerate(result.references)}
    with GreyReader(raster) as reader:
        for site in best:
            i = site["id"] - 1
            patch, _ = reader.read_bounds(grid.bounds(i), THUMB)
            ref = int(result.nearest_reference[i])
            parts.append(
                f"<tr><td>{site['rank']}</td><td>{site['id']}</td><td>{site['dissimilarity']:.4f}</td>"
                f"<td>{site['percentile']:.1f} %</td><td>{site['lon']:.5f}</td><td>{site['lat']:.5f}</td>"
                f"<td><img width='{THUMB}' height='{THUMB}' alt='cell {site['id']}' "
                f"src='data:image/png;base64,{_png(patch)}'/></td>"
                f"<td><img width='{THUMB}' height='{THUMB}' alt='{esc(site['reference'])}' "
                f"src='data:image/png;base64,{ref_png[max(ref, 0)]}'/><br/><small>{esc(site['reference'])}</small>"
                "</td></tr>")
    parts.append("</table></body></html>")
    return "\n".join(parts)


def write_report(path: str | os.PathLike, result, raster: str, top: int = 10, raster_label: str | None = None,
                 warnings: list[str] = ()) -> str:
    """Write the HTML report atomically (temporary name, then rename). Returns the path."""
    from ..engine.outputs import atomic_outputs

    text = report_html(result, raster, top=top, raster_label=raster_label, warnings=warnings)
    with atomic_outputs({"report": path}) as tmp:
        Path(tmp["report"]).write_text(text, encoding="utf-8")
    return str(path)
