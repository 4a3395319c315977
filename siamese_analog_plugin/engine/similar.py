"""Query by example: "where else does the ground look like this cell?" (``similar``).

The example is a cell of an embedding raster (picked by a point on the map or by cell id) or
an image; every cell's dissimilarity is its embedding's Euclidean distance to the example's,
computed from the stored embeddings alone (no pixel is read, no encoder runs for cells), and
written through the search's outputs (GeoTIFF, cell layer, best sites).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .embeddings import EmbeddingRaster
from .errors import InputError
from .feedback import Feedback

__all__ = ["SimilarParams", "example_embeddings", "run_similar"]


@dataclass
class SimilarParams:
    """What ``similar`` needs: an embedding raster and one kind of example.

    Attributes:
        embeddings: the embedding raster to query.
        points: ``(x, y)`` points, each picking the cell that holds it ...
        crs: ... in this CRS (anything :func:`~.geo.to_crs` reads; default: the raster's).
        cells: cell ids (1..N, as in the cell layer).
        images: example image files (encoded with the raster's model).
        aggregate: with several examples, ``nearest`` (closest example) or ``mean``.
        max_nodata: cells with a larger nodata share are left out.
        top_k: how many best cells to list.
    """

    embeddings: str
    points: list[tuple[float, float]] | None = None
    crs: str | None = None
    cells: list[int] | None = None
    images: list[str] | None = None
    aggregate: str = "nearest"
    max_nodata: float = 0.5
    device: str = "auto"
    top_k: int = 10
    runtime: str = "auto"
    model: str | None = None  # the model that made the embeddings, when it has moved since


def example_embeddings(source: EmbeddingRaster, params: SimilarParams, encoder=None) -> tuple[list, np.ndarray, list]:
    """Names, embeddings ``(E, D)`` and grey patches (for pictures; ``None`` where the imagery
    cannot be read) of the examples ``params`` asks for."""
    given = [k for k in ("points", "cells", "images") if getattr(params, k)]
    if len(given) != 1:
        raise InputError("Give one kind of example: a point, cell ids or an image",
                         "Use --point X Y, --cells ID [ID ...] or --image FILE")
    grid = source.grid
    if params.images:
        from .imagery import load_image_patch
        from .runtime import load_runtime

        encoder = encoder or load_runtime(params.model or source.facts.model_path or None, params.runtime,
                                          params.device)
        source.check_model(encoder)
        patches = np.stack([load_image_patch(p, encoder.input_size, what="example image")[0] for p in params.images])
        from pathlib import Path

        return [Path(p).name for p in params.images], encoder.embed(patches), list(patches)
    if params.points:
        from .geo import to_crs, transformer

        index = []
        for x, y in params.points:
            if params.crs:
                x, y = transformer(to_crs(params.crs), to_crs(grid.crs_wkt)).transform(x, y)
            index.append(source.cell_at(float(x), float(y)))
    else:
        ids = np.asarray(params.cells, dtype=np.int64)
        bad = ids[(ids < 1) | (ids > len(grid))]
        if bad.size:
            raise InputError(f"Cell id {int(bad[0])} is not a cell of the embedding raster (ids 1 to {len(grid):,})",
                             "Take the ids from the 'id' column of the cell layer")
        index = list(ids - 1)
    _, emb = source.embeddings_of(index)
    missing = [int(i) + 1 for i, e in zip(index, emb) if not np.isfinite(e).all()]
    if missing:
        raise InputError(f"Cell {missing[0]} was not encoded (mostly nodata), so it cannot be an example",
                         "Pick a cell over valid imagery")
    return [f"cell {int(i) + 1}" for i in index], emb, [_cell_patch(source, int(i)) for i in index]


def _cell_patch(source: EmbeddingRaster, i: int) -> np.ndarray | None:
    """The grey patch of cell ``i`` as the encoder saw it (``None`` when the imagery is gone)."""
    from .imagery import GreyReader

    try:
        with GreyReader(source.facts.raster, band=source.facts.band) as reader:
            return reader.read_bounds(source.grid.bounds(i), source.facts.input_size)[0]
    except (InputError, OSError):
        return None


def run_similar(params: SimilarParams, out_raster: str | None = None, out_cells: str | None = None,
                feedback: Feedback | None = None, encoder=None):
    """Dissimilarity of every cell of ``params.embeddings`` to the examples; a
    :class:`~.search.SearchResult` (its ``references`` are the examples)."""
    from .search import SearchParams, run_search

    source = EmbeddingRaster.open(params.embeddings)
    if params.images and encoder is None:  # loaded once: it encodes the examples and checks the raster
        from .runtime import load_runtime

        encoder = load_runtime(params.model or source.facts.model_path or None, params.runtime, params.device)
    names, emb, patches = example_embeddings(source, params, encoder)
    sp = SearchParams(raster=None, references=None, embeddings=params.embeddings, examples=(names, emb, patches),
                      aggregate=params.aggregate, max_nodata=params.max_nodata, model=params.model,
                      device=params.device, top_k=params.top_k, runtime=params.runtime)
    return run_search(sp, out_raster, out_cells, feedback, encoder)
