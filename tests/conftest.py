"""Shared QGIS fixtures (pytest-qgis): the Processing provider, sample data, a tiny real model.

Plugin modules are imported inside fixtures, never at the top of this file: importing them
before pytest-qgis patches ``qgis.utils.iface`` would bind the real (``None``) iface.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_RASTER = ROOT / "resources" / "earth" / "landsat_bahamas_rgb_300m.tif"  # WGS 84 / UTM 18N, 300 m
SAMPLE_REFERENCE = ROOT / "resources" / "mars" / "ganges_chasma_dunes_ctx_7m.tif"  # Mars Sinusoidal, 7 m
SAMPLE_HIRISE = sorted((ROOT / "resources" / "mars").glob("hirise_*.jpg"))  # not georeferenced
PROVIDER_ID = "siameseanalog"


def pytest_report_header(config) -> list[str]:
    """QGIS, GDAL, Qt and torch versions at the top of the report: failures explain themselves."""
    lines = []
    try:
        from osgeo import gdal
        from qgis.core import Qgis
        from qgis.PyQt.QtCore import QT_VERSION_STR

        lines.append(f"QGIS {Qgis.QGIS_VERSION}, GDAL {gdal.__version__}, Qt {QT_VERSION_STR}")
    except ImportError:
        lines.append("QGIS: not importable")
    try:
        import torch

        lines.append(f"torch {torch.__version__} (cuda available: {torch.cuda.is_available()})")
    except ImportError:
        lines.append("torch: not installed")
    return lines


@pytest.fixture(scope="session", autouse=True)
def qgis_log_to_logging(qgis_app):
    """Route QGIS's message log into Python logging, so pytest shows it beside a failure."""
    from qgis.core import Qgis, QgsApplication

    logger = logging.getLogger("qgis")
    levels = {Qgis.MessageLevel.Info: logging.INFO, Qgis.MessageLevel.Warning: logging.WARNING,
              Qgis.MessageLevel.Critical: logging.ERROR}

    def forward(message, tag, level):
        logger.log(levels.get(level, logging.INFO), "[%s] %s", tag, message)

    log = QgsApplication.messageLog()
    log.messageReceived.connect(forward)
    yield
    try:
        log.messageReceived.disconnect(forward)
    except TypeError:
        pass


@pytest.fixture
def analog_provider(qgis_processing):
    """The plugin's Processing provider, registered for one test and removed afterwards.

    pytest-qgis initialises Processing but does not know this plugin: this adds the provider
    (unless a loaded plugin already did) so ``processing.run("siameseanalog:...")`` works.
    """
    from qgis.core import QgsApplication

    from siamese_analog_plugin.processing.provider import SiameseAnalogProvider

    registry = QgsApplication.processingRegistry()
    existing = registry.providerById(PROVIDER_ID)
    if existing is not None:  # left by a plugin test: use it as is
        yield existing
        return
    provider = SiameseAnalogProvider()
    assert registry.addProvider(provider), "the siameseanalog provider could not be registered"
    try:
        yield provider
    finally:
        if registry.providerById(PROVIDER_ID) is provider:
            registry.removeProvider(provider)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    """A real (untrained, seeded) compact encoder saved in the model format: fast on CPU."""
    import torch

    from siamese_analog_plugin.engine.encoder import ModelMetadata, build_network, save_model

    torch.manual_seed(0)
    # Tiny and untrained; the whole-patch pooling keeps the few-shot tests' separations stable.
    net = build_network("compact", 100, embedding_dim=8, widths=(4, 8), pooling="meanstd")
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_model(path, net, ModelMetadata("compact", 100, 8, {"widths": [4, 8], "pooling": "meanstd"},
                                        training={"note": "test"}))
    return str(path)


@pytest.fixture
def sample_raster_layer():
    """The Bahamas Landsat sample as a QgsRasterLayer (not added to any project)."""
    from qgis.core import QgsRasterLayer

    layer = QgsRasterLayer(str(SAMPLE_RASTER), "bahamas")
    assert layer.isValid()
    return layer
