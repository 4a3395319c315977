"""The algorithms in QGIS's batch dialog: many references (or rasters) in one go."""

from __future__ import annotations

import pytest

from ..conftest import PROVIDER_ID, SAMPLE_HIRISE, SAMPLE_RASTER, SAMPLE_REFERENCE
from .conftest import FAST_CELL_M, raster_info


@pytest.fixture
def batch_dialog(analog_provider, qgis_iface, qgis_new_project):
    """QGIS's own batch dialog for ``findanalogs``, closed afterwards."""
    from processing.gui.BatchAlgorithmDialog import BatchAlgorithmDialog
    from qgis.core import QgsApplication

    alg = QgsApplication.processingRegistry().createAlgorithmById(f"{PROVIDER_ID}:findanalogs")
    dialog = BatchAlgorithmDialog(alg, parent=qgis_iface.mainWindow())
    try:
        yield dialog
    finally:
        dialog.close()
        dialog.deleteLater()
        qgis_new_project.removeAllMapLayers()


def _fill(panel, row: int, values: dict, outputs: dict) -> None:
    from processing.tools import dataobjects

    context = dataobjects.createContext()
    for name, value in values.items():
        panel.wrappers[row][panel.parameter_to_column[name]].setParameterValue(value, context)
    for name, path in outputs.items():
        panel.tblParameters.cellWidget(row + 1, panel.parameter_to_column[name]).setValue(path)


def test_batch_dialog_runs_one_search_per_reference(batch_dialog, tiny_model_path, tmp_path):
    panel = batch_dialog.mainWidget()
    references = [SAMPLE_REFERENCE, *SAMPLE_HIRISE]
    panel.addRow(len(references) - 1)
    assert panel.batchRowCount() == len(references)
    for row, ref in enumerate(references):
        _fill(panel, row,
              {"INPUT": str(SAMPLE_RASTER), "REFERENCE": [str(ref)], "CELL_SIZE": FAST_CELL_M,
               "MODEL": tiny_model_path, "DEVICE": "cpu"},
              {"OUTPUT_RASTER": str(tmp_path / f"d{row}.tif"), "OUTPUT_CELLS": str(tmp_path / f"c{row}.gpkg")})
    parameters, ok = panel.parametersForRow(1, warnOnInvalid=True)
    assert ok, "the batch table refused row 2's values"
    assert parameters["REFERENCE"] == [str(SAMPLE_HIRISE[0])]
    panel.checkLoadLayersOnCompletion.setChecked(False)

    batch_dialog.runAlgorithm()

    rasters = []
    for row in range(len(references)):
        crs, extent, width, height, data = raster_info(str(tmp_path / f"d{row}.tif"))
        assert crs == "EPSG:32618" and (width, height) == (11, 10)
        assert (tmp_path / f"c{row}.gpkg").exists()
        rasters.append(data)
    # Different references give different maps over the same cells.
    import numpy as np

    assert not np.allclose(np.nan_to_num(rasters[0]), np.nan_to_num(rasters[1]))


def test_every_algorithm_opens_in_the_batch_dialog(analog_provider, qgis_iface):
    """The batch table gets a widget for every input of every algorithm (models use the same widgets)."""
    from processing.gui.BatchAlgorithmDialog import BatchAlgorithmDialog
    from qgis.core import QgsApplication

    checked = 0
    for alg in analog_provider.algorithms():
        instance = QgsApplication.processingRegistry().createAlgorithmById(alg.id())
        dialog = BatchAlgorithmDialog(instance, parent=qgis_iface.mainWindow())
        try:
            panel = dialog.mainWidget()
            inputs = [p for p in instance.parameterDefinitions() if not p.isDestination()]
            row = panel.wrappers[0]
            for param in inputs:
                assert row[panel.parameter_to_column[param.name()]] is not None, f"{alg.id()} {param.name()}"
            checked += 1
        finally:
            dialog.close()
            dialog.deleteLater()
    assert checked >= 3
