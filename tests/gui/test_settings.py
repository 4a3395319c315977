"""Last-used reference and settings survive in QgsSettings under siamese_analog/."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.qgis


def test_round_trip_keeps_types(clean_settings):
    from qgis.core import QgsSettings

    from siamese_analog_plugin.gui.settings import load_last_used, save_last_used

    values = {"REFERENCE": ["/m/a.tif", "/m/b.jpg"], "CELL_SIZE": 6000.0, "STRIDE": 3000, "MIN_COVERAGE": 0.5,
              "MODEL": "/models/m.pt", "DEVICE": "cuda:0", "BATCH_SIZE": 64}
    stored = save_last_used({**values, "INPUT": "layer_id", "OUTPUT_RASTER": "/tmp/o.tif"})
    assert stored == values
    QgsSettings().sync()
    assert load_last_used(QgsSettings()) == values  # a fresh QgsSettings reads them back, types intact
    assert QgsSettings().value("siamese_analog/last/CELL_SIZE") == "6000.0"
    assert QgsSettings().value("siamese_analog/last/INPUT") is None  # never the place searched


def test_skips_values_that_are_not_plain_data(clean_settings):
    from qgis.core import QgsProcessingFeatureSourceDefinition

    from siamese_analog_plugin.gui.settings import load_last_used, save_last_used

    stored = save_last_used({"REFERENCE": QgsProcessingFeatureSourceDefinition("x"), "CELL_SIZE": None,
                             "DEVICE": "cpu"})
    assert stored == {"DEVICE": "cpu"} and load_last_used() == {"DEVICE": "cpu"}


def test_ignores_garbage_and_clears(clean_settings):
    from qgis.core import QgsSettings

    from siamese_analog_plugin.gui.settings import clear_last_used, load_last_used, save_last_used

    QgsSettings().setValue("siamese_analog/last/CELL_SIZE", "{not json")
    save_last_used({"DEVICE": "cpu"})
    assert load_last_used() == {"DEVICE": "cpu"}
    clear_last_used()
    assert load_last_used() == {}
