"""Picture of the Find similar cells tool for the docs: embed the sample, click a cell, render the map.

Usage (headless): QT_QPA_PLATFORM=offscreen .venv/bin/python scripts/screenshot_similar_tool.py OUT.png
It embeds the Bahamas sample in 6 km cells with the shipped model (into a temporary folder),
drives the real map tool with a simulated click on a shallow bank, and renders the imagery with
the "Similar to cell N" layer and the clicked cell outlined.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RASTER = ROOT / "resources" / "earth" / "landsat_bahamas_rgb_300m.tif"
CLICK_UTM = (228000.0, 2745000.0)  # on the Great Bahama Bank, west of Andros (EPSG:32618)


def main(out_png: str) -> None:
    from qgis.core import (
        QgsApplication,
        QgsCoordinateReferenceSystem,
        QgsMapRendererParallelJob,
        QgsMapSettings,
        QgsPointXY,
        QgsProject,
        QgsRasterLayer,
        QgsRectangle,
    )
    from qgis.gui import QgsMapCanvas, QgsMessageBar
    from qgis.PyQt.QtCore import QPointF, QSize, Qt
    from qgis.PyQt.QtGui import QColor, QFont, QImage, QPainter, QPen

    app = QgsApplication([], True)
    app.initQgis()
    from siamese_analog_plugin.engine.embed import EmbedParams, run_embed_area
    from siamese_analog_plugin.gui.similar_tool import SimilarCellsTool

    work = tempfile.mkdtemp(prefix="similar_shot_")
    emb = str(Path(work) / "bahamas_embeddings.tif")
    run_embed_area(EmbedParams(raster=str(RASTER), cell_size_m=6000.0, device="cpu"), emb)

    project = QgsProject.instance()
    imagery = QgsRasterLayer(str(RASTER), "Landsat, Bahamas")
    embeddings = QgsRasterLayer(emb, "Cell embeddings")
    project.addMapLayers([imagery, embeddings])

    class Iface:  # the two things the tool asks of QGIS's interface
        def __init__(self) -> None:
            self.bar = QgsMessageBar()

        def activeLayer(self):  # noqa: N802
            return embeddings

        def messageBar(self):  # noqa: N802
            return self.bar

    canvas = QgsMapCanvas()
    canvas.resize(QSize(900, 800))
    crs = QgsCoordinateReferenceSystem("EPSG:32618")
    canvas.setDestinationCrs(crs)
    extent = imagery.extent()
    canvas.setExtent(extent)
    tool = SimilarCellsTool(canvas, Iface(), project)
    similar = tool.find_similar(QgsPointXY(*CLICK_UTM))
    if similar is None:
        raise SystemExit(tool.last_message)
    print(tool.last_message)

    settings = QgsMapSettings()
    settings.setDestinationCrs(crs)
    settings.setOutputSize(QSize(900, 820))
    settings.setExtent(QgsRectangle(extent))
    settings.setLayers([similar, imagery])
    settings.setBackgroundColor(QColor("white"))
    job = QgsMapRendererParallelJob(settings)
    job.start()
    job.waitForFinished()
    image = job.renderedImage()

    painter = QPainter(image)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    to_pixel = settings.mapToPixel()
    outline = tool.marker.asGeometry()
    outline = outline.asMultiPolygon()[0][0] if outline.isMultipart() else outline.asPolygon()[0]
    ring = [to_pixel.transform(p) for p in outline]
    painter.setPen(QPen(QColor(0, 0, 0), 5))
    painter.drawPolyline(*[QPointF(p.x(), p.y()) for p in ring])
    painter.setPen(QPen(QColor(255, 255, 255), 2))
    painter.drawPolyline(*[QPointF(p.x(), p.y()) for p in ring])
    font = QFont()
    font.setPointSize(13)
    font.setBold(True)
    painter.setFont(font)
    painter.fillRect(0, 0, image.width(), 34, QColor(255, 255, 255, 220))
    painter.setPen(QColor(0, 0, 0))
    painter.drawText(10, 24, f"{similar.name()} (outlined): red = most alike, blue = least alike")
    painter.end()
    image = image.scaled(720, 656, Qt.AspectRatioMode.KeepAspectRatio, Qt.TransformationMode.SmoothTransformation)
    image = image.convertToFormat(QImage.Format.Format_Indexed8)  # a palette PNG (dithered): a third of the size
    if not image.save(out_png, "PNG"):
        raise SystemExit(f"could not write {out_png}")
    print(f"wrote {out_png} ({Path(out_png).stat().st_size // 1024} KB)")
    project.removeAllMapLayers()
    app.exitQgis()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "similar_tool.png")
