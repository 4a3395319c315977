"""The embedding cache: a second search of the same area only computes distances."""

from __future__ import annotations

import os

import numpy as np
import pytest
from affine import Affine

from siamese_analog_plugin.engine.embeddings import EmbeddingCache
from siamese_analog_plugin.engine.errors import OutputError, SearchCancelled
from siamese_analog_plugin.engine.feedback import Feedback
from siamese_analog_plugin.engine.imagery import GreyReader
from siamese_analog_plugin.engine.search import SearchParams, run_search

from .conftest import SAMPLE_HIRISE, SAMPLE_REFERENCE, smooth_noise, write_raster


@pytest.fixture()
def area(tmp_path):
    """600 x 400 px RGB, 10 m, a nodata corner: 24 cells of 1 km, 77 with a 500 m stride."""
    grey = smooth_noise((400, 600), seed=7)
    grey[:150, :150] = 0
    rgb = np.stack([grey, grey, (grey * 0.7).astype(np.uint8)])
    return write_raster(tmp_path / "area.tif", rgb, "EPSG:32618", Affine(10, 0, 600000, 0, -10, 2700000), nodata=0)


@pytest.fixture()
def read_counter(monkeypatch, area):
    """Counts the real reader's pixel reads of the area raster (the reads still happen)."""
    counts = {"reads": 0}
    for name in ("read_row_cells", "read_window"):
        original = getattr(GreyReader, name)

        def counted(self, *args, _original=original, **kw):
            counts["reads"] += self.path == area
            return _original(self, *args, **kw)

        monkeypatch.setattr(GreyReader, name, counted)
    return counts


def params(raster, reference, cache, **kw):
    return SearchParams(raster, reference, cell_size_m=1000, stride_m=500, device="cpu", batch_size=8,
                        cache_dir=str(cache), **kw)


class TestCache:
    def test_second_reference_reuses_embeddings_without_reading(self, area, tiny_model, tmp_path, read_counter):
        cache = tmp_path / "cache"
        first = run_search(params(area, str(SAMPLE_REFERENCE), cache, model=tiny_model))
        assert first.extra["cache"] == "miss" and read_counter["reads"] > 0
        assert [p.suffix for p in cache.iterdir()] == [".tif"]  # one embedding raster

        read_counter["reads"] = 0
        other = str(SAMPLE_HIRISE[0])
        second = run_search(params(area, other, cache, model=tiny_model), str(tmp_path / "d.tif"),
                            str(tmp_path / "c.gpkg"))
        assert second.extra["cache"] == "hit" and second.extra["cells_read"] == 0
        assert read_counter["reads"] == 0
        assert (tmp_path / "d.tif").exists() and (tmp_path / "c.gpkg").exists()

        fresh = run_search(params(area, other, tmp_path / "elsewhere", model=tiny_model))
        assert fresh.extra["cache"] == "miss"
        assert np.array_equal(second.dissimilarity, fresh.dissimilarity, equal_nan=True)
        assert np.array_equal(second.rank, fresh.rank)
        assert np.array_equal(second.valid_fraction, fresh.valid_fraction)
        assert np.isnan(second.dissimilarity).any()  # the nodata corner stays unscored

    def test_what_changes_the_embeddings_misses(self, area, tiny_model, tmp_path):
        cache = tmp_path / "cache"
        ref = str(SAMPLE_REFERENCE)
        assert run_search(params(area, ref, cache, model=tiny_model)).extra["cache"] == "miss"
        assert run_search(params(area, ref, cache, model=tiny_model)).extra["cache"] == "hit"
        # Another band, another grid, stricter and more lenient nodata limits.
        assert run_search(params(area, ref, cache, model=tiny_model, band=3)).extra["cache"] == "miss"
        shifted = SearchParams(area, ref, cell_size_m=1000, device="cpu", model=tiny_model, cache_dir=str(cache))
        assert run_search(shifted).extra["cache"] == "miss"
        assert run_search(params(area, ref, cache, model=tiny_model, max_nodata=0.1)).extra["cache"] == "hit"
        assert run_search(params(area, ref, cache, model=tiny_model, max_nodata=0.9)).extra["cache"] == "miss"
        # The raster changed on disk.
        st = os.stat(area)
        os.utime(area, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        assert run_search(params(area, ref, cache, model=tiny_model)).extra["cache"] == "miss"

    def test_another_model_misses(self, area, tiny_model, tmp_path):
        import torch

        from siamese_analog_plugin.engine.encoder import ModelMetadata, build_network, save_model

        torch.manual_seed(1)
        other = tmp_path / "other.pt"
        save_model(other, build_network("compact", 100, embedding_dim=8, widths=(4, 8)),
                   ModelMetadata("compact", 100, 8, {"widths": [4, 8]}))
        cache = tmp_path / "cache"
        ref = str(SAMPLE_REFERENCE)
        run_search(params(area, ref, cache, model=tiny_model))
        assert run_search(params(area, ref, cache, model=str(other))).extra["cache"] == "miss"
        assert len(list(cache.glob("*.emb.tif"))) == 2

    def test_cancel_leaves_no_entry(self, area, tiny_model, tmp_path):
        class CancelHalfway(Feedback):
            seen = 0.0

            def progress(self, fraction, message=""):
                self.seen = fraction

            def cancelled(self):
                return self.seen >= 0.4

        cache = tmp_path / "cache"
        with pytest.raises(SearchCancelled):
            run_search(params(area, str(SAMPLE_REFERENCE), cache, model=tiny_model), feedback=CancelHalfway())
        assert list(cache.iterdir()) == []
        assert run_search(params(area, str(SAMPLE_REFERENCE), cache, model=tiny_model)).extra["cache"] == "miss"

    def test_unusable_cache_folder_is_named(self, area, tiny_model, tmp_path):
        blocker = tmp_path / "file"
        blocker.write_text("not a folder")
        with pytest.raises(OutputError, match="cache folder"):
            run_search(params(area, str(SAMPLE_REFERENCE), blocker / "cache", model=tiny_model))
        with pytest.raises(OutputError, match="cache folder"):
            EmbeddingCache(blocker)
