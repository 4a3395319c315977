"""Pictures of a search: the dissimilarity map over the imagery, the reference, the histogram.

Matplotlib (Agg, no display) is imported only when a picture is asked for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import OutputError
from .imagery import GreyReader

__all__ = ["ANALOG_CMAP", "render_search_png"]

# Low dissimilarity (Mars-like) is hot red, high is cool blue, as in the paper's maps.
ANALOG_CMAP = "RdYlBu"


def _backdrop(raster: str, grid, max_side: int = 900):
    """The imagery under the grid's extent, grey, at most ``max_side`` pixels a side."""
    x0 = grid.origin_x
    y1 = grid.origin_y
    x1 = x0 + (grid.n_cols - 1) * grid.step_x + grid.cell_w
    y0 = y1 - (grid.n_rows - 1) * grid.step_y - grid.cell_h
    with GreyReader(raster) as r:
        from rasterio.windows import from_bounds

        win = from_bounds(x0, y0, x1, y1, transform=r.ds.transform)
        aspect = win.height / max(win.width, 1e-9)
        w = int(min(max_side, max(win.width, 1)))
        h = max(1, int(round(w * aspect)))
        if h > max_side:
            h, w = max_side, max(1, int(round(max_side / aspect)))
        # read_window gives a square patch; read a rectangle through the same stretch instead.
        grey, ok = r._read_raw(win, (h, w))
        img = np.clip((grey - r.lo) / (r.hi - r.lo), 0, 1)
        if ok is not None:
            img = np.where(ok, img, np.nan)
    return img, (x0, x1, y0, y1)


def render_search_png(result, raster: str, path: str | Path, title: str | None = None, top: int = 5) -> str:
    """Write a PNG: imagery with the dissimilarity overlay and best sites, the reference(s),
    and the distribution of dissimilarity with its quartiles.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = result.grid
    values = np.full((grid.n_rows, grid.n_cols), np.nan, dtype=np.float32)
    ok = result.scored
    values[grid.rows[ok], grid.cols[ok]] = result.dissimilarity[ok]
    img, (x0, x1, y0, y1) = _backdrop(raster, grid)
    t = grid.output_transform
    extent = (t.c, t.c + t.a * grid.n_cols, t.f + t.e * grid.n_rows, t.f)

    fig = plt.figure(figsize=(13, 7.2), dpi=110)
    gs = fig.add_gridspec(2, 2, width_ratios=[3.2, 1], height_ratios=[1, 1], wspace=0.42, hspace=0.35)
    ax = fig.add_subplot(gs[:, 0])
    ax.imshow(img, cmap="gray", extent=(x0, x1, y0, y1), interpolation="bilinear")
    finite = result.dissimilarity[ok]
    vmin, vmax = (np.percentile(finite, [2, 98]) if finite.size else (0, 1))
    im = ax.imshow(values, cmap=ANALOG_CMAP, alpha=0.55, extent=extent, vmin=vmin, vmax=vmax, interpolation="nearest")
    cx, cy = grid.centres()
    for site in result.best(top):
        i = site["id"] - 1
        ax.plot(cx[i], cy[i], "o", ms=14, mfc="none", mec="black", mew=2)
        ax.annotate(str(site["rank"]), (cx[i], cy[i]), color="black", weight="bold", ha="center", va="center",
                    fontsize=8)
    bar = fig.colorbar(im, ax=ax, fraction=0.035, pad=0.02)
    by_example = result.extra.get("query") == "example"
    bar.set_label("dissimilarity  (low = more alike)" if by_example else "dissimilarity  (low = more Mars-like)")
    ax.set_xlabel("x (raster CRS)")
    ax.set_ylabel("y (raster CRS)")
    ax.ticklabel_format(useOffset=False, style="plain")
    ax.tick_params(labelsize=7)
    ax.set_title(title or f"{'Similarity' if by_example else 'Mars analog'} map: {len(grid):,} cells of "
                 f"{grid.cell_size_m:g} m", fontsize=11)

    axr = fig.add_subplot(gs[0, 1])
    if result.references[0].patch is not None:
        axr.imshow(result.references[0].patch, cmap="gray", vmin=0, vmax=1)
    axr.set_title(f"{'Example' if by_example else 'Mars reference'}\n{Path(result.references[0].path).name}"
                  + (f" (+{len(result.references) - 1} more)" if len(result.references) > 1 else ""), fontsize=8)
    axr.axis("off")

    axh = fig.add_subplot(gs[1, 1])
    if finite.size:
        axh.hist(finite, bins=40, color="#4575b4")
        for q, style in zip(np.percentile(finite, [25, 50, 75]), (":", "-", ":")):
            axh.axvline(q, color="#d73027", ls=style, lw=1.2)
    axh.set_title("dissimilarity distribution\n(red lines: quartiles)", fontsize=8)
    axh.tick_params(labelsize=7)
    try:
        fig.savefig(path, bbox_inches="tight")
    except OSError as exc:
        raise OutputError(f"Cannot write the picture '{path}': {exc}", "Choose a writable destination") from exc
    finally:
        plt.close(fig)
    return str(path)
