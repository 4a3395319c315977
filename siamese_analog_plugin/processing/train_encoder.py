"""Processing algorithm ``siameseanalog:trainencoder``: train a Siamese encoder on image folders.

A thin adapter over ``core.training.train(TrainConfig, feedback)``, the function behind
``python -m siamese_analog_plugin train``: the toolbox and the terminal train the same way.
"""

from __future__ import annotations

import json
import re

from qgis.core import (
    QgsProcessingException,
    QgsProcessingOutputString,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFile,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterNumber,
)

from .base import (
    TRAINING_DEPENDENCIES,
    AnalogAlgorithm,
    ProcessingFeedbackAdapter,
    device_parameter,
    device_value,
    engine_errors,
    install_hint,
    missing_dependencies,
)

__all__ = ["TrainEncoderAlgorithm", "training_module"]

ARCHITECTURES = ("compact", "paper")
TRAINING_MODULE = "siamese_analog_plugin.learning.training"


def training_module():
    """``core.training``, or ``None`` when this build has no training module."""
    import importlib

    try:
        return importlib.import_module(TRAINING_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name == TRAINING_MODULE:
            return None
        raise


class TrainEncoderAlgorithm(AnalogAlgorithm):
    """Train the Siamese encoder on folders of labelled images."""

    ALG_ID = "trainencoder"
    DISPLAY_NAME = "Train Siamese encoder"
    SHORT_DESCRIPTION = "Train the Siamese encoder on folders of labelled images (one sub-folder per class)."

    INPUT = "INPUT"
    ARCHITECTURE = "ARCHITECTURE"
    EPOCHS = "EPOCHS"
    DEVICE = "DEVICE"
    BATCH_SIZE = "BATCH_SIZE"
    AUGMENT = "AUGMENT"
    EMBEDDING_DIM = "EMBEDDING_DIM"
    LEARNING_RATE = "LEARNING_RATE"
    MARGIN = "MARGIN"
    TEST_FRACTION = "TEST_FRACTION"
    SEED = "SEED"
    RESUME = "RESUME"
    OUTPUT = "OUTPUT"
    DEVICE_USED = "DEVICE_USED"
    METRICS = "METRICS"

    HELP = """<p>Trains a Siamese encoder: a network that maps image patches to short vectors (embeddings) so
that patches of the same kind of terrain land close together and different kinds far apart. The
analog search then measures dissimilarity as the distance between embeddings.</p>
<h3>How to use it</h3>
<ol>
<li><b>Training images</b>: a folder with one sub-folder per class of terrain and the images inside, e.g.
<code>training/dunes/*.jpg</code>, <code>training/craters/*.png</code>. Images of one sub-folder are taught
as "similar", of different sub-folders as "dissimilar". Mix Mars and Earth examples of the landforms you
care about. Part of the images (whole scenes: file names sharing the prefix before the first "-") is held
out to measure how well the model generalises.</li>
<li><b>Architecture</b>: <i>compact</i> (the shipped default: small and fast) or <i>paper</i> (the
published network, about 40 M parameters).</li>
<li><b>Epochs</b>: passes over the data. Start small and read the held-out accuracy in the log.</li>
<li><b>Trained model</b>: a <code>.pt</code> file. Use it as the <i>Model</i> of <i>Find Mars analog
sites</i>. A <code>.state.pt</code> file beside it lets a stopped run continue (<i>Resume from</i>).</li>
</ol>
<p><b>Embedding size</b> (advanced; empty: 32 for compact, 5 for paper). A GPU (device auto or cuda)
trains much faster. Cancelling stops after the current batch and writes no model.</p>"""

    def initAlgorithm(self, config=None) -> None:
        self.addParameter(QgsProcessingParameterFile(self.INPUT, self.tr("Training images"),
                                                     behavior=QgsProcessingParameterFile.Folder))
        self.addParameter(QgsProcessingParameterEnum(self.ARCHITECTURE, self.tr("Architecture"),
                                                     list(ARCHITECTURES), defaultValue=0))
        self.addParameter(QgsProcessingParameterNumber(self.EPOCHS, self.tr("Epochs"),
                                                       QgsProcessingParameterNumber.Integer, 12, minValue=1))
        self.addParameter(device_parameter(self.DEVICE, self.tr("Device")))
        number = QgsProcessingParameterNumber
        advanced = [
            number(self.BATCH_SIZE, self.tr("Labelled pairs per batch"), number.Integer, 64, minValue=2),
            number(self.AUGMENT, self.tr("Augmented views per image per epoch"), number.Integer, 10, minValue=1),
            number(self.EMBEDDING_DIM, self.tr("Embedding size"), number.Integer,
                   None, optional=True, minValue=2),
            number(self.LEARNING_RATE, self.tr("Learning rate (Adam)"), number.Double, 1e-3, minValue=0.0),
            number(self.MARGIN, self.tr("Contrastive margin"), number.Double, 1.0, minValue=0.0),
            number(self.TEST_FRACTION, self.tr("Share of images held out for evaluation"), number.Double, 0.1,
                   minValue=0.0, maxValue=0.9),
            number(self.SEED, self.tr("Random seed"), number.Integer, 0, minValue=0),
            QgsProcessingParameterFile(self.RESUME, self.tr("Resume from a state file"),
                                       extension="pt", optional=True),
        ]
        for param in advanced:
            param.setFlags(param.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
            self.addParameter(param)
        self.addParameter(QgsProcessingParameterFileDestination(self.OUTPUT, self.tr("Trained model"),
                                                                self.tr("Model files (*.pt)")))
        self.addOutput(QgsProcessingOutputString(self.DEVICE_USED, self.tr("Device used")))
        self.addOutput(QgsProcessingOutputString(self.METRICS, self.tr("Held-out metrics (JSON)")))

    def canExecute(self):
        """Training needs torch itself (ONNX Runtime only runs trained models)."""
        missing = missing_dependencies(TRAINING_DEPENDENCIES) + missing_dependencies()
        if missing:
            return False, install_hint(list(dict.fromkeys(missing)))
        return True, ""

    def processAlgorithm(self, parameters, context, feedback):
        self.check_dependencies()
        out = self.parameterAsFileOutput(parameters, self.OUTPUT, context)
        if not out:
            raise QgsProcessingException("No output model file was given. Choose where to save the model (.pt).")
        if not out.lower().endswith(".pt"):
            out += ".pt"
        training = training_module()
        if training is None:
            raise QgsProcessingException(
                "Training is not available in this installation: the training module "
                "(siamese_analog_plugin/learning/training.py) is missing. Update or reinstall the plugin.")
        dim = parameters.get(self.EMBEDDING_DIM)
        config = training.TrainConfig(
            data=self.parameterAsFile(parameters, self.INPUT, context),
            arch=ARCHITECTURES[self.parameterAsEnum(parameters, self.ARCHITECTURE, context)],
            epochs=self.parameterAsInt(parameters, self.EPOCHS, context),
            batch_size=self.parameterAsInt(parameters, self.BATCH_SIZE, context),
            lr=self.parameterAsDouble(parameters, self.LEARNING_RATE, context),
            margin=self.parameterAsDouble(parameters, self.MARGIN, context),
            seed=self.parameterAsInt(parameters, self.SEED, context),
            device=device_value(self, parameters, self.DEVICE, context),
            out=out, resume=self.parameterAsFile(parameters, self.RESUME, context) or None,
            augment=self.parameterAsInt(parameters, self.AUGMENT, context),
            embedding_dim=None if dim in (None, "") else self.parameterAsInt(parameters, self.EMBEDDING_DIM, context),
            test_fraction=self.parameterAsDouble(parameters, self.TEST_FRACTION, context),
            cache_dir=None)  # decoded once in memory; no cache files written behind the user's back
        adapter = ProcessingFeedbackAdapter(feedback)
        with engine_errors("Training"):
            summary = training.train(config, adapter)
        # The engine logs "training <arch> (<n> parameters) on <device>: ..."
        device = next((m.group(1) for m in (re.search(r" on (\S+): ", line) for line in adapter.logs
                                            if line.startswith("training ")) if m), "")
        metrics = {k: round(float(v), 4) for k, v in (summary.get("metrics") or {}).items()
                   if isinstance(v, (int, float))}
        feedback.pushInfo(f"Model written to {summary.get('out', out)}")
        return {self.OUTPUT: summary.get("out", out), self.DEVICE_USED: device, self.METRICS: json.dumps(metrics)}
