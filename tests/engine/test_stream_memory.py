"""Memory while streaming depends on the batch size, not on the number of cells read.

Measured with tracemalloc, which counts NumPy's arrays: no timing involved.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
from affine import Affine

from siamese_analog_plugin.engine.embeddings import EmbeddingFacts, _grid_facts
from siamese_analog_plugin.engine.search import SearchParams, iter_patch_batches, plan_grid

from .conftest import smooth_noise, write_raster


def test_memory_stays_flat_over_many_batches_and_reader_reopens(tmp_path):
    """Readers reopen the raster after every grid row here (as they do every few MB in a search);
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


def test_the_embedding_writer_holds_one_strip_of_tiles_whatever_the_cell_count(tmp_path):
    """The embedding raster is written a strip of tiles at a time: its buffer depends on the
    grid's width, not on how many cells come, and each strip is written once it is complete."""
    from siamese_analog_plugin.engine.embeddings import BLOCK, EmbeddingRaster, EmbeddingRasterWriter

    grey = smooth_noise((2 * BLOCK + 40, 50), seed=2)
    path = write_raster(tmp_path / "r.tif", grey, "EPSG:32618", Affine(10, 0, 600000, 0, -10, 2700000))
    _, grid = plan_grid(SearchParams(path, None, cell_size_m=10))  # one cell a pixel: 296 rows of 50
    facts = EmbeddingFacts(model="x", model_path="", input_size=100, normalisation={}, embedding_dim=4, raster=path,
                           raster_size=0, raster_mtime_ns=0, band=None, cell_size_m=10.0, stride_m=10.0,
                           min_coverage=0.5, area_wkt=grid.area.wkt, grid=_grid_facts(grid), min_valid=0.5)
    w = EmbeddingRasterWriter(tmp_path / "e.tif", grid, facts)
    rng = np.random.default_rng(0)
    emb = rng.random((len(grid), 4)).astype(np.float32)
    strips = []
    for start in range(0, len(grid), 1000):
        idx = np.arange(start, min(start + 1000, len(grid)))
        w.store(idx, np.ones(idx.size, np.float32), np.ones(idx.size, bool), emb[idx])
        assert w._strip.shape == (BLOCK, 50, 5)  # never more than one strip of tiles
        strips.append(w._row0)
    w.close()
    assert strips[-1] == 2 * BLOCK and sorted(strips) == strips  # strips written as their rows completed
    _, back = EmbeddingRaster.open(tmp_path / "e.tif").read_all()
    assert np.array_equal(back, emb.astype(np.float16).astype(np.float32))


def test_readers_reopen_when_their_strips_leave_the_blocks_they_cached(tmp_path, monkeypatch):
    """Past ``reopen_bytes``, a reader reopens (dropping GDAL's cached blocks) when its next strip
    starts below every row of blocks it read, not before: the strip after would read them
    again. The batches are those read without reopening."""
    import rasterio

    from siamese_analog_plugin.engine.imagery import GreyReader

    path = str(tmp_path / "tiled.tif")
    grey = np.maximum(smooth_noise((512, 512), seed=3), 1)
    with rasterio.open(path, "w", driver="GTiff", width=512, height=512, count=1, dtype="uint8", crs="EPSG:32618",
                       transform=Affine(10, 0, 600000, 0, -10, 2700000), tiled=True, blockxsize=64,
                       blockysize=64) as dst:
        dst.write(grey, 1)
    _, grid = plan_grid(SearchParams(path, None, cell_size_m=320))  # 16 x 16 cells of 32 px: 2 strips a block row
    reopened = []
    reopen = GreyReader.reopen

    def counted(self):
        reopened.append(1)
        reopen(self)

    monkeypatch.setattr(GreyReader, "reopen", counted)
    tight = list(iter_patch_batches(path, grid, 32, 16, threads=1, reopen_bytes=1))
    assert len(reopened) == 7  # before strips 2, 4, ..., 14: each a new row of 64 px blocks
    reopened.clear()
    loose = list(iter_patch_batches(path, grid, 32, 16, threads=1, reopen_bytes=float("inf")))
    assert not reopened and len(tight) == len(loose) == 16
    for (i1, p1, v1), (i2, p2, v2) in zip(tight, loose):
        assert np.array_equal(i1, i2) and np.array_equal(p1, p2) and np.array_equal(v1, v2)
