"""The cosine-distance classifier of SDFT: class prototypes, cosine logits, class colours.

Every class is a *prototype*, the normalised mean embedding of its few examples, and a cell
gets the class whose prototype is closest in angle. ``logits = scale * cosine``; the confidence
is the softmax of those logits for the chosen class, and the margin is the gap between the best
and second-best cosine.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

from .encoder import AnalogEncoder
from .errors import InputError

DEFAULT_SCALE = 10.0


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass
class Prediction:
    """Per-sample output of :meth:`CosineClassifier.predict` (arrays of length N)."""

    index: np.ndarray  # int32 class index
    cosine: np.ndarray  # float32 cosine to the chosen prototype
    confidence: np.ndarray  # float32 softmax(scale * cosine) of the chosen class
    margin: np.ndarray  # float32 best minus second-best cosine (1 class: the cosine itself)
    cosines: np.ndarray  # (N, C) float32, every class


@dataclass
class CosineClassifier:
    """Nearest prototype by cosine similarity.

    Attributes:
        class_names: one name per prototype.
        prototypes: ``(C, D)`` unit vectors.
        scale: logit scale (temperature inverse) for the confidence.
    """

    class_names: list[str]
    prototypes: np.ndarray
    scale: float = DEFAULT_SCALE

    def __post_init__(self) -> None:
        self.prototypes = _unit(self.prototypes)
        if self.prototypes.ndim != 2 or len(self.class_names) != len(self.prototypes):
            raise InputError(f"{len(self.class_names)} class names were given for "
                             f"{len(self.prototypes)} prototypes", "Give one name per class")

    @classmethod
    def fit(cls, embeddings: np.ndarray, labels: np.ndarray, class_names: list[str] | None = None,
            scale: float = DEFAULT_SCALE) -> CosineClassifier:
        """Prototypes = normalised mean of the normalised embeddings of each class.

        Args:
            embeddings: ``(N, D)``.
            labels: ``(N,)`` integer class index in ``0..C-1``.
            class_names: names of the ``C`` classes (default ``"0"``, ``"1"``...).

        Raises:
            InputError: no embedding, or a class without any example.
        """
        e = _unit(embeddings)
        labels = np.asarray(labels, dtype=np.int64)
        if e.ndim != 2 or len(e) == 0 or len(labels) != len(e):
            raise InputError("The few-shot classifier needs at least one labelled example per class",
                             "Label a few cells (or give a support folder) for every class")
        n_classes = len(class_names) if class_names is not None else int(labels.max()) + 1
        names = list(class_names) if class_names is not None else [str(i) for i in range(n_classes)]
        protos = np.zeros((n_classes, e.shape[1]), dtype=np.float32)
        for c in range(n_classes):
            members = e[labels == c]
            if len(members) == 0:
                raise InputError(f"The class '{names[c]}' has no usable example",
                                 "Label at least one cell of it over valid imagery, or drop the class")
            protos[c] = members.mean(axis=0)
        return cls(names, protos, float(scale))

    def cosines(self, embeddings: np.ndarray) -> np.ndarray:
        """``(N, C)`` cosine similarity of each embedding to each prototype."""
        return _unit(embeddings) @ self.prototypes.T

    def predict(self, embeddings: np.ndarray) -> Prediction:
        """Class, cosine, confidence and margin of each embedding."""
        cos = self.cosines(embeddings)
        idx = cos.argmax(axis=1)
        rows = np.arange(len(cos))
        best = cos[rows, idx]
        logits = self.scale * cos
        logits = logits - logits.max(axis=1, keepdims=True)
        prob = np.exp(logits)
        prob /= prob.sum(axis=1, keepdims=True)
        if cos.shape[1] > 1:
            second = np.partition(cos, -2, axis=1)[:, -2]
            margin = best - second
        else:
            margin = best.copy()
        return Prediction(idx.astype(np.int32), best.astype(np.float32), prob[rows, idx].astype(np.float32),
                          margin.astype(np.float32), cos.astype(np.float32))

    def to_dict(self) -> dict:
        """Plain JSON-able form (stored in a step-2 model's metadata)."""
        return {"classes": list(self.class_names), "scale": float(self.scale),
                "prototypes": [[round(float(v), 7) for v in row] for row in self.prototypes]}

    @classmethod
    def from_dict(cls, data: dict) -> CosineClassifier:
        return cls(list(data["classes"]), np.asarray(data["prototypes"], dtype=np.float32),
                   float(data.get("scale", DEFAULT_SCALE)))

    @classmethod
    def from_model(cls, encoder: AnalogEncoder) -> CosineClassifier | None:
        """The classifier a step-2 (few-shot) model carries, or ``None``."""
        data = (encoder.metadata.training or {}).get("cosine_classifier")
        if not data:
            return None
        clf = cls.from_dict(data)
        if clf.prototypes.shape[1] != encoder.embedding_dim:
            raise InputError(f"The class prototypes in '{encoder.path}' do not match its embedding size",
                             "The model file was edited; run the transfer step 2 again")
        return clf


def class_colours(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct RGB colours, the same in the GeoTIFF colour table and the QGIS styles."""
    base = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
            "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5"]
    out = [tuple(int(h[i:i + 2], 16) for i in (1, 3, 5)) for h in base[:n]]
    for k in range(len(out), n):  # beyond 20: golden-ratio hues
        r, g, b = colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.65, 0.9)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out
