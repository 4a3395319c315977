"""The Find similar cells tool on the pytest-qgis canvas, driven by simulated clicks."""

from __future__ import annotations

import numpy as np
import pytest
from qgis.core import Qgis, QgsProject, QgsRasterLayer
from qgis.PyQt.QtCore import Qt

from .conftest import BAHAMAS
from .helpers import click, map_point

pytestmark = pytest.mark.qgis

CELL_M = 20000.0
UTM_EXTENT = (100000, 2600000, 340000, 2830000)  # over the Bahamas sample, EPSG:32618
WIDE_EXTENT = (-100000, 2500000, 500000, 2900000)  # the sample and sea around it


@pytest.fixture(scope="module")
def embedding_raster(tiny_model_path, tmp_path_factory) -> str:
    from siamese_analog_plugin.engine.embed import EmbedParams, run_embed_area

    out = str(tmp_path_factory.mktemp("emb") / "bahamas_emb.tif")
    run_embed_area(EmbedParams(raster=str(BAHAMAS), cell_size_m=CELL_M, model=tiny_model_path, device="cpu"), out)
    return out


@pytest.fixture
def no_remembered_embeddings(qgis_app):
    from siamese_analog_plugin.embedding_layers import forget_embeddings

    forget_embeddings()
    yield
    forget_embeddings()


@pytest.fixture
def tool(set_canvas, project, qgis_iface, no_remembered_embeddings):
    from siamese_analog_plugin.gui.similar_tool import SimilarCellsTool

    qgis_iface.messageBar().clear_messages()
    canvas = set_canvas("EPSG:32618", UTM_EXTENT)
    t = SimilarCellsTool(canvas, qgis_iface)
    canvas.setMapTool(t)
    try:
        yield t
    finally:
        canvas.unsetMapTool(t)
        t.deleteLater()


def read(path: str) -> np.ndarray:
    import rasterio

    with rasterio.open(path) as ds:
        return ds.read(1, masked=True).astype("float64").filled(np.nan)


def expected_similarity(embeddings: str, x: float, y: float, crs: str, out: str) -> np.ndarray:
    from siamese_analog_plugin.engine.similar import SimilarParams, run_similar

    run_similar(SimilarParams(embeddings=embeddings, points=[(x, y)], crs=crs), out)
    return read(out)


def similar_layers() -> list[QgsRasterLayer]:
    return [lyr for lyr in QgsProject.instance().mapLayers().values() if lyr.name().startswith("Similar to cell")]


class TestClick:
    def test_click_on_an_embedding_layer_adds_the_similarity_of_that_cell(self, tool, embedding_raster, qgis_iface,
                                                                         tmp_path):
        from qgis.core import QgsSingleBandPseudoColorRenderer

        emb_layer = QgsRasterLayer(embedding_raster, "embeddings")
        QgsProject.instance().addMapLayer(emb_layer)
        qgis_iface.setActiveLayer(emb_layer)
        canvas = tool.canvas()
        click(tool, canvas, 300, 200)
        layers = similar_layers()
        assert len(layers) == 1
        layer = layers[0]
        assert layer is tool.last_layer and layer.isValid()
        p = map_point(canvas, 300, 200)
        want = expected_similarity(embedding_raster, p.x(), p.y(), "EPSG:32618", str(tmp_path / "want.tif"))
        got = read(layer.source())
        assert got.shape == want.shape == (10, 11)
        assert np.array_equal(np.isnan(got), np.isnan(want))
        assert np.allclose(got[np.isfinite(got)], want[np.isfinite(want)], atol=1e-7)
        # The clicked cell is the most alike (distance 0), and the layer is named after it.
        from siamese_analog_plugin.engine.embeddings import EmbeddingRaster

        source = EmbeddingRaster.open(embedding_raster)
        index = source.cell_at(p.x(), p.y())
        assert layer.name() == f"Similar to cell {int(source.grid.ids[index])}"
        assert got[int(source.grid.rows[index]), int(source.grid.cols[index])] == pytest.approx(0.0, abs=1e-6)
        # Styled as the plugin's results: red = low, with "more alike" in the legend.
        assert isinstance(layer.renderer(), QgsSingleBandPseudoColorRenderer)
        legend = layer.renderer().shader().rasterShaderFunction().legendSettings()
        assert "more alike" in legend.minimumLabel()
        assert tool.marker.numberOfVertices() >= 4  # the clicked cell outlined
        assert any("Similar to cell" in m for m in qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Info))

    def test_canvas_in_another_crs_queries_the_cell_under_the_click(self, set_canvas, tool, embedding_raster,
                                                                     qgis_iface, tmp_path):
        from siamese_analog_plugin.embedding_layers import remember_embeddings

        remember_embeddings(embedding_raster)  # no embedding layer: the last one remembered is used
        canvas = set_canvas("EPSG:4326", (-79.0, 23.6, -76.6, 25.6))
        click(tool, canvas, 250, 220)
        layer = tool.last_layer
        assert layer is not None and layer in similar_layers()
        p = map_point(canvas, 250, 220)
        want = expected_similarity(embedding_raster, p.x(), p.y(), "EPSG:4326", str(tmp_path / "want.tif"))
        got = read(layer.source())
        assert np.allclose(np.nan_to_num(got, nan=-1), np.nan_to_num(want, nan=-1), atol=1e-7)

    def test_a_result_layer_queries_the_embeddings_it_came_from(self, tool, embedding_raster, qgis_iface):
        """A click while a search result (or a similarity layer) is active queries its embeddings."""
        from siamese_analog_plugin.embedding_layers import EMBEDDINGS_PROPERTY, forget_embeddings

        result = QgsRasterLayer(str(BAHAMAS), "a search result")
        result.setCustomProperty(EMBEDDINGS_PROPERTY, embedding_raster)
        QgsProject.instance().addMapLayer(result)
        qgis_iface.setActiveLayer(result)
        first = tool.find_similar(map_point(tool.canvas(), 300, 200))
        assert first is not None
        forget_embeddings()
        qgis_iface.setActiveLayer(first)  # the similarity layer carries its embeddings too
        second = tool.find_similar(map_point(tool.canvas(), 380, 260))
        assert second is not None, tool.last_message
        assert second.name() != first.name()
        assert len(similar_layers()) == 2


class TestNothingToQuery:
    def test_click_outside_the_embedded_area_says_so_and_adds_nothing(self, set_canvas, tool, embedding_raster,
                                                                      qgis_iface):
        emb_layer = QgsRasterLayer(embedding_raster, "embeddings")
        QgsProject.instance().addMapLayer(emb_layer)
        qgis_iface.setActiveLayer(emb_layer)
        canvas = set_canvas("EPSG:32618", WIDE_EXTENT)
        before = len(QgsProject.instance().mapLayers())
        click(tool, canvas, 5, 5)
        assert similar_layers() == [] and len(QgsProject.instance().mapLayers()) == before
        assert tool.last_layer is None
        warnings = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Warning)
        assert any("outside the embedding raster" in m for m in warnings)

    def test_a_cell_that_was_not_encoded_says_so(self, tool, embedding_raster, qgis_iface):
        from siamese_analog_plugin.embedding_layers import remember_embeddings

        remember_embeddings(embedding_raster)
        click(tool, tool.canvas(), 100, 100)  # a mostly-nodata cell of the sample
        assert similar_layers() == []
        assert "was not encoded" in tool.last_message

    def test_no_embedding_raster_says_what_to_do(self, tool, bahamas, qgis_iface):
        from siamese_analog_plugin.gui.similar_tool import NO_EMBEDDINGS

        qgis_iface.setActiveLayer(bahamas)  # imagery, not an embedding raster
        click(tool, tool.canvas(), 300, 200)
        assert similar_layers() == []
        assert tool.last_message == NO_EMBEDDINGS
        assert any("Embed area" in m for m in qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Warning))

    def test_right_click_does_nothing(self, tool, embedding_raster, qgis_iface):
        from siamese_analog_plugin.embedding_layers import remember_embeddings

        remember_embeddings(embedding_raster)
        click(tool, tool.canvas(), 300, 200, button=Qt.MouseButton.RightButton)
        assert similar_layers() == [] and tool.last_message == ""


class TestAction:
    def test_action_in_menu_and_toolbar_activates_the_tool(self, gui):
        from siamese_analog_plugin.gui.similar_tool import SimilarCellsTool

        action = gui.similar.action
        assert action in gui.plugin.toolbar.actions()
        action.trigger()
        assert isinstance(gui.canvas.mapTool(), SimilarCellsTool)
        assert action.isChecked()
        gui.unload()
        assert action not in gui.plugin.toolbar.actions()
