"""Reading imagery: windowed grey patches from rasters, and reference images.

Every read is a windowed read resampled by GDAL straight to the encoder's input size, so a
cell never costs more than its own pixels (and often less, through overviews). Colour
becomes one grey channel (luminance of RGB, or a chosen band) stretched to [0, 1].
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError

__all__ = [
    "IMAGE_EXTENSIONS",
    "RasterInfo",
    "GreyReader",
    "ReferenceImage",
    "describe_raster",
    "list_images",
    "images_in_folder",
    "load_references",
    "load_image_patch",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".jp2", ".img", ".vrt", ".bmp", ".gif")
LUMINANCE = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _rasterio():
    import rasterio

    return rasterio


def _resampling():
    from rasterio.enums import Resampling

    return Resampling


@dataclass(frozen=True)
class RasterInfo:
    """What the grid needs to know about a raster, read from its header only."""

    path: str
    width: int
    height: int
    count: int
    crs_wkt: str | None
    bounds: tuple[float, float, float, float]  # left, bottom, right, top
    res: tuple[float, float]  # pixel width, pixel height (CRS units, positive)
    georeferenced: bool


def _open(path: str | os.PathLike, what: str):
    rasterio = _rasterio()
    path = str(path)
    if not os.path.exists(path) and "://" not in path and not path.startswith("/vsi"):
        raise InputError(f"The {what} '{path}' does not exist", "Check the path")
    if os.path.isdir(path):
        raise InputError(f"The {what} '{path}' is a folder, not an image file", "Give the image file itself")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NotGeoreferencedWarning for plain PNG/JPEG
            return rasterio.open(path)
    except Exception as exc:
        raise InputError(f"The {what} '{path}' cannot be read as an image: {exc}",
                         "Give a GeoTIFF, PNG or JPEG file that GDAL can open") from exc


def _gdal_errors() -> tuple[type[BaseException], ...]:
    """The exceptions rasterio raises when GDAL fails to read pixels."""
    from rasterio._err import CPLE_BaseError
    from rasterio.errors import RasterioError, RasterioIOError

    return RasterioError, RasterioIOError, CPLE_BaseError


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0].rstrip(".") if text else type(exc).__name__


def _is_georeferenced(ds) -> bool:
    return ds.crs is not None and not ds.transform.is_identity


def describe_raster(path: str | os.PathLike) -> RasterInfo:
    """Read a raster's size, CRS and extent (no pixels)."""
    with _open(path, "raster") as ds:
        t = ds.transform
        # The pixel's sides, also when the geotransform is rotated (a 90-degree one has a = e = 0).
        res = (float(np.hypot(t.a, t.d)), float(np.hypot(t.b, t.e)))
        if not (res[0] > 0 and res[1] > 0):
            raise InputError(f"The raster '{path}' has a degenerate geotransform (pixels of no size)",
                             "Fix its georeferencing, e.g. with gdal_translate -a_ullr or gdalwarp")
        return RasterInfo(str(path), ds.width, ds.height, ds.count, ds.crs.to_wkt() if ds.crs else None,
                          tuple(ds.bounds), res, _is_georeferenced(ds))


class GreyReader:
    """Reads grey patches in [0, 1] from one raster, window by window.

    Args:
        path: the raster.
        band: 1-based band to use; ``None`` = luminance of bands 1-3 when there are three or
            more colour bands, else band 1.
        what: the word used in error messages ("raster", "reference image").
        stretch: the value range mapped to [0, 1] when already known (another reader of the
            same raster computed it), which saves reading an overview of the whole image.

    One reader belongs to one thread at a time (GDAL dataset handles are not thread-safe).
    """

    def __init__(self, path: str | os.PathLike, band: int | None = None, what: str = "raster",
                 stretch: tuple[float, float] | None = None) -> None:
        rasterio = _rasterio()
        self.path = str(path)
        self._what = what
        self.ds = _open(path, what)
        ds = self.ds
        colour = [ci for ci in ds.colorinterp]
        alpha = rasterio.enums.ColorInterp.alpha
        data_bands = [i + 1 for i, ci in enumerate(colour) if ci != alpha]
        if band is not None:
            if not 1 <= band <= ds.count:
                raise InputError(f"Band {band} was asked for but '{self.path}' has {ds.count} band(s)",
                                 f"Choose a band from 1 to {ds.count}")
            self.bands = [band]
        elif len(data_bands) >= 3:
            self.bands = data_bands[:3]
        else:
            self.bands = data_bands[:1] or [1]
        flags = [ds.mask_flag_enums[b - 1] for b in self.bands]
        mask_flags = rasterio.enums.MaskFlags
        self.has_mask = any(mask_flags.all_valid not in f for f in flags)
        # Masks that only say "this pixel holds the band's nodata value", on integer bands: for
        # a read that is not resampled they are the pixels compared with that value, so they
        # are computed from the pixels already read (GDAL would read every band again).
        self._nodata = None
        nodata = [ds.nodatavals[b - 1] for b in self.bands]
        if self.has_mask and all(list(f) == [mask_flags.nodata] for f in flags) and \
                all(np.dtype(ds.dtypes[b - 1]).kind in "iu" for b in self.bands) and \
                all(v is not None and float(v).is_integer() for v in nodata):
            self._nodata = [int(v) for v in nodata]
        kinds = {np.dtype(ds.dtypes[b - 1]) for b in self.bands}
        self._dtype = next(iter(kinds)) if len(kinds) == 1 else None  # of reads into a buffer
        self._float = any(k.kind in "fc" for k in kinds)
        self._scratch = _Scratch()
        self._inverse = ~ds.transform
        self.lo, self.hi = stretch if stretch is not None else self._stretch()
        self._never_below = all(k.kind == "u" for k in kinds) and self.lo <= 0
        self._never_above = len(self.bands) == 1 and all(k.kind in "iu" for k in kinds) and \
            self.hi >= max(np.iinfo(k).max for k in kinds)

    # -- setup -------------------------------------------------------------------------
    def _stretch(self) -> tuple[float, float]:
        """Value range mapped to [0, 1]: the type's range for 8-bit, else 2-98 % of the image."""
        ds = self.ds
        if ds.dtypes[self.bands[0] - 1] == "uint8":
            return 0.0, 255.0
        scale = max(ds.width, ds.height) / 1024.0
        shape = (max(1, int(ds.height / max(scale, 1))), max(1, int(ds.width / max(scale, 1))))
        grey, valid = self._read_raw(None, shape)
        values = grey[valid] if valid is not None else grey.ravel()
        values = values[np.isfinite(values)]
        if values.size == 0:
            return 0.0, 1.0
        lo, hi = np.percentile(values, [2, 98])
        if hi <= lo:
            lo, hi = float(values.min()), float(values.max()) + 1e-6
        return float(lo), float(hi)

    # -- reads -------------------------------------------------------------------------
    def _read_raw(self, window, out_shape, resampling=None):
        """Grey (not stretched) and validity (``None``: all valid) for a window at ``out_shape``."""
        data, valid = self._read_pixels(window, out_shape, resampling)
        return _luminance(data), valid

    def _read_pixels(self, window, out_shape, resampling=None, scratch: _Scratch | None = None):
        """The bands' pixels ``(bands, *out_shape)`` of a window and their validity (``None``:
        all valid); with ``scratch``, in its buffers."""
        try:
            return self._read_checked(window, out_shape, resampling, scratch)
        except _gdal_errors() as exc:
            # A file whose header opens but whose pixels do not read (truncated, a VRT whose
            # source is gone): one line naming the file, not a traceback.
            raise InputError(f"The {self._what} '{self.path}' cannot be read: {_first_line(exc)}",
                             "It may be truncated or refer to files that are missing: check it with "
                             "gdalinfo -checksum, or make it again") from exc

    def _read_checked(self, window, out_shape, resampling=None, scratch: _Scratch | None = None):
        rs = resampling if resampling is not None else _resampling().average
        shape = (len(self.bands), *out_shape)
        if scratch is not None and self._dtype is not None:
            data = self.ds.read(self.bands, window=window, out=scratch.get("pixels", shape, self._dtype),
                                resampling=rs)
        else:
            data = self.ds.read(self.bands, window=window, out_shape=shape, resampling=rs)
        valid = nan_ok = None
        if self._float:
            # NaN (and infinite) pixels are not data, with or without a nodata tag: invalid in
            # every read path, so a cell's valid fraction counts them.
            finite = np.isfinite(data[0]) if len(data) == 1 else np.isfinite(data).all(axis=0)
            nan_ok = None if finite.all() else finite
        if self.has_mask:
            if self._nodata is not None and _not_resampled(window, out_shape):
                # Only bands that may hold their nodata value are compared with it.
                bands = [k for k in range(len(self.bands)) if _may_hold(data[k], self._nodata[k])]
                if bands:
                    valid = np.not_equal(data[bands[0]], self._nodata[bands[0]],
                                         out=scratch.get("valid", out_shape, np.bool_) if scratch is not None else None)
                    for k in bands[1:]:
                        valid &= data[k] != self._nodata[k]
            else:
                masks = self.ds.read_masks(self.bands, window=window, out_shape=shape,
                                           resampling=_resampling().nearest)
                valid = masks.min(axis=0) > 0
        if nan_ok is not None:
            valid = nan_ok if valid is None else valid & nan_ok
        return data, valid

    def _stretch_in_place(self, grey: np.ndarray) -> np.ndarray:
        """``clip((grey - lo) / (hi - lo), 0, 1)`` in place.

        A clip that cannot change a value is skipped (the result is the same to the bit): on
        unsigned pixels with ``lo <= 0`` nothing is below 0, and on one band of integers with
        ``hi`` at least the type's maximum nothing is above 1; otherwise when no value is out.
        """
        if self.lo != 0:
            grey -= self.lo
        grey /= self.hi - self.lo
        # = np.clip(grey, 0, 1), which is several times slower; and numpy's maximum/minimum
        # are several times slower than the min/max reductions that show they change nothing.
        if not self._never_below and grey.min() < 0:
            np.maximum(grey, 0.0, out=grey)
        if not self._never_above and grey.max() > 1:
            np.minimum(grey, 1.0, out=grey)
        return grey

    def read_row_cells(self, col_off: int, row_off: int, width: int, size: int, step: int, at,
                       out: np.ndarray) -> np.ndarray:
        """Read cells of one grid row that tile the raster (no resampling) into ``out``.

        The cells are the ``size`` x ``size`` windows ``step`` px apart of the strip
        ``(col_off, row_off, width, size)``; ``at`` picks which (a ``slice`` or indices).
        The pixels go straight from the strip's buffer into ``out`` (``(n, size, size)``
        float32), grey, stretched, invalid pixels filled with the cell's valid mean: the
        values :meth:`read_window` gives for each cell, without a float copy of the strip.

        Returns:
            the cells' valid fractions, ``(n,)`` float32.
        """
        from rasterio.windows import Window

        scratch = self._scratch
        data, ok = self._read_pixels(Window(col_off, row_off, width, size), (size, width), _resampling().average,
                                     scratch)
        windows = [_strided_windows(data[k], size, step)[at] for k in range(len(self.bands))]
        part = scratch.get("part", out.shape, np.float32) if len(windows) > 1 else None
        self._stretch_in_place(_luminance(windows, out, part))
        valid = np.ones(len(out), dtype=np.float32)
        if ok is None or ok.all():
            return valid
        masks = _strided_windows(ok, size, step)[at]
        valid[:] = masks.mean(axis=(1, 2))
        for j in np.flatnonzero(valid < 1):
            fill_invalid(out[j], masks[j])
        return valid

    def read_row_resampled(self, col_off: float, row_off: float, cell_w: float, cell_h: float, step: float,
                           count: int, size: int, at, out: np.ndarray) -> np.ndarray:
        """Read cells of one grid row, resampled to ``size`` x ``size``, into ``out``.

        The cells are the ``cell_w`` x ``cell_h`` px windows (fractional) at
        ``col_off + k * step``, ``row_off`` for ``k`` below ``count``; ``at`` picks which. The
        strip under them is read once at full resolution and made grey. Each cell is then
        averaged down with exact area weights (a box filter: GDAL's ``average``) or, when
        smaller than ``size``, interpolated up (GDAL's ``bilinear``), as :meth:`read_window`
        chooses: down every column of the strip first, then across each cell, each output
        pixel a weighted sum of the two or three pixels it touches. Nodata pixels are left out
        of the weights, and a cell's validity is sampled at the output pixels' centres (GDAL's
        nearest-neighbour mask), as GDAL reads do.

        :meth:`read_window` has GDAL resample each band and round it to the band's type before
        the grey mix: the two agree to that rounding (half a grey level; tests), except that
        GDAL's average is no exact box at factors near 1 (100.3 px cells: up to 20 levels
        apart). Several times faster: GDAL's resampling cost ~0.3 ms a 150 px RGB cell, and
        its mask another read.

        Returns:
            the cells' valid fractions, ``(n,)`` float32.
        """
        from rasterio.windows import Window

        scratch = self._scratch
        W, H = self.ds.width, self.ds.height
        shrink_cells = cell_w >= size - 1e-6  # as read_window: average down, else bilinear up
        taps_of = _box_taps if shrink_cells else _linear_taps
        margin = 0 if shrink_cells else 1  # interpolation reaches half a pixel past the window
        c_a, r_a = max(0, int(np.floor(col_off)) - margin), max(0, int(np.floor(row_off)) - margin)
        c_b = min(W, int(np.ceil(col_off + (count - 1) * step + cell_w)) + margin)
        r_b = min(H, int(np.ceil(row_off + cell_h)) + margin)
        h, w = r_b - r_a, c_b - c_a
        data, ok = self._read_pixels(Window(c_a, r_a, w, h), (h, w), _resampling().average, scratch)
        grey = _luminance(data, scratch.get("native", (h, w), np.float32),
                          scratch.get("native_part", (h, w), np.float32) if len(data) > 1 else None)
        if ok is not None and ok.all():
            ok = None
        picks = np.arange(count)[at]
        m = len(picks)
        # Taps across: output column j of cell k takes source columns ix[k * size + j, :].
        parts, centres = [], []
        taps: dict[float, tuple[np.ndarray, np.ndarray]] = {}  # cells at the same fraction of a pixel share them
        for k in picks:
            x = col_off + float(k) * step - c_a
            base = int(np.floor(x))
            frac = round(x - base, 9)
            if frac not in taps:
                taps[frac] = taps_of(frac, cell_w, size)
            idx, wts = taps[frac]
            parts.append((np.clip(base + idx, 0, w - 1), wts))  # at the raster's edge: its edge pixel
            centres.append(np.minimum(base + _centres(frac, cell_w, size), w - 1))
        ix = np.concatenate([p[0] for p in parts])
        wx = np.concatenate([p[1] for p in parts])
        y = row_off - r_a
        iy, wy = taps_of(y, cell_h, size)
        iy = np.clip(iy, 0, h - 1)
        valid = np.ones(m, dtype=np.float32)

        def resample(pixels: np.ndarray) -> np.ndarray:
            """(m, size, size) views: down every column of the strip, then across each cell."""
            down = _apply_taps(pixels, iy, wy, scratch.get("down", (size, w), np.float32),
                               scratch.get("down_part", (size, w), np.float32))
            columns = scratch.get("columns", (w, size), np.float32)
            columns[:] = down.T
            # row k * size + j: column j of cell k
            across = _apply_taps(columns, ix, wx, scratch.get("across", (m * size, size), np.float32),
                                 scratch.get("across_part", (m * size, size), np.float32))
            return across.reshape(m, size, size).transpose(0, 2, 1)

        if ok is None:
            out[:m] = resample(grey)
        else:
            np.copyto(grey, 0.0, where=~ok)  # nodata (NaN too) weighs nothing; its share is divided out
            out[:m] = resample(grey)
            np.divide(out[:m], np.maximum(resample(ok.astype(np.float32)), 1e-12), out=out[:m])
        self._stretch_in_place(out[:m])
        if ok is not None:
            cy = np.minimum(_centres(y, cell_h, size), h - 1)
            for j in range(m):
                mask = ok[np.ix_(cy, centres[j])]
                valid[j] = mask.mean()
                if valid[j] < 1:
                    fill_invalid(out[j], mask)
        return valid

    def _to_unit(self, grey: np.ndarray, ok: np.ndarray | None) -> np.ndarray:
        """Stretch grey to [0, 1] in place and fill invalid pixels (:func:`fill_invalid`)."""
        self._stretch_in_place(grey)
        return grey if ok is None else fill_invalid(grey, ok)

    def read_bounds(self, bounds: tuple[float, float, float, float], size: int):
        """Read the ground square ``bounds`` (raster CRS) as a ``size`` x ``size`` grey patch.

        Returns:
            ``(patch, valid_fraction)``: float32 patch in [0, 1] (invalid pixels filled with the
            mean of the valid ones, :func:`fill_invalid`) and the share of valid pixels. Parts of
            the square outside the raster are invalid.
        """
        col_off, row_off, width, height = self.window_of(bounds)
        return self.read_window(col_off, row_off, width, height, size)

    def window_of(self, bounds: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """``(col_off, row_off, width, height)`` in pixels of the ground square ``bounds``.

        The same numbers as ``rasterio.windows.from_bounds``, which (rasterio 1.3) sets up a
        GDAL environment on every call: that cost more than the read itself.
        """
        left, bottom, right, top = bounds
        inv = self._inverse
        cols, rows = zip(*(inv * (x, y) for x, y in ((left, top), (right, top), (right, bottom), (left, bottom))))
        col0, row0 = min(cols), min(rows)
        return col0, row0, max(max(cols) - col0, 0.0), max(max(rows) - row0, 0.0)

    def read_window(self, col_off: float, row_off: float, width: float, height: float, size: int):
        """Like :meth:`read_bounds` with a window in (fractional) pixel coordinates."""
        from rasterio.windows import Window

        Resampling = _resampling()
        W, H = self.ds.width, self.ds.height
        c0, r0, c1, r1 = col_off, row_off, col_off + width, row_off + height
        ic0, ir0, ic1, ir1 = max(c0, 0.0), max(r0, 0.0), min(c1, float(W)), min(r1, float(H))
        patch = np.full((size, size), 0.5, dtype=np.float32)
        valid = np.zeros((size, size), dtype=bool)
        if ic1 - ic0 <= 1e-6 or ir1 - ir0 <= 1e-6:
            return patch, 0.0
        # Output pixels that the in-raster part of the window maps to.
        ox0 = int(round((ic0 - c0) / width * size))
        ox1 = int(round((ic1 - c0) / width * size))
        oy0 = int(round((ir0 - r0) / height * size))
        oy1 = int(round((ir1 - r0) / height * size))
        if ox1 <= ox0 or oy1 <= oy0:
            return patch, 0.0
        # Downsampling averages pixels; upsampling interpolates.
        resampling = Resampling.average if width >= size else Resampling.bilinear
        grey, ok = self._read_raw(Window(ic0, ir0, ic1 - ic0, ir1 - ir0), (oy1 - oy0, ox1 - ox0), resampling)
        patch[oy0:oy1, ox0:ox1] = self._to_unit(grey, ok)
        valid[oy0:oy1, ox0:ox1] = True if ok is None else ok
        fill_invalid(patch, valid)
        return patch, float(valid.mean())

    def read_centre_square(self, size: int):
        """The largest centred square of the whole image, as a ``size`` x ``size`` patch."""
        side = min(self.ds.width, self.ds.height)
        return self.read_window((self.ds.width - side) / 2, (self.ds.height - side) / 2, side, side, size)

    def ground_resolution_m(self) -> float | None:
        """Metres per pixel when the image is georeferenced, else ``None``."""
        from .geo import metres_per_degree, metres_per_unit, to_crs

        ds = self.ds
        if not _is_georeferenced(ds):
            return None
        crs = to_crs(ds.crs.to_wkt())
        res = abs(ds.transform.a)
        if crs.is_geographic:
            lat = (ds.bounds.bottom + ds.bounds.top) / 2
            mx, my = metres_per_degree(crs, lat)
            return float(np.sqrt(res * mx * abs(ds.transform.e) * my))
        return float(res * metres_per_unit(crs))

    def reopen(self) -> None:
        """Close the raster and open it again, keeping this reader's settings and buffers.

        Closing a dataset drops the blocks GDAL caches of it (a global cache, up to 5 % of
        RAM by default), so a long run of reads that reopens now and then does not grow it.
        """
        self.ds.close()
        self.ds = _open(self.path, self._what)

    def close(self) -> None:
        self.ds.close()
        self._scratch = _Scratch()  # the buffers go with the dataset

    def __enter__(self) -> GreyReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Scratch:
    """Buffers a reader reuses from read to read (one reader = one thread at a time)."""

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """A C-contiguous array of ``shape`` (contents undefined), grown when too small."""
        size = int(np.prod(shape))
        buf = self._buffers.get(name)
        if buf is None or buf.size < size or buf.dtype != np.dtype(dtype):
            buf = self._buffers[name] = np.empty(size, dtype=dtype)
        return buf[:size].reshape(shape)


def _luminance(data, out: np.ndarray | None = None, part: np.ndarray | None = None) -> np.ndarray:
    """``(bands, h, w)`` pixels -> float32 grey: the band itself, or the luminance of RGB.

    Element-wise in float32 (not a BLAS dot) so a pixel's value does not depend on the size of
    the read (block reads and cell reads give identical patches); ``out`` and ``part`` are
    buffers of ``(h, w)`` float32 to use instead of new arrays. ``data`` may also be a list of
    one array (or view) per band, of any shape, with ``out`` and ``part`` of that shape.
    """
    grey = out if out is not None else np.empty(data.shape[1:], dtype=np.float32)
    np.copyto(grey, data[0], casting="unsafe")  # as astype(float32), without a new array
    if len(data) == 1:
        return grey
    grey *= LUMINANCE[0]
    part = part if part is not None else np.empty_like(grey)
    for k in (1, 2):
        np.copyto(part, data[k], casting="unsafe")
        part *= LUMINANCE[k]
        grey += part
    return grey


def _box_taps(offset: float, width: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact area weights of averaging the span ``[offset, offset + width)`` of pixels down to
    ``size`` pixels, as taps: ``(index, weight)``, each ``(size, K)``; output pixel ``j`` is
    the sum of ``weight[j, t] * pixel[index[j, t]]`` (its weights sum to 1; unused taps weigh 0)."""
    scale = width / size
    lo = offset + np.arange(size) * scale
    first = np.floor(lo).astype(np.int64)
    index = first[:, None] + np.arange(int(np.ceil(scale)) + 1)[None, :]
    cover = np.minimum(lo[:, None] + scale, index + 1.0) - np.maximum(lo[:, None], index.astype(np.float64))
    weight = np.clip(cover, 0.0, None)
    weight[weight < 1e-9 * scale] = 0.0  # a box that ends on a pixel's edge does not touch the next
    weight /= weight.sum(axis=1, keepdims=True)
    # Taps that weigh nothing for every output pixel (boxes of 1.5 px touch 2 pixels, not 3) go.
    used = int((weight > 0).sum(axis=1).max())
    start = np.argmax(weight > 0, axis=1)
    wanted = start[:, None] + np.arange(used)[None, :]
    take = np.minimum(wanted, index.shape[1] - 1)  # past the last tap: weight 0 (not the last again)
    rows = np.arange(size)[:, None]
    return index[rows, take], np.where(wanted == take, weight[rows, take], 0.0).astype(np.float32)


def _linear_taps(offset: float, width: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear interpolation of the span ``[offset, offset + width)`` up to ``size`` pixels, as
    taps (see :func:`_box_taps`): output pixel ``j``'s centre falls between the centres of two
    pixels and takes each by its nearness (GDAL's bilinear, to its rounding)."""
    at = offset + (np.arange(size) + 0.5) * (width / size) - 0.5
    first = np.floor(at).astype(np.int64)
    frac = (at - first).astype(np.float32)
    return np.stack([first, first + 1], axis=1), np.stack([1 - frac, frac], axis=1)


def _apply_taps(rows: np.ndarray, index: np.ndarray, weight: np.ndarray, out: np.ndarray,
                part: np.ndarray) -> np.ndarray:
    """``out[j] = sum_t weight[j, t] * rows[index[j, t]]``, rows gathered whole (contiguous),
    in the buffers ``out`` and ``part`` (``(len(index), rows.shape[1])`` float32)."""
    np.take(rows, index[:, 0], axis=0, out=out)
    out *= weight[:, 0, None]
    for t in range(1, index.shape[1]):
        np.take(rows, index[:, t], axis=0, out=part)
        part *= weight[:, t, None]
        out += part
    return out


def _centres(offset: float, width: float, size: int) -> np.ndarray:
    """Source pixel under each output pixel's centre (a nearest-neighbour read's pick)."""
    return np.floor(offset + (np.arange(size) + 0.5) * (width / size)).astype(np.int64)


def _may_hold(band: np.ndarray, value: int) -> bool:
    """Whether integer pixels ``band`` may hold ``value``: ``False`` when it is the type's lowest
    (highest) value and none is that low (high), found with one reduction, several times
    cheaper than comparing every pixel (nodata is most often 0 and absent from most reads)."""
    info = np.iinfo(band.dtype)
    if value <= info.min:
        return bool(band.min() <= value)
    if value >= info.max:
        return bool(band.max() >= value)
    return True


def _strided_windows(strip: np.ndarray, size: int, step: int) -> np.ndarray:
    """``(cells, size, size)`` read-only view of the ``size``-wide windows of ``strip``, ``step`` apart."""
    count = (strip.shape[1] - size) // step + 1
    s0, s1 = strip.strides
    return np.lib.stride_tricks.as_strided(strip, (count, size, size), (step * s1, s0, s1), writeable=False)


def _valid_mean(grey: np.ndarray, ok: np.ndarray) -> float:
    n = int(np.count_nonzero(ok))
    return float(grey.sum(where=ok, dtype=np.float64) / n) if n else 0.5


def fill_invalid(patch: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Set the invalid pixels of ``patch`` (in place) to the mean of its valid ones (0.5 when
    none is valid).

    A flat fill at the patch's own mean brightness, not a fixed grey: after per-patch
    normalisation a fixed grey leaves a sharp straight edge along the raster's border or a
    nodata hole, a structure the encoder would match like any other (partly empty edge cells
    used to rank among the best analog sites).
    """
    if not valid.all():
        np.copyto(patch, _valid_mean(patch, valid), where=~valid)
    return patch


def _not_resampled(window, out_shape) -> bool:
    """Whether reading ``window`` at ``out_shape`` is a plain read of whole pixels."""
    if window is None:
        return False
    sizes = (window.height, window.width, window.col_off, window.row_off)
    return all(float(v).is_integer() for v in sizes) and (window.height, window.width) == tuple(out_shape)


@dataclass
class ReferenceImage:
    """A Mars reference, ready to embed.

    Attributes:
        path: the file.
        patch: ``(S, S)`` grey patch in [0, 1] (the image's largest centred square).
        ground_size_m: the ground side of that square in metres, when the image is
            georeferenced or its resolution was given; else ``None``.
    """

    path: str
    patch: np.ndarray
    ground_size_m: float | None


def list_images(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Image files under a folder, sorted, hidden files and GDAL sidecars skipped."""
    folder = Path(folder)
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern)
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def images_in_folder(folder: str | os.PathLike, what: str = "image folder") -> list[Path]:
    """The images under ``folder`` (recursively), or a clear error when there are none.

    Raises:
        InputError: the folder is missing, not a folder, or holds no image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"The {what} '{folder}' does not exist or is not a folder", "Check the path")
    files = list_images(folder)
    if not files:
        raise InputError(f"The {what} '{folder}' holds no images",
                         f"Put image files in it ({', '.join(IMAGE_EXTENSIONS[:4])}...)")
    return files


def load_image_patch(path: str | os.PathLike, size: int, band: int | None = None,
                     what: str = "image") -> tuple[np.ndarray, float | None]:
    """Load an image's largest centred square as a grey patch; also its ground side in metres."""
    with GreyReader(path, band=band, what=what) as reader:
        patch, valid = reader.read_centre_square(size)
        res = reader.ground_resolution_m()
        side = min(reader.ds.width, reader.ds.height)
    if valid < 0.05:
        raise InputError(f"The {what} '{path}' holds no valid pixels (all nodata)", "Choose another image")
    return patch, (res * side if res else None)


MIN_REFERENCE_PIXELS = 16  # a smaller reference (e.g. 8 x 8 px) is blown up into a blur, not texture


def _check_texture(path, patch: np.ndarray) -> None:
    """Refuse a reference that cannot carry texture: too few pixels, or one flat grey."""
    with GreyReader(path, what="reference image", stretch=(0.0, 1.0)) as r:
        w, h = r.ds.width, r.ds.height
    if min(w, h) < MIN_REFERENCE_PIXELS:
        raise InputError(f"The reference image '{path}' is only {w} x {h} pixels: too small to show texture",
                         f"Give a Mars image of at least {MIN_REFERENCE_PIXELS} x {MIN_REFERENCE_PIXELS} pixels "
                         "(the encoder compares 100 x 100 patches)")
    if float(patch.max() - patch.min()) < 1e-3:
        raise InputError(f"The reference image '{path}' is one flat grey: there is no texture to compare",
                         "Give an image of the Mars terrain itself (not a blank or saturated one)")


def load_references(references, size: int, resolution_m: float | None = None,
                    band: int | None = None) -> list[ReferenceImage]:
    """Load one or several Mars reference images.

    Args:
        references: a file, a folder (its images, recursively) or a list of files/folders.
        size: the encoder's input size.
        resolution_m: metres per pixel of the references, for images that are not
            georeferenced (overrides nothing that the file itself says).
        band: band to use (default: luminance).

    Raises:
        InputError: nothing given, a missing file, an empty folder, an unreadable image.
    """
    if references is None or references == "" or references == []:
        raise InputError("No Mars reference image was given",
                         "Give a PNG, JPEG or GeoTIFF of the Mars terrain to match")
    if resolution_m is not None and not (resolution_m > 0 and np.isfinite(resolution_m)):
        raise InputError(f"The reference resolution must be above 0 metres per pixel, not {resolution_m:g}",
                         "Give the Mars image's metres per pixel, e.g. 6 for CTX, or leave it out")
    items = [references] if isinstance(references, (str, os.PathLike)) else list(references)
    files: list[Path | str] = []
    for item in items:
        p = Path(item)
        if str(item).startswith("/vsi") or "://" in str(item):
            files.append(str(item))  # a GDAL virtual path (/vsizip/...): GDAL says whether it exists
            continue
        if p.is_dir():
            found = list_images(p)
            if not found:
                raise InputError(f"The reference folder '{p}' holds no images",
                                 f"Put PNG, JPEG or GeoTIFF files in it ({', '.join(IMAGE_EXTENSIONS[:4])}...)")
            files.extend(found)
        elif not p.exists():
            raise InputError(f"The reference image '{p}' does not exist", "Check the path")
        else:
            files.append(p)
    out = []
    for f in files:
        patch, ground = load_image_patch(f, size, band=band, what="reference image")
        _check_texture(f, patch)
        if ground is None and resolution_m:
            with GreyReader(f, band=band, what="reference image") as r:
                ground = resolution_m * min(r.ds.width, r.ds.height)
        out.append(ReferenceImage(str(f), patch, ground))
    return out
