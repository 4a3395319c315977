"""Pure helpers: the dialog's parameters, the cell-size guess and the status text."""

from __future__ import annotations

import pytest

from siamese_analog_plugin.engine.grid import estimate_cell_count
from siamese_analog_plugin.gui.parameters import (
    REMEMBERED_PARAMETERS,
    area_status_message,
    build_dialog_parameters,
    estimate_cell_size,
    reference_paths,
    reference_value,
)

from .conftest import BAHAMAS, GANGES, HIRISE


class TestBuildDialogParameters:
    def test_fills_input_area_and_remembered_settings(self):
        last = {"REFERENCE": ["/m/a.tif", "/m/b.png"], "CELL_SIZE": 500.0, "STRIDE": 250.0, "MIN_COVERAGE": 0.7,
                "MODEL": "/models/x.pt", "DEVICE": "cpu", "BATCH_SIZE": 32}
        params = build_dialog_parameters("raster_id", "area_id", last)
        assert params == {"INPUT": "raster_id", "AREA": "area_id", **last}

    def test_leaves_unknown_and_empty_values_to_the_dialog(self):
        params = build_dialog_parameters(None, "area_id", {"CELL_SIZE": "", "OUTPUT_RASTER": "/tmp/x.tif",
                                                           "REFERENCE": [], "DEVICE": None})
        assert params == {"AREA": "area_id"}

    def test_reference_shape_follows_the_parameter(self):
        last = {"REFERENCE": ["/m/a.tif", "/m/b.png"]}
        assert build_dialog_parameters(None, None, last, reference_multiple=True)["REFERENCE"] == ["/m/a.tif",
                                                                                                   "/m/b.png"]
        assert build_dialog_parameters(None, None, last, reference_multiple=False)["REFERENCE"] == "/m/a.tif;/m/b.png"

    def test_reference_values(self):
        assert reference_paths("/a.tif; /b.tif;") == ["/a.tif", "/b.tif"]
        assert reference_paths(None) == [] and reference_value("", True) is None
        assert reference_value("/a.tif", multiple=True) == ["/a.tif"]
        assert "REFERENCE" in REMEMBERED_PARAMETERS and "INPUT" not in REMEMBERED_PARAMETERS


class TestEstimateCellSize:
    def test_last_used_cell_size_wins(self):
        assert estimate_cell_size({"CELL_SIZE": 750, "REFERENCE": [str(GANGES)]}, str(BAHAMAS)) == (750.0, "last used")

    def test_georeferenced_reference_gives_what_the_search_uses(self):
        """One default for the tool and the run: the reference's 2 km are 6.7 Landsat pixels, so
        both use 32 pixels (9.6 km), and say why."""
        from siamese_analog_plugin.engine.imagery import describe_raster, load_references
        from siamese_analog_plugin.engine.search import default_cell_size_m

        size, why = estimate_cell_size({"REFERENCE": [str(GANGES)]}, str(BAHAMAS))
        engine, _ = default_cell_size_m(describe_raster(str(BAHAMAS)), load_references([str(GANGES)], 32))
        assert size == pytest.approx(engine) == pytest.approx(32 * 300.04, rel=1e-3)
        assert "32 imagery pixels" in why and "6.7 pixels" in why

    def test_before_any_reference_the_estimate_is_the_minimum_the_run_can_use(self):
        size, why = estimate_cell_size({}, str(BAHAMAS))
        assert size == pytest.approx(32 * 300.04, rel=1e-3) and "at least 32 imagery pixels" in why

    def test_plain_images_fall_back_to_100_raster_pixels(self):
        size, why = estimate_cell_size({"REFERENCE": [str(h) for h in HIRISE]}, str(BAHAMAS))
        assert size == pytest.approx(100 * 300.04, rel=1e-3) and "100 raster pixels" in why

    def test_unknown_without_raster_or_setting(self):
        size, why = estimate_cell_size({}, None)
        assert size is None and "cell size" in why
        assert estimate_cell_size({"CELL_SIZE": -5}, "/no/such.tif")[0] is None


class TestStatusMessage:
    def test_counts_cells_like_the_engine(self):
        text, cells, too_many = area_status_message(2.5e9, 4, 6000.0, None, "last used")
        assert cells == estimate_cell_count(2.5e9, 6000.0) == 69
        assert "2,500.0 km²" in text and "≈ 69 cells of 6,000 m (last used)" in text and not too_many
        assert text.index("cells") < text.index("km²")  # the count first: the status bar is narrow

    def test_stride_counts(self):
        _, cells, _ = area_status_message(1e8, 5, 1000.0, 500.0)
        assert cells == 400

    def test_too_large(self):
        text, cells, too_many = area_status_message(1e12, 4, 100.0, max_cells=1_000_000)
        assert too_many and cells == 100_000_000 and "TOO LARGE" in text and "larger cell size" in text

    def test_not_a_polygon_yet(self):
        text, cells, too_many = area_status_message(None, 2, 100.0)
        assert cells is None and not too_many and "2 corners" in text and "Esc" in text

    def test_no_cell_size(self):
        text, cells, _ = area_status_message(5e5, 3, None, cell_size_why="choose a cell size in the dialog")
        assert cells is None and "500,000 m²" in text and "choose a cell size" in text
