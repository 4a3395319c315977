"""Questions asked of cell embeddings: each one a cheap function of an ``(N, D)`` array.

* :class:`ReferenceQuery`: Euclidean dissimilarity to Mars reference(s): nearest or mean, and
  each reference's own distance (the ``search``).
* the same distances to example cells or images: "where else does the ground look like
  this?" (``similar``, :mod:`.similar`).
* The landform classes of a cosine classifier (:class:`~.classes.CosineClassifier`; ``fewshot-map``).
* :func:`region_statistics`: regions x references, the minimum, quartiles and best cell of
  each region (``compare``, the paper's table).

A query's ``score(embeddings)`` returns a dict of per-cell columns; the pipeline
(:mod:`.search`) calls it on each batch of freshly encoded cells, or on chunks of an
embedding raster (:mod:`.embeddings`), and writes the columns through the one set of writers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InputError

__all__ = ["AGGREGATES", "ReferenceQuery", "distances_to", "region_statistics", "reference_columns"]

AGGREGATES = ("nearest", "mean")


def distances_to(embeddings: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``(N, R)`` Euclidean distances between ``N`` embeddings and ``R`` targets (float32)."""
    e = np.asarray(embeddings, dtype=np.float32)
    r = np.asarray(targets, dtype=np.float32)
    out = np.empty((len(e), len(r)), dtype=np.float32)
    # One pass per dimension, summed in the same order whatever the layout, so the cells of a
    # search and of an embedding raster (read band-first: ``e`` is then a transposed view, and
    # these passes run over contiguous memory) get bit-identical distances.
    bands = e.T
    for k in range(len(r)):
        d2 = np.zeros(len(e), dtype=np.float32)
        for j in range(bands.shape[0]):
            diff = bands[j] - r[k, j]
            d2 += diff * diff
        out[:, k] = np.sqrt(d2)
    return out


def reference_columns(names: list[str]) -> list[str]:
    """Cell-layer column names of each reference's own dissimilarity (``d_<file stem>``),
    unique and safe as GeoPackage field names."""
    out: list[str] = []
    for name in names:
        stem = "".join(c if c.isalnum() else "_" for c in Path(name).stem).strip("_") or "reference"
        col, k = f"d_{stem}"[:60], 2
        while col in out:
            col, k = f"d_{stem}"[:56] + f"_{k}", k + 1
        out.append(col)
    return out


class ReferenceQuery:
    """Dissimilarity to Mars reference embeddings.

    ``nearest``: distance to the closest reference (its index in ``nearest``); ``mean``: distance
    to their mean embedding. With several references, ``per_reference`` holds each one's own
    distance too.
    """

    def __init__(self, reference_embeddings: np.ndarray, aggregate: str = "nearest") -> None:
        if aggregate not in AGGREGATES:
            raise InputError(f"Unknown way to combine references '{aggregate}'", "Use nearest or mean")
        self.references = np.asarray(reference_embeddings, dtype=np.float32)
        self.aggregate = aggregate

    def score(self, embeddings: np.ndarray) -> dict[str, np.ndarray]:
        """``dissimilarity``, ``nearest`` and, with several references, ``per_reference``."""
        d = distances_to(embeddings, self.references)
        out: dict[str, np.ndarray] = {}
        if self.aggregate == "mean":
            out["dissimilarity"] = distances_to(embeddings, self.references.mean(0, keepdims=True))[:, 0]
            out["nearest"] = np.zeros(len(d), dtype=np.int32)
        else:
            near = d.argmin(axis=1)
            out["dissimilarity"] = d[np.arange(len(d)), near]
            out["nearest"] = near.astype(np.int32)
        if self.references.shape[0] > 1:
            out["per_reference"] = d
        return out


def region_statistics(dissimilarity: np.ndarray, region_of_cell: np.ndarray, n_regions: int,
                      lon: np.ndarray, lat: np.ndarray) -> list[dict]:
    """Per region: ``min, q1, median, q3, max``, the best cell's ``best_lon, best_lat`` and the
    number of scored ``cells`` (cells whose dissimilarity is NaN, or in no region (-1), are left out).

    Quartiles are NumPy's linear ones (``np.percentile``), the same as a box plot's.
    """
    out = []
    d = np.asarray(dissimilarity, dtype=np.float64)
    for r in range(n_regions):
        sel = np.nonzero((region_of_cell == r) & np.isfinite(d))[0]
        if sel.size == 0:
            out.append({"min": np.nan, "q1": np.nan, "median": np.nan, "q3": np.nan, "max": np.nan,
                        "best_lon": np.nan, "best_lat": np.nan, "cells": 0})
            continue
        v = d[sel]
        q1, med, q3 = np.percentile(v, [25, 50, 75])
        best = sel[int(np.argmin(v))]
        out.append({"min": float(v.min()), "q1": float(q1), "median": float(med), "q3": float(q3),
                    "max": float(v.max()), "best_lon": float(lon[best]), "best_lat": float(lat[best]),
                    "cells": int(sel.size)})
    return out
