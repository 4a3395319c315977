"""Folder classification (the ``fewshot`` command): a cosine classifier over image embeddings."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from .classes import DEFAULT_SCALE, CosineClassifier
from .encoder import AnalogEncoder
from .errors import InputError
from .feedback import Feedback, check_cancelled
from .imagery import images_in_folder, load_image_patch
from .outputs import atomic_outputs, check_destination
from .runtime import load_runtime
from .support import SupportSet, load_labelled_folder


def _embed_patches(encoder: AnalogEncoder, patches: np.ndarray, batch_size: int,
                   feedback: Feedback | None = None, label: str = "patches") -> np.ndarray:
    out = np.empty((len(patches), encoder.embedding_dim), dtype=np.float32)
    for start in range(0, len(patches), batch_size):
        check_cancelled(feedback)
        chunk = patches[start:start + batch_size]
        out[start:start + len(chunk)] = encoder.embed(chunk, batch_size)
        if feedback is not None:
            feedback.progress((start + len(chunk)) / max(len(patches), 1),
                              f"{start + len(chunk)}/{len(patches)} {label} embedded")
    return out


def build_classifier(encoder: AnalogEncoder, support: SupportSet | str | os.PathLike | None,
                     scale: float | None = None, batch_size: int = 128,
                     feedback: Feedback | None = None) -> CosineClassifier:
    """The cosine classifier from a support set or folder, or the one the model carries."""
    if support is None or support == "":
        clf = CosineClassifier.from_model(encoder)
        if clf is None:
            raise InputError("No labelled examples were given and the model carries no classes",
                             "Give a support folder (<class>/* images) or labelled features, or a model "
                             "written by 'transfer --step 2'")
        if scale:
            clf.scale = float(scale)
        return clf
    if not isinstance(support, SupportSet):
        support = load_labelled_folder(support, encoder.input_size, feedback=feedback)
    emb = _embed_patches(encoder, support.patches, batch_size, None)
    return CosineClassifier.fit(emb, support.labels, support.class_names, scale or DEFAULT_SCALE)


def classify_folder(support: str | os.PathLike | SupportSet | None, query: str | os.PathLike,
                    model: str | None = None, device: str = "auto", batch_size: int = 128,
                    feedback: Feedback | None = None, encoder: AnalogEncoder | None = None,
                    scale: float | None = None, runtime: str = "auto") -> tuple[list[dict], CosineClassifier]:
    """Classify every image under ``query`` from the examples in ``support/<class>/*``.

    Returns:
        ``(rows, classifier)``: one dict per query image with ``path`` (relative to ``query``,
        forward slashes), ``predicted``, ``cosine``, ``confidence``, ``margin`` and
        ``cos_<class>`` for every class.
    """
    feedback = feedback or Feedback()
    query = Path(query)
    files = images_in_folder(query, "query folder")
    encoder = encoder or load_runtime(model, runtime, device)
    clf = build_classifier(encoder, support, scale, batch_size, feedback)
    feedback.log(f"Classes: {', '.join(clf.class_names)}; {len(files)} query images; device {encoder.device}")
    rows: list[dict] = []
    for start in range(0, len(files), batch_size):
        check_cancelled(feedback)
        chunk = files[start:start + batch_size]
        patches = np.stack([load_image_patch(f, encoder.input_size)[0] for f in chunk])
        pred = clf.predict(encoder.embed(patches, batch_size))
        for j, f in enumerate(chunk):
            row = {"path": f.relative_to(query).as_posix(), "predicted": clf.class_names[pred.index[j]],
                   "cosine": float(pred.cosine[j]), "confidence": float(pred.confidence[j]),
                   "margin": float(pred.margin[j])}
            row.update({f"cos_{c}": float(pred.cosines[j, k]) for k, c in enumerate(clf.class_names)})
            rows.append(row)
        feedback.progress((start + len(chunk)) / len(files), f"{start + len(chunk)}/{len(files)} images")
    return rows, clf


def write_predictions_csv(path: str, rows: list[dict]) -> None:
    """Write prediction rows as CSV (atomically)."""
    check_destination(path, "predictions CSV")
    with atomic_outputs({"csv": path}) as tmp:
        with open(tmp["csv"], "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            for r in rows:
                writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
