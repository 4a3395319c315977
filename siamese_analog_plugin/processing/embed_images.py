"""Processing algorithm ``siameseanalog:embedimages``: embed every image under a folder."""

from __future__ import annotations

from qgis.core import (
    QgsProcessingException,
    QgsProcessingOutputNumber,
    QgsProcessingOutputString,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterFile,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterNumber,
)

from .base import AnalogAlgorithm, ProcessingFeedbackAdapter, device_parameter, device_value, engine_errors

__all__ = ["EmbedImagesAlgorithm"]


class EmbedImagesAlgorithm(AnalogAlgorithm):
    """Embed a folder of images with the Siamese encoder, for your own analyses."""

    ALG_ID = "embedimages"
    DISPLAY_NAME = "Embed images"
    SHORT_DESCRIPTION = "Turn every image under a folder into an embedding vector with the Siamese encoder."

    INPUT = "INPUT"
    MODEL = "MODEL"
    DEVICE = "DEVICE"
    RUNTIME = "RUNTIME"
    BATCH_SIZE = "BATCH_SIZE"
    OUTPUT = "OUTPUT"
    IMAGE_COUNT = "IMAGE_COUNT"
    EMBEDDING_DIM = "EMBEDDING_DIM"
    DEVICE_USED = "DEVICE_USED"

    HELP = """<p>Runs the Siamese encoder over every image under a folder (PNG, JPEG, GeoTIFF..., searched
recursively) and saves the embeddings: the same vectors the analog search compares. Images whose
embeddings are close look alike to the network.</p>
<h3>How to use it</h3>
<ol>
<li><b>Image folder</b>: e.g. a folder of Mars crops, or of Earth patches you cut yourself.</li>
<li><b>Model</b>: leave empty for the shipped model, or a model written by <i>Train Siamese encoder</i>.</li>
<li><b>Output</b>: a NumPy <code>.npz</code> file with two arrays: <code>paths</code> (image paths relative to
the folder, with forward slashes) and <code>embeddings</code> (one row per image). Read it in Python with
<code>numpy.load(path)</code>.</li>
</ol>
<p>Each image is reduced to its largest centred square in grey, resized to the encoder's input size, as in
the search. Cancelling leaves no partial file.</p>"""

    def initAlgorithm(self, config=None) -> None:
        self.addParameter(QgsProcessingParameterFile(self.INPUT, self.tr("Image folder"),
                                                     behavior=QgsProcessingParameterFile.Folder))
        self.addParameter(self._model_parameter(self.MODEL, self.tr("Model file")))
        self.addParameter(device_parameter(self.DEVICE, self.tr("Device")))
        batch = QgsProcessingParameterNumber(self.BATCH_SIZE, self.tr("Images encoded together (batch size)"),
                                             QgsProcessingParameterNumber.Integer, 128, minValue=1, maxValue=65536)
        batch.setFlags(batch.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(batch)
        self.addParameter(self._runtime_parameter(self.RUNTIME))
        self.addParameter(QgsProcessingParameterFileDestination(
            self.OUTPUT, self.tr("Embeddings"), self.tr("NumPy archives (*.npz)")))
        self.addOutput(QgsProcessingOutputNumber(self.IMAGE_COUNT, self.tr("Number of images")))
        self.addOutput(QgsProcessingOutputNumber(self.EMBEDDING_DIM, self.tr("Embedding size")))
        self.addOutput(QgsProcessingOutputString(self.DEVICE_USED, self.tr("Device used")))

    def processAlgorithm(self, parameters, context, feedback):
        self.check_dependencies()
        folder = self.parameterAsFile(parameters, self.INPUT, context)
        out = self.parameterAsFileOutput(parameters, self.OUTPUT, context)
        if not out:
            raise QgsProcessingException("No output file was given. Choose where to save the embeddings (.npz).")
        if not out.lower().endswith(".npz"):
            out += ".npz"
        with engine_errors("Embedding"):
            import numpy as np

            from ..engine.image_embeddings import embed_folder
            from ..engine.outputs import atomic_outputs, check_destination

            check_destination(out, "output file")
            paths, emb, device = embed_folder(
                folder, self.parameterAsFile(parameters, self.MODEL, context) or None,
                device_value(self, parameters, self.DEVICE, context),
                self.parameterAsInt(parameters, self.BATCH_SIZE, context),
                ProcessingFeedbackAdapter(feedback), runtime=self._runtime(parameters, context, self.RUNTIME))
            with atomic_outputs({"npz": out}) as tmp:
                with open(tmp["npz"], "wb") as fh:
                    np.savez(fh, paths=np.array(paths), embeddings=emb)
        feedback.pushInfo(f"Embedded {len(paths)} images into {emb.shape[1]}-d vectors on {device}; wrote {out}")
        return {self.OUTPUT: out, self.IMAGE_COUNT: len(paths), self.EMBEDDING_DIM: int(emb.shape[1]),
                self.DEVICE_USED: device}
