"""The embedding raster: an area's cell embeddings as a georeferenced, tiled GeoTIFF.

The engine's central data product ("embed once, query many"): one pixel per grid position,
on the same transform as the dissimilarity raster ``search`` writes for that grid, with

* bands ``1..D``: the embedding of each cell (half-precision floats: ``NBITS=16``; NaN = nodata
  where a cell was not encoded: outside the area or mostly nodata);
* band ``D + 1``: the cell's share of valid pixels (NaN outside the area).

Half precision keeps the file at about ``2 (D + 1)`` bytes a grid position before compression
(ZSTD takes it below ``2 D``); the rounding moves a dissimilarity by at most ~1e-3 (embeddings
are unit vectors; :func:`quantise` is the rounding, tested). The search rounds its embeddings
the same way before it scores them, so a search from an embedding raster gives exactly the
numbers of a search that encodes.

Its metadata (GeoTIFF tag ``SIAMESE_EMBEDDINGS``, JSON: :class:`EmbeddingFacts`) says what made
it: the model (file SHA-256, input size, normalisation, embedding size), the source raster
(path, size, modification time), the band, the grid (cell size, stride, min coverage, origin,
cell and step sizes, shape, and the area polygon, so the grid is rebuilt exactly) and the
smallest valid share that was encoded. A query checks those facts against what it is asked
for and refuses embeddings made otherwise (one-line errors).

The embedding cache is nothing but such rasters kept under a key in a folder
(:class:`EmbeddingCache`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import InputError, OutputError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "EmbeddingFacts",
    "EmbeddingRaster",
    "EmbeddingRasterWriter",
    "EmbeddingCache",
    "embedding_facts",
    "model_fingerprint",
    "file_sha256",
    "quantise",
]

FORMAT = "siamese-analog-finder/embeddings"
# Bump when reading, resampling or normalising patches changes: older rasters are then refused
# as a query's input and miss in the cache.
FORMAT_VERSION = 1
TAG = "SIAMESE_EMBEDDINGS"
BLOCK = 128  # tile side; the writer buffers one strip of tiles (BLOCK grid rows)

_SHA_MEMO: dict[tuple, str] = {}


def quantise(embeddings: np.ndarray) -> np.ndarray:
    """Embeddings rounded to half precision (as stored), returned as float32."""
    return np.asarray(embeddings, dtype=np.float32).astype(np.float16).astype(np.float32)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file (remembered per path, size and modification time)."""
    st = os.stat(path)
    memo = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if memo not in _SHA_MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _SHA_MEMO[memo] = h.hexdigest()
    return _SHA_MEMO[memo]


def model_fingerprint(encoder) -> str:
    """Identity of an encoder's weights: its file's SHA-256, or a hash of its tensors.

    An ``.onnx`` exported from a ``.pt`` has the ``.pt``'s identity (recorded in the file): the
    same weights on either runtime give the same embeddings (to ~1e-6, below half precision).
    """
    source = getattr(encoder, "properties", {}).get("siamese_analog_finder.source_sha256")
    if source:
        return "file:" + source
    if encoder.path and os.path.isfile(encoder.path):
        return "file:" + file_sha256(encoder.path)
    h = hashlib.sha256(encoder.metadata.to_json().encode())
    if getattr(encoder, "runtime", "torch") != "torch":  # an ONNX model held in memory
        h.update(encoder.model_bytes)
        return "onnx:" + h.hexdigest()
    for name, tensor in sorted(encoder.network.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return "weights:" + h.hexdigest()


@dataclass
class EmbeddingFacts:
    """What made an embedding raster (stored in it as JSON)."""

    model: str  # fingerprint: "file:<sha256>" or "weights:<sha256>"
    model_path: str
    input_size: int
    normalisation: dict
    embedding_dim: int
    raster: str  # absolute path (or GDAL virtual path) of the source imagery
    raster_size: int
    raster_mtime_ns: int
    band: int | None
    cell_size_m: float
    stride_m: float
    min_coverage: float
    area_wkt: str | None  # the area polygon in the raster's CRS, clipped to the raster
    grid: dict  # crs, origin, cell, step, shape, cells (kept), kept (hash of rows/cols)
    min_valid: float  # cells with a smaller valid share were not encoded
    precision: str = "fp32"  # "amp-bfloat16"...: mixed-precision embeddings are not the float32 ones
    format: str = FORMAT
    version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EmbeddingFacts:
        data = json.loads(text)
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in names})

    def key(self) -> str:
        """Cache key: everything that determines the embeddings (not the nodata limit)."""
        data = asdict(self)
        data.pop("min_valid")
        data.pop("model_path")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:32]


def _grid_facts(grid) -> dict:
    kept = hashlib.sha256(np.ascontiguousarray(grid.rows, dtype=np.int32).tobytes()
                          + np.ascontiguousarray(grid.cols, dtype=np.int32).tobytes()).hexdigest()
    return {"crs": grid.crs_wkt, "origin": [repr(grid.origin_x), repr(grid.origin_y)],
            "cell": [repr(grid.cell_w), repr(grid.cell_h)], "step": [repr(grid.step_x), repr(grid.step_y)],
            "shape": [grid.n_rows, grid.n_cols], "cells": len(grid), "kept": kept}


def _raster_identity(raster: str) -> tuple[str, int, int]:
    """Path, size and modification time of a raster (virtual GDAL paths: size and time 0)."""
    try:
        st = os.stat(raster)
    except OSError:
        return raster, 0, 0
    return os.path.abspath(raster), st.st_size, st.st_mtime_ns


def embedding_facts(encoder, raster: str, grid, band: int | None, min_valid: float,
                    min_coverage: float) -> EmbeddingFacts:
    """The facts of the embeddings ``encoder`` makes of ``grid``'s cells of ``raster``."""
    path, size, mtime = _raster_identity(raster)
    area = getattr(grid, "area", None)
    return EmbeddingFacts(
        model=model_fingerprint(encoder), model_path=os.path.abspath(encoder.path) if encoder.path else "",
        input_size=int(encoder.input_size),
        normalisation=dict(encoder.metadata.normalisation), embedding_dim=int(encoder.embedding_dim),
        raster=path, raster_size=size, raster_mtime_ns=mtime, band=band, cell_size_m=float(grid.cell_size_m),
        stride_m=float(grid.stride_m), min_coverage=float(min_coverage),
        area_wkt=None if area is None else area.wkt,
        grid=_grid_facts(grid), min_valid=float(min_valid))


class EmbeddingRasterWriter:
    """Writes an embedding raster as cells come, in grid order; then :meth:`close`.

    A strip of ``BLOCK`` grid rows is buffered (half precision) and written once it is complete,
    so each compressed tile is written exactly once and memory depends on the grid's width, not
    on the number of cells. Write to a temporary name (:func:`~.outputs.atomic_outputs`): on any
    error, :meth:`abort` and remove the file.
    """

    def __init__(self, path: str | os.PathLike, grid, facts: EmbeddingFacts) -> None:
        import rasterio

        self.path = str(path)
        self.grid, self.facts = grid, facts
        self.dim = int(facts.embedding_dim)
        bands = self.dim + 1
        profile = dict(driver="GTiff", width=grid.n_cols, height=grid.n_rows, count=bands, dtype="float32",
                       nbits=16, crs=grid.crs_wkt, transform=grid.output_transform, nodata=float("nan"),
                       interleave="pixel", compress="zstd", tiled=True, blockxsize=BLOCK, blockysize=BLOCK,
                       bigtiff="if_safer")
        try:
            self._ds = rasterio.open(self.path, "w", **profile)
            for b in range(self.dim):
                self._ds.set_band_description(b + 1, f"embedding_{b + 1}")
            self._ds.set_band_description(bands, "valid_fraction")
            self._ds.update_tags(**{TAG: facts.to_json(), "meaning": "Siamese Analog Finder cell embeddings; "
                                    f"bands 1-{self.dim}: embedding, band {bands}: valid pixel share"})
        except Exception as exc:
            raise OutputError(f"Cannot write the embedding raster '{self.path}': {exc}",
                              "Check the destination (free disk space, permissions)") from exc
        self._strip = np.full((BLOCK, grid.n_cols, bands), np.nan, dtype=np.float16)
        self._row0 = 0
        self._next = 0

    def store(self, idx: np.ndarray, valid: np.ndarray, ok: np.ndarray, embeddings: np.ndarray | None) -> None:
        """Record a batch: valid shares of cells ``idx`` (the next cells, in grid order) and the
        embeddings of ``idx[ok]``."""
        idx = np.asarray(idx)
        if idx.size == 0:
            return
        if idx[0] != self._next or idx[-1] - idx[0] + 1 != idx.size:
            raise OutputError(f"Cells reached the embedding raster '{self.path}' out of order "
                              f"(expected cell {self._next}, got {idx[0]})",
                              "Write the cells in the grid's order (this is a bug: please report it)")
        rows, cols = self.grid.rows[idx], self.grid.cols[idx]
        values = np.full((idx.size, self.dim + 1), np.nan, dtype=np.float16)
        if embeddings is not None and len(embeddings):
            values[np.asarray(ok, dtype=bool), :self.dim] = embeddings
        values[:, self.dim] = valid
        pos = 0
        while pos < idx.size:
            while rows[pos] >= self._row0 + BLOCK:
                self._flush()
            end = pos + int(np.searchsorted(rows[pos:], self._row0 + BLOCK, side="left"))
            self._strip[rows[pos:end] - self._row0, cols[pos:end]] = values[pos:end]
            pos = end
        self._next = int(idx[-1]) + 1

    def _flush(self) -> None:
        from rasterio.windows import Window

        height = min(BLOCK, self.grid.n_rows - self._row0)
        if height > 0:
            data = np.moveaxis(self._strip[:height], 2, 0).astype(np.float32)
            try:
                self._ds.write(data, window=Window(0, self._row0, self.grid.n_cols, height))
            except Exception as exc:
                raise OutputError(f"Cannot write the embedding raster '{self.path}': {exc}",
                                  "Check the destination (free disk space, permissions)") from exc
        self._strip.fill(np.nan)
        self._row0 += BLOCK

    def close(self) -> None:
        """Write what is buffered and close the file (every cell must have come)."""
        if self._next != len(self.grid):
            raise OutputError(f"The embedding raster '{self.path}' is incomplete: {self._next} of "
                              f"{len(self.grid)} cells", "This is a bug: please report it")
        while self._row0 < self.grid.n_rows:
            self._flush()
        try:
            self._ds.close()
        except Exception as exc:
            raise OutputError(f"Cannot write the embedding raster '{self.path}': {exc}",
                              "Check the destination (free disk space, permissions)") from exc

    def abort(self) -> None:
        """Close without completing (the caller removes the file)."""
        with contextlib.suppress(Exception):
            self._ds.close()


@dataclass
class EmbeddingRaster:
    """An embedding raster opened for queries: its facts and its cell grid.

    The grid is rebuilt from the facts (raster extent and CRS, cell size, stride, area, min
    coverage) and checked against the stored one, so cell ids, rows, columns, coverage and
    lon/lat are those of the search that made it.
    """

    path: str
    facts: EmbeddingFacts
    grid: object  # CellGrid

    @classmethod
    def open(cls, path: str | os.PathLike) -> EmbeddingRaster:
        """Open ``path`` (one-line errors when it is no embedding raster)."""
        import rasterio

        path = str(path)
        if not os.path.exists(path) and not path.startswith("/vsi"):
            raise InputError(f"The embedding raster '{path}' does not exist",
                             "Make one with 'embed-area' (or the Embed area algorithm), or check the path")
        try:
            with rasterio.open(path) as ds:
                tags = ds.tags()
                count, shape = ds.count, (ds.height, ds.width)
        except Exception as exc:
            raise InputError(f"Cannot read the embedding raster '{path}': {exc}",
                             "Give a GeoTIFF written by 'embed-area' (or 'search --keep-embeddings')") from exc
        if TAG not in tags:
            raise InputError(f"'{path}' is not an embedding raster (no {TAG} metadata)",
                             "Give a GeoTIFF written by 'embed-area' (or 'search --keep-embeddings')")
        try:
            facts = EmbeddingFacts.from_json(tags[TAG])
        except (ValueError, TypeError) as exc:
            raise InputError(f"The embedding raster '{path}' has unreadable metadata: {exc}",
                             "Make it again with 'embed-area'") from exc
        if facts.format != FORMAT or facts.version != FORMAT_VERSION:
            raise InputError(f"The embedding raster '{path}' is of format {facts.format} v{facts.version}; this "
                             f"version reads v{FORMAT_VERSION}", "Make it again with 'embed-area'")
        if count != facts.embedding_dim + 1 or list(shape) != list(facts.grid["shape"]):
            raise InputError(f"The embedding raster '{path}' does not match its own metadata "
                             f"({count} bands, {shape[0]} x {shape[1]})", "Make it again with 'embed-area'")
        return cls(path, facts, _rebuild_grid(facts, path))

    def check_model(self, encoder_or_fingerprint) -> None:
        """Refuse when the embeddings were made by another model than the one asked for."""
        fp = encoder_or_fingerprint if isinstance(encoder_or_fingerprint, str) else \
            model_fingerprint(encoder_or_fingerprint)
        if fp != self.facts.model:
            raise InputError(f"The embedding raster '{self.path}' was made with another model "
                             f"({Path(self.facts.model_path).name or self.facts.model[:17]})",
                             "Query it with the model that made it (or leave --model out), or embed the area "
                             "again with this model")

    def check_raster(self, raster: str) -> None:
        """Refuse when the embeddings were made from another raster (or an older version of it)."""
        path, size, mtime = _raster_identity(raster)
        if path != self.facts.raster or (size, mtime) != (self.facts.raster_size, self.facts.raster_mtime_ns):
            same = path == self.facts.raster
            raise InputError(f"The embedding raster '{self.path}' was made from "
                             f"{'an older version of ' if same else ''}'{self.facts.raster}', not '{raster}'",
                             "Leave --raster out to use its own imagery, or embed this raster again with "
                             "'embed-area'")

    def check_grid(self, cell_size_m: float | None, stride_m: float | None) -> None:
        """Refuse a cell size or stride other than the embeddings' own."""
        for asked, have, what in ((cell_size_m, self.facts.cell_size_m, "cell size"),
                                  (stride_m, self.facts.stride_m, "stride")):
            if asked is not None and not math.isclose(asked, have, rel_tol=1e-9):
                raise InputError(f"The embedding raster '{self.path}' has a {what} of {have:g} m, not {asked:g} m",
                                 f"Leave the {what} out (it comes from the embedding raster), or embed the area "
                                 f"again at {asked:g} m")

    def check_band(self, band: int | None) -> None:
        """Refuse a band other than the one the embeddings were made from (``None``: no band asked)."""
        if band is not None and band != self.facts.band:
            made = "the luminance of RGB (or band 1)" if self.facts.band is None else f"band {self.facts.band}"
            raise InputError(f"The embedding raster '{self.path}' was made from {made}, not band {band}",
                             "Leave the band out (it comes from the embedding raster), or embed the area again "
                             "from that band")

    def check_nodata(self, min_valid: float) -> None:
        """Refuse a query that needs cells more nodata than the embedding raster encoded: those
        cells were never embedded, so they would silently be missing."""
        if min_valid < self.facts.min_valid - 1e-6:
            raise InputError(f"The embedding raster '{self.path}' holds only cells with at most "
                             f"{1 - self.facts.min_valid:.0%} nodata, not {1 - min_valid:.0%}",
                             f"Use a largest nodata share of at most {1 - self.facts.min_valid:g}, or embed the "
                             "area again with a larger one")

    def iter_chunks(self, rows_per_chunk: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``(idx, valid_fraction, embeddings)`` of the kept cells, a strip of grid rows at a
        time: ``embeddings`` is ``(len(idx), D)`` float32 (a view, not C-contiguous) with NaN rows
        for cells not encoded."""
        import rasterio
        from rasterio.windows import Window

        grid = self.grid
        if rows_per_chunk is None:
            rows_per_chunk = max(1, (1 << 20) // max(grid.n_cols, 1))  # ~1 M grid positions a read
        starts = np.searchsorted(grid.rows, np.arange(0, grid.n_rows + rows_per_chunk, rows_per_chunk))
        dim = self.facts.embedding_dim
        with rasterio.Env(GDAL_NUM_THREADS="ALL_CPUS"), rasterio.open(self.path, num_threads="all_cpus") as ds:
            for k, r0 in enumerate(range(0, grid.n_rows, rows_per_chunk)):
                a, b = int(starts[k]), int(starts[k + 1])
                if a == b:
                    continue
                h = min(rows_per_chunk, grid.n_rows - r0)
                data = ds.read(window=Window(0, r0, grid.n_cols, h))  # (D + 1, h, W) float32
                if b - a == h * grid.n_cols:  # every grid position of these rows is a kept cell
                    cells = data.reshape(dim + 1, -1)
                else:
                    cells = data[:, grid.rows[a:b] - r0, grid.cols[a:b]]  # (D + 1, n)
                # Band-first as read: the embeddings are a transposed view (no copy).
                yield np.arange(a, b), cells[dim], cells[:dim].T

    def read_all(self) -> tuple[np.ndarray, np.ndarray]:
        """All kept cells' ``(valid_fraction, embeddings)`` (for small areas and tests)."""
        valid = np.full(len(self.grid), np.nan, dtype=np.float32)
        emb = np.full((len(self.grid), self.facts.embedding_dim), np.nan, dtype=np.float32)
        for idx, v, e in self.iter_chunks():
            valid[idx], emb[idx] = v, e
        return valid, emb

    def embeddings_of(self, index) -> tuple[np.ndarray, np.ndarray]:
        """``(valid_fraction, embeddings)`` of the kept cells ``index`` (a few: one read each)."""
        import rasterio
        from rasterio.windows import Window

        index = np.atleast_1d(np.asarray(index, dtype=np.int64))
        dim = self.facts.embedding_dim
        out = np.full((index.size, dim + 1), np.nan, dtype=np.float32)
        with rasterio.open(self.path) as ds:
            for j, i in enumerate(index):
                out[j] = ds.read(window=Window(int(self.grid.cols[i]), int(self.grid.rows[i]), 1, 1))[:, 0, 0]
        return out[:, dim], out[:, :dim]

    def cell_at(self, x: float, y: float) -> int:
        """Index of the kept cell whose pixel holds point ``(x, y)`` (raster CRS)."""
        grid = self.grid
        t = ~grid.output_transform
        col, row = t * (x, y)
        col, row = int(math.floor(col)), int(math.floor(row))
        if not (0 <= row < grid.n_rows and 0 <= col < grid.n_cols):
            raise InputError(f"The point ({x:.6g}, {y:.6g}) lies outside the embedding raster '{self.path}'",
                             "Pick a point inside the embedded area")
        hit = np.nonzero((grid.rows == row) & (grid.cols == col))[0]
        if hit.size == 0:
            raise InputError(f"The point ({x:.6g}, {y:.6g}) lies in no cell of the embedding raster '{self.path}' "
                             "(outside the area)", "Pick a point inside the embedded area")
        return int(hit[0])


def _rebuild_grid(facts: EmbeddingFacts, path: str):
    from shapely import wkt

    from .grid import Area, build_grid
    from .imagery import RasterInfo

    g = facts.grid
    crs = g["crs"]
    # The raster's extent is not needed: the area (or the grid's own extent) fixes the cells.
    ox, oy = float(g["origin"][0]), float(g["origin"][1])
    cw, ch = float(g["cell"][0]), float(g["cell"][1])
    sx, sy = float(g["step"][0]), float(g["step"][1])
    n_rows, n_cols = int(g["shape"][0]), int(g["shape"][1])
    extent = (ox, oy - (n_rows - 1) * sy - ch, ox + (n_cols - 1) * sx + cw, oy)
    if facts.area_wkt:
        # The area (already clipped to the real raster) may reach past the last cell; clipping it to
        # the cells' extent would move its bounds, and with them the origin and, in degrees, the size.
        b = wkt.loads(facts.area_wkt).bounds
        extent = (min(extent[0], b[0]), min(extent[1], b[1]), max(extent[2], b[2]), max(extent[3], b[3]))
    info = RasterInfo(path=facts.raster, width=max(1, round((extent[2] - extent[0]) / cw)),
                      height=max(1, round((extent[3] - extent[1]) / ch)), count=1, crs_wkt=crs,
                      bounds=extent, res=(min(cw, ch) / 1e3, min(cw, ch) / 1e3), georeferenced=True)
    area = Area(wkt.loads(facts.area_wkt), None) if facts.area_wkt else None
    try:
        grid = build_grid(info, facts.cell_size_m, area, facts.stride_m, facts.min_coverage, force=True)
    except InputError as exc:
        raise InputError(f"The embedding raster '{path}' has a grid that cannot be rebuilt: {exc.problem}",
                         "Make it again with 'embed-area'") from exc
    if _grid_facts(grid) != g:
        raise InputError(f"The embedding raster '{path}' has a grid that cannot be rebuilt exactly",
                         "Make it again with 'embed-area' (with this version)")
    if area is not None:
        grid.area = area.geometry  # the area as it was (clipping it to the cells changes its outline only)
    return grid


class EmbeddingCache:
    """A folder of embedding rasters kept under a key (:meth:`EmbeddingFacts.key`).

    ``<key>.emb.tif`` is an ordinary embedding raster; a later search of the same raster, grid,
    band and model reads it instead of encoding, when it covers the search's nodata limit.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"Cannot create the embedding cache folder '{folder}': {exc.strerror or exc}",
                              "Choose a cache folder you can write to, or leave the cache off") from exc
        if not os.access(self.folder, os.W_OK):
            raise OutputError(f"Cannot write to the embedding cache folder '{folder}': permission denied",
                              "Choose a cache folder you can write to, or leave the cache off")

    def path_for(self, facts: EmbeddingFacts) -> Path:
        return self.folder / f"{facts.key()}.emb.tif"

    def lookup(self, facts: EmbeddingFacts) -> EmbeddingRaster | None:
        """The cached embedding raster of ``facts`` when there is one that covers its nodata limit."""
        path = self.path_for(facts)
        if not path.exists():
            return None
        try:
            emb = EmbeddingRaster.open(path)
        except InputError:
            return None
        if emb.facts.key() != facts.key() or emb.facts.min_valid > facts.min_valid + 1e-9:
            return None  # cells this search needs were skipped when the entry was made
        return emb
