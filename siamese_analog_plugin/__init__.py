"""Siamese Analog Finder: find the places on Earth whose ground looks like a patch of Mars.

QGIS calls :func:`classFactory`; everything else works without QGIS: the engine (``engine``:
cells -> patches -> embeddings -> queries -> outputs), the learning side (``learning``: training,
evaluation, transfer) and the command line (``cli``).
"""

__version__ = "0.1.0"


def classFactory(iface):  # noqa: N802 - name fixed by QGIS
    """QGIS entry point: build the plugin (imported lazily so the engine never needs QGIS)."""
    from .plugin import SiameseAnalogPlugin

    return SiameseAnalogPlugin(iface)
