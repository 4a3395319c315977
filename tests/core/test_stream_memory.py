"""Memory while streaming depends on the batch size, not on the number of cells read.

Measured with tracemalloc, which counts NumPy's arrays: no timing involved.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from affine import Affine

from siamese_analog_plugin.core.search import SearchParams, iter_patch_batches, plan_grid

from .conftest import smooth_noise, write_raster


def test_memory_stays_flat_over_many_batches_and_reader_reopens(tmp_path):
    """Readers reopen the raster after every batch here (as they do every few MB in a search);
    the memory held after the last batch is no more than after the first few."""
    grey = np.maximum(smooth_noise((1000, 2000), seed=11), 1)
    grey[:100, :300] = 0  # some nodata, so validity masks are made too
    raster = write_raster(tmp_path / "wide.tif", grey, "EPSG:32618", Affine(10, 0, 600000, 0, -10, 2700000), nodata=0)
    _, grid = plan_grid(SearchParams(raster, None, cell_size_m=1000))  # 200 cells of 100 x 100 px
    held = []
    tracemalloc.start()
    try:
        for idx, patches, valid in iter_patch_batches(raster, grid, 100, 10, threads=2, reopen_bytes=1):
            del idx, patches, valid
            held.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    assert len(held) == 20
    batch_bytes = 10 * 100 * 100 * 4
    # Up to threads + prefetch batches are in flight at any time, so compare the highest
    # points of the two halves. Every reopen used to leave its read buffers behind (~0.9 MB
    # each here): the second half then held ~9 MB more.
    assert max(held[10:]) - max(held[:10]) < 2 * batch_bytes


def test_cache_entries_are_appended_batch_by_batch_in_cell_order(tmp_path):
    """The embedding cache writes each batch to its file as it comes (NaN rows for cells that
    were not encoded) instead of holding a map of the whole entry."""
    from siamese_analog_plugin.core.cache import EmbeddingCache

    cache = EmbeddingCache(tmp_path / "cache")
    rng = np.random.default_rng(3)
    emb = rng.random((25, 4)).astype(np.float32)
    valid = rng.random(25).astype(np.float32)
    writer = cache.writer("k" * 32, 25, 4, {"what": "test"})
    for start in range(0, 25, 10):
        idx = np.arange(start, min(start + 10, 25))
        ok = valid[idx] >= 0.5
        writer.store(idx, valid[idx], ok, emb[idx][ok])
    writer.commit(0.5)
    hit = cache.lookup("k" * 32, 25, 4, 0.5)
    assert hit is not None and np.array_equal(hit.valid_fraction, valid)
    ok = valid >= 0.5
    assert np.array_equal(hit.embeddings[ok], emb[ok]) and np.isnan(hit.embeddings[~ok]).all()

    other = cache.writer("j" * 32, 25, 4, {})
    other.store(np.arange(0, 10), valid[:10], valid[:10] >= 0.5, emb[:10][valid[:10] >= 0.5])
    with pytest.raises(ValueError, match="cell order"):
        other.store(np.arange(20, 25), valid[20:], valid[20:] >= 0.5, None)
    other.discard()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        f"{'k' * 32}{suffix}" for suffix in (".emb.npy", ".valid.npy", ".json"))
