"""Embedding cache: encode an area's cells once, compare them with any reference afterwards.

The embeddings of a search are kept on disk, keyed by what determines them: the raster
(path, size, modification time), the grid (origin, cell and step sizes, shape, kept cells),
the band, and the model (SHA-256 of its file, or of its weights when built in memory). A
second search of the same area with another reference then reads them back (memory-mapped)
and only computes distances.

Files, per key, in the cache folder::

    <key>.emb.npy    float32 (N, D): embeddings, NaN rows for cells that were not encoded
    <key>.valid.npy  float32 (N,):   share of valid pixels of every cell
    <key>.json       header (written last: a cache entry exists once its header does)

Cells skipped as mostly nodata are not encoded; the header records the smallest valid share
that was encoded, so a later search with a stricter nodata limit reuses the entry and a more
lenient one recomputes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import OutputError

__all__ = ["CACHE_VERSION", "EmbeddingCache", "CachedEmbeddings", "CacheWriter", "cache_key", "model_fingerprint",
           "file_sha256"]

# Bump when reading, resampling or normalising patches changes: old entries then miss.
CACHE_VERSION = 2  # 2: invalid pixels filled with the cell's valid mean (was 0.5)

_SHA_MEMO: dict[tuple, str] = {}


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
    """Identity of an encoder's weights: its file's SHA-256, or a hash of its tensors."""
    if encoder.path and os.path.isfile(encoder.path):
        return "file:" + file_sha256(encoder.path)
    h = hashlib.sha256(encoder.metadata.to_json().encode())
    for name, tensor in sorted(encoder.network.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return "weights:" + h.hexdigest()


def cache_key(raster: str, grid, band: int | None, model_id: str, precision: str = "fp32") -> tuple[str, dict]:
    """The key of a search's embeddings and the facts it was made from."""
    st = os.stat(raster)
    cells = hashlib.sha256(np.ascontiguousarray(grid.rows, dtype=np.int32).tobytes()
                           + np.ascontiguousarray(grid.cols, dtype=np.int32).tobytes()).hexdigest()
    facts = {
        "version": CACHE_VERSION,
        "raster": os.path.abspath(raster), "raster_size": st.st_size, "raster_mtime_ns": st.st_mtime_ns,
        "grid": {"crs": grid.crs_wkt, "origin": [repr(grid.origin_x), repr(grid.origin_y)],
                 "cell": [repr(grid.cell_w), repr(grid.cell_h)], "step": [repr(grid.step_x), repr(grid.step_y)],
                 "shape": [grid.n_rows, grid.n_cols], "cells": len(grid), "kept": cells},
        "band": band, "model": model_id, "precision": precision,
    }
    key = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]
    return key, facts


@dataclass
class CachedEmbeddings:
    """A cache entry read back: memory-mapped arrays and its header."""

    embeddings: np.ndarray  # (N, D) float32, memory-mapped, NaN rows not encoded
    valid_fraction: np.ndarray  # (N,) float32
    header: dict


class CacheWriter:
    """Fills a new cache entry batch by batch, then commits it.

    Batches come in cell order and their embeddings are appended to the file as they come
    (NaN rows for cells that were not encoded), so the entry costs no memory: a memory-mapped
    array would keep every page written resident until the end.
    """

    def __init__(self, cache: EmbeddingCache, key: str, n: int, dim: int, facts: dict) -> None:
        self.cache, self.key, self.facts = cache, key, facts
        self.n, self.dim = n, dim
        tag = f".partial-{os.getpid()}-{id(self):x}"
        self.tmp_emb = cache.folder / f"{key}.emb{tag}.npy"
        self.tmp_valid = cache.folder / f"{key}.valid{tag}.npy"
        self.valid = np.zeros(n, dtype=np.float32)
        self._next = 0
        self._file = open(self.tmp_emb, "wb")  # closed in commit() or discard()
        try:
            np.lib.format.write_array_header_1_0(
                self._file, {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False,
                             "shape": (n, dim)})
        except OSError:
            self.discard()
            raise

    def store(self, idx: np.ndarray, valid: np.ndarray, ok: np.ndarray, embeddings: np.ndarray | None) -> None:
        """Record a batch: valid shares of cells ``idx`` (the next cells, in order) and the
        embeddings of ``idx[ok]``."""
        idx = np.asarray(idx)
        if idx.size == 0:
            return
        if idx[0] != self._next or idx[-1] - idx[0] + 1 != idx.size:
            raise ValueError(f"cache batches must come in cell order: expected cell {self._next}, got {idx[0]}")
        self.valid[idx] = valid
        rows = np.full((idx.size, self.dim), np.nan, dtype="<f4")
        if embeddings is not None and len(embeddings):
            rows[ok] = embeddings
        self._file.write(rows.tobytes())
        self._next = int(idx[-1]) + 1

    def commit(self, min_valid: float) -> None:
        """Move the files into place and write the header (which makes the entry visible)."""
        if self._next != self.n:
            raise ValueError(f"the cache entry is incomplete: {self._next} of {self.n} cells")
        self._file.close()
        np.save(self.tmp_valid, self.valid)
        folder = self.cache.folder
        os.replace(self.tmp_emb, folder / f"{self.key}.emb.npy")
        os.replace(self.tmp_valid, folder / f"{self.key}.valid.npy")
        header = {**self.facts, "cells": self.n, "embedding_dim": self.dim, "min_valid": float(min_valid),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        tmp = folder / f"{self.key}.json.partial-{os.getpid()}"
        tmp.write_text(json.dumps(header, indent=1, sort_keys=True))
        os.replace(tmp, folder / f"{self.key}.json")

    def discard(self) -> None:
        """Drop an unfinished entry (cancel or error)."""
        self._file.close()
        for p in (self.tmp_emb, self.tmp_valid):
            with contextlib.suppress(OSError):
                p.unlink()


class EmbeddingCache:
    """A folder of cached embeddings (see the module docstring)."""

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

    def lookup(self, key: str, n: int, dim: int, min_valid: float) -> CachedEmbeddings | None:
        """The entry for ``key`` when it exists, fits (``n`` cells, ``dim``) and covers ``min_valid``."""
        head = self.folder / f"{key}.json"
        try:
            header = json.loads(head.read_text())
            if header.get("cells") != n or header.get("embedding_dim") != dim:
                return None
            if float(header.get("min_valid", 1.0)) > min_valid + 1e-9:
                return None  # cells this search needs were skipped when the entry was made
            emb = np.load(self.folder / f"{key}.emb.npy", mmap_mode="r")
            valid = np.load(self.folder / f"{key}.valid.npy", mmap_mode="r")
        except (OSError, ValueError):
            return None
        if emb.shape != (n, dim) or valid.shape != (n,):
            return None
        return CachedEmbeddings(emb, valid, header)

    def writer(self, key: str, n: int, dim: int, facts: dict) -> CacheWriter:
        """Start a new entry."""
        try:
            return CacheWriter(self, key, n, dim, facts)
        except OSError as exc:
            raise OutputError(f"Cannot write the embedding cache in '{self.folder}': {exc.strerror or exc}",
                              "Free some disk space or choose another cache folder") from exc
