"""Landform mapping from a few labelled examples: a cosine-distance classifier over embeddings.

After SDFT (stepwise deep feature transfer for Martian landform mapping with few labelled
samples): every class is a *prototype*, the normalised mean embedding of its few examples,
and a cell gets the class whose prototype is closest in angle. ``logits = scale * cosine``;
the confidence is the softmax of those logits for the chosen class, and the margin is the
gap between the best and second-best cosine.

Faces: :func:`classify_folder` (``fewshot`` command: support and query image folders, a CSV
of predictions), :func:`run_fewshot_map` (``fewshot-map`` command and the Processing
algorithm: a raster, an area and labelled points/polygons or image folders, a class raster
and a GeoPackage of cells) and :func:`evaluate_fewshot` (``evaluate-fewshot``: k-shot
accuracy over random support draws, against a texture baseline). The stepwise transfer
itself lives in :mod:`.transfer`.
"""

from __future__ import annotations

import colorsys
import csv
import functools
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .encoder import AnalogEncoder, load_model
from .errors import InputError, OutputError
from .feedback import ConsoleFeedback, Feedback, check_cancelled
from .grid import Area, CellGrid
from .imagery import IMAGE_EXTENSIONS, GreyReader, describe_raster, images_in_folder, list_images, load_image_patch
from .outputs import atomic_outputs, check_destination

__all__ = [
    "DEFAULT_SCALE",
    "CLASS_NODATA",
    "CosineClassifier",
    "Prediction",
    "SupportSet",
    "LabelledFeatures",
    "FewShotParams",
    "FewShotMapResult",
    "class_colours",
    "load_labelled_folder",
    "read_labelled_features",
    "support_from_features",
    "classify_folder",
    "run_fewshot_map",
    "write_class_raster",
    "write_fewshot_cells",
    "HeldOutSplit",
    "split_files",
    "evaluate_fewshot",
    "register_cli",
]

DEFAULT_SCALE = 10.0
CLASS_NODATA = 0  # class raster value of cells outside the area or mostly nodata; classes are 1..C
CELLS_LAYER = "cells"
HIRISE_CLASSES = ("crater", "dark_dune", "bright_dune", "other")
AUGMENT_VIEWS = range(8)  # the dihedral views step 2 learns from


# ----------------------------------------------------------------------------------------
# The classifier
# ----------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------
# Labelled examples (support sets)
# ----------------------------------------------------------------------------------------
@dataclass
class SupportSet:
    """Labelled patches: the few examples the classifier learns from.

    Attributes:
        patches: ``(N, S, S)`` float32 grey patches in [0, 1].
        labels: ``(N,)`` int class index.
        class_names: the classes, in index order.
        sources: where each patch came from (a file path, or ``feature <fid>``), for messages.
    """

    patches: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    sources: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {name: int((self.labels == i).sum()) for i, name in enumerate(self.class_names)}


def _class_folders(folder: Path) -> list[tuple[str, list[Path]]]:
    out = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = list_images(sub)
        if files:
            out.append((sub.name, files))
    return out


def load_labelled_folder(folder: str | os.PathLike, size: int, classes: list[str] | None = None,
                         files: dict[str, list[Path]] | None = None, band: int | None = None,
                         what: str = "support folder", feedback: Feedback | None = None) -> SupportSet:
    """Load ``folder/<class>/*`` images as grey patches (the largest centred square of each).

    Args:
        folder: one sub-folder per class, images inside (searched recursively).
        size: the encoder's input size.
        classes: keep only these classes, in this order (default: every class folder, sorted).
        files: instead of listing the folder, these files per class.
        what: the word used in error messages.

    Raises:
        InputError: missing folder, no class folder with images, an unknown class, fewer than 2 classes.
    """
    folder = Path(folder)
    if files is None:
        if not folder.is_dir():
            raise InputError(f"The {what} '{folder}' does not exist or is not a folder", "Check the path")
        found = dict(_class_folders(folder))
    else:
        found = {k: list(v) for k, v in files.items() if v}
    if not found:
        raise InputError(f"The {what} '{folder}' holds no class folders with images",
                         f"Put the images of each class in its own sub-folder: {folder}/<class>/*.png "
                         f"({', '.join(IMAGE_EXTENSIONS[:4])}...)")
    names = list(classes) if classes else sorted(found)
    missing = [c for c in names if c not in found]
    if missing:
        raise InputError(f"The {what} '{folder}' has no images for the class(es) {', '.join(missing)}",
                         f"Its classes are: {', '.join(sorted(found))}")
    if len(names) < 2:
        raise InputError(f"The {what} '{folder}' has a single class ('{names[0]}'); mapping needs at least two",
                         "Add a folder of examples of another landform (or of 'other' ground)")
    paths = [(i, p) for i, c in enumerate(names) for p in found[c]]
    patches = np.empty((len(paths), size, size), dtype=np.float32)
    for j, (_, p) in enumerate(paths):
        patches[j] = load_image_patch(p, size, band=band, what="image")[0]
        if feedback is not None and j % 64 == 0:
            check_cancelled(feedback)
            feedback.progress((j + 1) / len(paths), f"{j + 1}/{len(paths)} images read")
    labels = np.array([i for i, _ in paths], dtype=np.int64)
    return SupportSet(patches, labels, names, [str(p) for _, p in paths])


@dataclass
class LabelledFeatures:
    """Labelled points or polygons (any CRS) from which support patches are read.

    Attributes:
        items: ``(geometry, class name)`` pairs; shapely points, polygons or multi-parts.
        crs: the geometries' CRS (anything :func:`geo.to_crs` accepts).
        ids: an id per item for messages (default: 1..N).
    """

    items: list[tuple[object, str]]
    crs: object
    ids: list = field(default_factory=list)


def read_labelled_features(path: str | os.PathLike, class_field: str, layer: str | None = None) -> LabelledFeatures:
    """Read labelled points/polygons from a vector file (GeoPackage, GeoJSON, Shapefile...).

    Raises:
        InputError: missing file, unknown layer or field, no CRS, no labelled feature.
    """
    from shapely import wkb

    from .vector import open_vector_layer

    path = str(path)
    # ``ds`` stays referenced while ``lyr`` is read: OGR layers die with their dataset.
    ds, lyr = open_vector_layer(path, layer, "labelled examples file", "points or polygons")
    defn = lyr.GetLayerDefn()
    fields = [defn.GetFieldDefn(i).GetName() for i in range(defn.GetFieldCount())]
    if class_field not in fields:
        raise InputError(f"The labelled examples have no field '{class_field}'",
                         f"Choose the class field among: {', '.join(fields) or '(no fields)'}")
    srs = lyr.GetSpatialRef()
    if srs is None:
        raise InputError(f"The labelled examples in '{path}' have no CRS", "Assign the layer a CRS")
    items, ids = [], []
    for feat in lyr:
        g = feat.GetGeometryRef()
        value = feat.GetField(class_field)
        if g is None or value is None or str(value).strip() == "":
            continue
        items.append((wkb.loads(bytes(g.ExportToIsoWkb())), str(value).strip()))
        ids.append(feat.GetFID())
    return LabelledFeatures(items, srs.ExportToWkt(), ids)


def _square_around(x: float, y: float, half_w: float, half_h: float) -> tuple[float, float, float, float]:
    return (x - half_w, y - half_h, x + half_w, y + half_h)


def support_from_features(raster: str, features: LabelledFeatures, cell_size_m: float, size: int,
                          band: int | None = None, max_nodata: float = 0.5, max_cells_per_polygon: int = 64,
                          feedback: Feedback | None = None) -> SupportSet:
    """Read one patch per labelled point, and the cells inside each labelled polygon.

    A point gives the cell-sized square centred on it; a polygon gives the grid cells of its
    own grid lying at least half inside it (evenly thinned to ``max_cells_per_polygon``), or
    the square around its centroid when it is smaller than a cell.

    Raises:
        InputError: no labelled feature, fewer than two classes, a class whose examples all
            lie off the raster or over nodata.
    """
    from shapely.geometry import Point
    from shapely.ops import transform as shapely_transform

    from .geo import reproject_geometry, to_crs, transformer
    from .grid import build_grid, cell_size_in_crs

    if not features.items:
        raise InputError("No labelled example was given (or none has a class value)",
                         "Label a few cells per landform: points or polygons with a class field")
    info = describe_raster(raster)
    if not info.georeferenced or not info.crs_wkt:
        raise InputError(f"The raster '{raster}' has no coordinate reference system",
                         "Georeference it first so labelled examples can be placed on it")
    raster_crs = to_crs(info.crs_wkt)
    src_crs = to_crs(features.crs) if features.crs is not None else raster_crs
    names = sorted({c for _, c in features.items})
    if len(names) < 2:
        raise InputError(f"All labelled examples have the same class ('{names[0]}'); mapping needs at least two",
                         "Label a few cells of another landform (or of 'other' ground) too")
    ids = features.ids or list(range(1, len(features.items) + 1))
    centre_lat = (info.bounds[1] + info.bounds[3]) / 2 if raster_crs.is_geographic else 0.0
    cw, ch = cell_size_in_crs(raster_crs, cell_size_m, centre_lat)
    tr = transformer(src_crs, raster_crs) if src_crs != raster_crs else None
    boxes: list[tuple[tuple[float, float, float, float], int, str]] = []
    for (geom, cls), fid in zip(features.items, ids):
        label = names.index(cls)
        if geom is None or geom.is_empty:
            continue
        if geom.geom_type in ("Point", "MultiPoint"):
            pts = list(getattr(geom, "geoms", [geom]))
            for p in pts:
                q = shapely_transform(tr.transform, p) if tr else p
                boxes.append((_square_around(q.x, q.y, cw / 2, ch / 2), label, f"feature {fid}"))
            continue
        if geom.geom_type not in ("Polygon", "MultiPolygon"):
            raise InputError(f"Labelled example {fid} is a {geom.geom_type}", "Give points or polygons")
        poly = reproject_geometry(geom, src_crs, raster_crs) if tr else geom
        try:
            sub = build_grid(info, cell_size_m, Area(poly, raster_crs.to_wkt()), min_coverage=0.5,
                             max_cells=100_000, force=False)
            b = sub.bounds_array()
            if len(b) > max_cells_per_polygon:
                b = b[np.linspace(0, len(b) - 1, max_cells_per_polygon).round().astype(int)]
            boxes += [(tuple(float(v) for v in bb), label, f"feature {fid}") for bb in b]
        except InputError:  # smaller than a cell (or partly off the raster): its centroid's square
            c = poly.centroid if not poly.is_empty else Point(0, 0)
            boxes.append((_square_around(c.x, c.y, cw / 2, ch / 2), label, f"feature {fid}"))
    patches, labels, sources = [], [], []
    with GreyReader(raster, band=band) as reader:
        for j, (bounds, label, src) in enumerate(boxes):
            patch, valid = reader.read_bounds(bounds, size)
            if valid >= 1.0 - max_nodata:
                patches.append(patch)
                labels.append(label)
                sources.append(src)
            if feedback is not None and j % 32 == 0:
                check_cancelled(feedback)
    if feedback is not None and len(patches) < len(boxes):
        feedback.log(f"{len(boxes) - len(patches)} of {len(boxes)} labelled cells were skipped: off the raster or "
                     f"more than {max_nodata:.0%} nodata")
    support = SupportSet(np.array(patches, dtype=np.float32).reshape(-1, size, size),
                         np.array(labels, dtype=np.int64), names, sources)
    empty = [n for n, k in support.counts().items() if k == 0]
    if empty:
        raise InputError(f"Every labelled example of {', '.join(repr(e) for e in empty)} lies off the raster "
                         "or over nodata", "Label cells over valid imagery (and check the layer's CRS)")
    return support


# ----------------------------------------------------------------------------------------
# Folder classification (the ``fewshot`` command)
# ----------------------------------------------------------------------------------------
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
                    scale: float | None = None) -> tuple[list[dict], CosineClassifier]:
    """Classify every image under ``query`` from the examples in ``support/<class>/*``.

    Returns:
        ``(rows, classifier)``: one dict per query image with ``path`` (relative to ``query``,
        forward slashes), ``predicted``, ``cosine``, ``confidence``, ``margin`` and
        ``cos_<class>`` for every class.
    """
    feedback = feedback or Feedback()
    query = Path(query)
    files = images_in_folder(query, "query folder")
    encoder = encoder or load_model(model, device)
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


# ----------------------------------------------------------------------------------------
# Mapping an area (the ``fewshot-map`` command and the Processing algorithm)
# ----------------------------------------------------------------------------------------
@dataclass
class FewShotParams:
    """What a few-shot landform map needs (the grid part mirrors :class:`.search.SearchParams`).

    Attributes:
        raster: the imagery to map (georeferenced GDAL raster).
        area: polygon to map (``None`` = the raster's extent).
        cell_size_m: cell side in metres (``None`` = 100 raster pixels).
        stride_m, min_coverage, max_nodata, band, max_cells, force: as for a search.
        model, device, batch_size: the encoder.
        scale: logit scale for the confidence (``None``: the model's, else 10).
        max_cells_per_polygon: cells taken from one labelled polygon at most.
    """

    raster: str
    area: Area | None = None
    cell_size_m: float | None = None
    stride_m: float | None = None
    min_coverage: float = 0.5
    max_nodata: float = 0.5
    band: int | None = None
    model: str | None = None
    device: str = "auto"
    batch_size: int = 128
    max_cells: int = 1_000_000
    force: bool = False
    scale: float | None = None
    max_cells_per_polygon: int = 64


@dataclass
class FewShotMapResult:
    """Per-cell classes (arrays aligned with ``grid``) and run facts."""

    grid: CellGrid
    class_names: list[str]
    class_index: np.ndarray  # int32, -1 where not classified
    cosine: np.ndarray  # float32, NaN where not classified
    confidence: np.ndarray
    margin: np.ndarray
    valid_fraction: np.ndarray
    support_counts: dict
    device: str
    model_path: str | None
    seconds: float

    @property
    def classified(self) -> np.ndarray:
        return self.class_index >= 0

    def counts(self) -> dict[str, int]:
        """Cells per class."""
        return {n: int((self.class_index == i).sum()) for i, n in enumerate(self.class_names)}

    def columns(self) -> dict[str, np.ndarray]:
        names = np.array(list(self.class_names) + [""], dtype=object)
        return {"class": names[self.class_index], "class_id": np.where(self.classified, self.class_index + 1, 0),
                "cosine": self.cosine, "confidence": self.confidence, "margin": self.margin,
                "status": np.where(self.classified, "classified", "nodata"), "valid_fraction": self.valid_fraction}


def _default_cell_size(info) -> float:
    from .search import default_cell_size_m

    return default_cell_size_m(info, [])[0]


def run_fewshot_map(params: FewShotParams, support: SupportSet | LabelledFeatures | str | os.PathLike | None,
                    out_raster: str | None = None, out_cells: str | None = None,
                    feedback: Feedback | None = None, encoder: AnalogEncoder | None = None) -> FewShotMapResult:
    """Map landforms over an area from a few labelled examples.

    Args:
        params: raster, area, cells and model.
        support: labelled points/polygons (read from ``params.raster`` at the cell size), a
            ``<class>/*`` image folder, a ready :class:`SupportSet`, or ``None`` to use the
            classes stored in a step-2 model.
        out_raster: class GeoTIFF (uint8, 1..C, 0 = not classified, with a colour table).
        out_cells: GeoPackage with layer ``cells`` (class, cosine, confidence, margin...).
        feedback: progress, log and cancel.
        encoder: an already loaded encoder.

    Raises:
        InputError, ModelError, OutputError; SearchCancelled when cancelled (nothing written).
    """
    from .search import SearchParams, iter_patch_batches, plan_grid

    feedback = feedback or Feedback()
    t0 = time.perf_counter()
    if params.batch_size < 1:
        raise InputError(f"The batch size must be at least 1, not {params.batch_size}", "Use e.g. 128")
    if not 0 <= params.max_nodata < 1:
        raise InputError(f"The largest nodata share must be in [0, 1), not {params.max_nodata}", "Use e.g. 0.5")
    if out_cells and not str(out_cells).lower().endswith(".gpkg"):
        raise OutputError(f"The cell layer '{out_cells}' is not a GeoPackage", "Give a .gpkg file name")
    for path, what in ((out_raster, "class raster"), (out_cells, "cell layer")):
        if path:
            check_destination(path, what)
    info = describe_raster(params.raster)
    encoder = encoder or load_model(params.model, params.device)
    size = encoder.input_size
    cell = params.cell_size_m or _default_cell_size(info)
    if not params.cell_size_m:
        feedback.log(f"Cell size: {cell:.1f} m (100 raster pixels)")
    if isinstance(support, LabelledFeatures):
        support = support_from_features(params.raster, support, cell, size, params.band, params.max_nodata,
                                         params.max_cells_per_polygon, feedback)
    if isinstance(support, SupportSet):
        feedback.log("Labelled examples: " + ", ".join(f"{k} {v}" for k, v in support.counts().items()))
    clf = build_classifier(encoder, support, params.scale, params.batch_size)
    if len(clf.class_names) > 254:
        raise InputError(f"{len(clf.class_names)} classes are more than a class raster can hold (254)",
                         "Merge classes")
    counts = support.counts() if isinstance(support, SupportSet) else {c: 0 for c in clf.class_names}
    sp = SearchParams(raster=params.raster, references=None, area=params.area, cell_size_m=cell,
                      stride_m=params.stride_m, min_coverage=params.min_coverage, max_nodata=params.max_nodata,
                      band=params.band, max_cells=params.max_cells, force=params.force)
    _, grid = plan_grid(sp, None, feedback)
    n = len(grid)
    feedback.log(f"Cells: {n:,} of {grid.cell_size_m:g} m (grid {grid.n_rows} x {grid.n_cols}); "
                 f"classes: {', '.join(clf.class_names)}; device {encoder.device}")
    check_cancelled(feedback)
    index = np.full(n, -1, dtype=np.int32)
    cosine = np.full(n, np.nan, dtype=np.float32)
    confidence = np.full(n, np.nan, dtype=np.float32)
    margin = np.full(n, np.nan, dtype=np.float32)
    valid_fraction = np.zeros(n, dtype=np.float32)
    done = 0
    stop = threading.Event()
    batches = iter_patch_batches(params.raster, grid, size, params.batch_size, params.band, stop=stop)
    try:
        for idx, patches, valid in batches:
            check_cancelled(feedback)
            valid_fraction[idx] = valid
            ok = valid >= 1.0 - params.max_nodata
            if ok.any():
                pred = clf.predict(encoder.embed_tensor(encoder.to_tensor(patches[ok])))
                sel = idx[ok]
                index[sel], cosine[sel] = pred.index, pred.cosine
                confidence[sel], margin[sel] = pred.confidence, pred.margin
            done += idx.size
            elapsed = time.perf_counter() - t0
            feedback.progress(done / n, f"{done:,}/{n:,} cells, {done / max(elapsed, 1e-9):,.0f} cells/s")
    finally:
        stop.set()
        batches.close()
    result = FewShotMapResult(grid, list(clf.class_names), index, cosine, confidence, margin, valid_fraction,
                              counts, str(encoder.device), encoder.path, time.perf_counter() - t0)
    if not result.classified.any():
        raise InputError("Every cell in the area is mostly nodata, so nothing could be classified",
                         "Choose an area over valid imagery, or raise the largest nodata share")
    feedback.log("Cells per class: " + ", ".join(f"{k} {v:,}" for k, v in result.counts().items()))
    check_cancelled(feedback)
    if out_raster or out_cells:
        tags = {"model": encoder.path or "", "classes": json.dumps(clf.class_names), "scale": clf.scale,
                "cell_size_m": grid.cell_size_m, "support": json.dumps(counts)}
        with atomic_outputs({"raster": out_raster, "cells": out_cells}) as tmp:
            if tmp["raster"]:
                write_class_raster(tmp["raster"], grid, index, clf.class_names, tags)
            if tmp["cells"]:
                write_fewshot_cells(tmp["cells"], grid, result.columns())
    return result


def write_class_raster(path: str, grid: CellGrid, class_index: np.ndarray, class_names: list[str],
                       tags: dict | None = None) -> None:
    """Write a uint8 GeoTIFF, one pixel per grid position: class ``i`` as ``i + 1``, 0 = not classified.

    It carries a colour table (:func:`class_colours`) and category names, so any GIS shows
    it with a legend as is.
    """
    from osgeo import gdal

    gdal.UseExceptions()
    data = np.full((grid.n_rows, grid.n_cols), CLASS_NODATA, dtype=np.uint8)
    ok = class_index >= 0
    data[grid.rows[ok], grid.cols[ok]] = (class_index[ok] + 1).astype(np.uint8)
    try:
        ds = gdal.GetDriverByName("GTiff").Create(path, grid.n_cols, grid.n_rows, 1, gdal.GDT_Byte,
                                                  options=["COMPRESS=DEFLATE"])
        ds.SetGeoTransform(grid.output_transform.to_gdal())
        ds.SetProjection(grid.crs_wkt)
        band = ds.GetRasterBand(1)
        band.WriteArray(data)
        band.SetNoDataValue(CLASS_NODATA)
        table = gdal.ColorTable()
        table.SetColorEntry(CLASS_NODATA, (0, 0, 0, 0))
        for i, rgb in enumerate(class_colours(len(class_names))):
            table.SetColorEntry(i + 1, (*rgb, 255))
        band.SetRasterColorTable(table)
        band.SetRasterColorInterpretation(gdal.GCI_PaletteIndex)
        band.SetCategoryNames(["(not classified)"] + list(class_names))
        band.SetDescription("landform class")
        meta = {f"CLASS_{i + 1}": n for i, n in enumerate(class_names)}
        meta.update({k: str(v) for k, v in (tags or {}).items()})
        ds.SetMetadata(meta)
        ds.FlushCache()
        ds = None
    except Exception as exc:
        raise OutputError(f"Cannot write the class raster '{path}': {exc}", "Check the destination") from exc


FEWSHOT_FIELDS = [
    ("id", "int64"), ("row", "int"), ("col", "int"), ("class", "str"), ("class_id", "int"), ("cosine", "real"),
    ("confidence", "real"), ("margin", "real"), ("lon", "real"), ("lat", "real"), ("status", "str"),
    ("coverage", "real"), ("valid_fraction", "real"),
]


def write_fewshot_cells(path: str, grid: CellGrid, columns: dict[str, np.ndarray]) -> None:
    """Write the cells as polygons (layer ``cells``) with their class, cosine and confidence."""
    from .outputs import write_cells_gpkg

    columns = dict(columns)
    classes = np.asarray(columns["class"], dtype=object)
    classes[classes == ""] = None  # unclassified cells: NULL class
    columns["class"] = classes
    write_cells_gpkg(path, grid, columns, top_k=0, fields=FEWSHOT_FIELDS)


# ----------------------------------------------------------------------------------------
# Held-out split (for the transfer and the evaluation)
# ----------------------------------------------------------------------------------------
@dataclass
class HeldOutSplit:
    """Which images are held out for evaluation.

    The encoder's own split (``<model>.split.json``, written by the ``train`` command: whole
    scenes held out, about 10 % of every class) when it exists, so
    step 1 never trains on the images the evaluation scores; else whole scenes chosen per class
    folder (about 20 % of every class). Either way crops of one scene never straddle the split.
    """

    held_out: set | None
    source: str
    test_share: float = 0.2
    _computed: dict = field(default_factory=dict, repr=False)
    # The split file's own keys (paths under its data folder, e.g. mars/hirise_landmarks/crater/x.jpg):
    # they still match when the data folder sits somewhere else on this machine.
    relative_keys: set = field(default_factory=set, repr=False)

    @classmethod
    def load(cls, split_file: str | os.PathLike | None = None, model: str | os.PathLike | None = None) -> HeldOutSplit:
        """The split of ``split_file``; else the ``<model>.split.json`` the train command wrote
        beside ``model`` (or beside the shipped model); else the scene hash."""
        from .encoder import default_model_path

        if split_file:
            candidates = [Path(split_file)]
            if not candidates[0].exists():
                raise InputError(f"The split file '{split_file}' does not exist", "Check the path")
        else:
            shipped = default_model_path()
            candidates = ([Path(model).with_suffix(".split.json")] if model else []) + [
                shipped.with_suffix(".split.json"), shipped.with_name("split.json")]
        path = next((c for c in candidates if c.exists()), None)
        if path is None:
            return cls(None, "whole scenes, 20 % of every class (datasets.split_by_scene, seed 0; no split.json found)")
        from .datasets import default_data_root

        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            # "shared/data" is the project's data folder (datasets.split_record), wherever it is.
            root = default_data_root() if data["data_root"] == "shared/data" else Path(data["data_root"])
            relative = {k.split("#", 1)[0] for k in data["held_out"]}
            keys = {str((root / k).resolve()) for k in relative}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"The split file '{path}' cannot be read: {exc}",
                             "Use the .split.json written by the train command") from exc
        return cls(keys, f"{path} (seed {data.get('seed')}, {len(keys)} held-out images)", relative_keys=relative)

    def is_held_out(self, path: str | os.PathLike, held: set) -> bool:
        """Whether ``path`` is one of ``held`` (:meth:`held_out_of`), or one of the split file's
        images under another data folder (its last path parts equal a key)."""
        resolved = Path(path).resolve()
        if str(resolved) in held:
            return True
        return any("/".join(resolved.parts[-n:]) in self.relative_keys for n in self._key_depths)

    @functools.cached_property
    def _key_depths(self) -> set:
        """Path depths of the split file's keys (asked for every image a split looks at)."""
        return {len(Path(k).parts) for k in self.relative_keys}

    def part_of(self, path: str | os.PathLike) -> str:
        """``"train"`` or ``"test"`` of an image under a split file (see :func:`split_files` otherwise)."""
        if self.held_out is None:
            raise InputError("This split has no list of held-out images", "Use split_files(root, ...)")
        return "test" if self.is_held_out(path, self.held_out) else "train"

    def held_out_of(self, root: str | os.PathLike) -> set:
        """The held-out images under a ``<class>/*`` folder: those of the split file, or else
        whole scenes chosen by the training engineer's :func:`.datasets.split_by_scene` over
        every class folder of ``root`` (seed 0), about ``test_share`` of every class."""
        if self.held_out is not None:
            return self.held_out
        key = str(Path(root).resolve())
        if key not in self._computed:
            from .datasets import ImageRecord, scene_of, split_by_scene

            records = [ImageRecord(str(p.resolve()), f"folder:{c}", scene_of(p), "folder")
                       for c, files in _class_folders(Path(root)) for p in files]
            flags = split_by_scene(records, 0, self.test_share)
            self._computed[key] = {r.path for r, f in zip(records, flags) if f}
        return self._computed[key]


def split_files(root: str | os.PathLike, classes: list[str] | None = None, part: str = "train",
                split: HeldOutSplit | None = None) -> dict[str, list[Path]]:
    """The images of each class folder under ``root`` in the ``train`` or ``test`` part."""
    split = split or HeldOutSplit.load()
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"The labelled data folder '{root}' does not exist", "Check the path")
    found = dict(_class_folders(root))
    names = list(classes) if classes else sorted(found)
    missing = [c for c in names if c not in found]
    if missing:
        raise InputError(f"'{root}' has no class folder(s) {', '.join(missing)}",
                         f"Its classes are: {', '.join(sorted(found))}")
    held = split.held_out_of(root)
    return {c: [p for p in found[c] if split.is_held_out(p, held) == (part == "test")] for c in names}


# ----------------------------------------------------------------------------------------
# k-shot evaluation
# ----------------------------------------------------------------------------------------
def _kshot_accuracy(features: np.ndarray, labels: np.ndarray, n_classes: int, k: int, rng: np.random.Generator,
                    max_query_per_class: int, fit_predict) -> float:
    """Balanced accuracy of one random draw: ``k`` support examples per class, the rest as queries."""
    support, query = [], []
    for c in range(n_classes):
        members = rng.permutation(np.nonzero(labels == c)[0])
        support.append(members[:k])
        query.append(members[k:k + max_query_per_class])
    s = np.concatenate(support)
    q = np.concatenate(query)
    pred = fit_predict(s, q)
    recalls = [float((pred[labels[q] == c] == c).mean()) for c in range(n_classes) if (labels[q] == c).any()]
    return float(np.mean(recalls))


def evaluate_fewshot(datasets: dict[str, tuple[str, list[str] | None]], models: dict[str, str | None],
                     shots=(1, 5, 10), draws: int = 10, max_per_class: int = 60, seed: int = 0,
                     adapt_steps: int = 0, device: str = "cpu", feedback: Feedback | None = None,
                     texture: bool = True, split: HeldOutSplit | None = None, threads: int | None = 1) -> dict:
    """k-shot balanced accuracy of the cosine classifier on held-out images.

    For every dataset, the ``test`` part of the scene split (:class:`HeldOutSplit`), at most
    ``max_per_class`` images a class (fixed random subsample), is embedded once per model;
    then, for every ``k`` and each of ``draws`` random draws, ``k`` images a class form the
    support set and the others of the subsample the queries.

    Args:
        datasets: name -> (root folder of ``<class>/*``, classes or ``None`` for all).
        models: label -> model file (``None``: the shipped model), or label -> ``{dataset: file}``
            for a method whose model depends on the dataset (the stepwise transfer: step 1 on
            each dataset's own labelled training images); datasets missing there skip it.
        adapt_steps: when > 0, also score each model after step-2 fine-tuning of its last
            layers on each support draw and its 8 rotations/reflections (method ``<label>+adapt``).
        texture: also score the texture baseline.
        split: the held-out split (default: :meth:`HeldOutSplit.load`).
        threads: torch CPU threads during the evaluation (``None``: leave as is). One is
            fastest here: hundreds of small fine-tuning steps, on shared cores, lose more to
            thread hand-offs than they gain (measured: 5x slower with 2 threads under load).

    Returns:
        ``{"results": [{dataset, method, k, mean, std, draws, accuracies}], "facts": {...}}``.
    """
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _evaluate(datasets, models, shots, draws, max_per_class, seed, adapt_steps, device, feedback, texture,
                         split)
    finally:
        torch.set_num_threads(previous)


def _evaluate(datasets, models, shots, draws, max_per_class, seed, adapt_steps, device, feedback, texture,
              split) -> dict:
    from .transfer import adapt_cosine_classifier, split_network

    feedback = feedback or Feedback()
    plain = next((m for m in models.values() if not isinstance(m, dict)), None)
    split = split or HeldOutSplit.load(model=plain)
    # (label, dataset or None for all) -> encoder
    all_encoders = {}
    for label, path in models.items():
        for ds, file in (path.items() if isinstance(path, dict) else [(None, path)]):
            all_encoders[label, ds] = load_model(file, device)
    sizes = {e.input_size for e in all_encoders.values()}
    results, facts = [], {"max_per_class": max_per_class, "draws": draws, "seed": seed, "split": split.source,
                          "metric": "balanced accuracy (mean per-class recall)", "datasets": {}}
    for ds_name, (root, classes) in datasets.items():
        encoders = {label: enc for (label, ds), enc in all_encoders.items() if ds in (None, ds_name)}
        files = split_files(root, classes, "test", split)
        rng = np.random.default_rng(seed)
        files = {c: sorted(rng.permutation(np.array(v, dtype=object))[:max_per_class].tolist())
                 for c, v in files.items()}
        too_few = [c for c, v in files.items() if len(v) <= max(shots)]
        if too_few:
            feedback.log(f"{ds_name}: classes with too few held-out images for {max(shots)}-shot: {too_few}")
        t = time.perf_counter()
        loaded = {s: load_labelled_folder(root, s, list(files), files=files, what="evaluation folder",
                                          feedback=feedback) for s in sizes}
        any_set = next(iter(loaded.values()))
        labels, names = any_set.labels, list(any_set.class_names)
        n_classes = len(names)
        facts["datasets"][ds_name] = {"root": str(root), "classes": any_set.class_names,
                                      "images": {c: len(v) for c, v in files.items()}}
        feedback.log(f"{ds_name}: {len(labels)} held-out images, {n_classes} classes "
                     f"(read in {time.perf_counter() - t:.1f} s)")
        features: dict[str, np.ndarray] = {}
        for label, enc in encoders.items():
            features[label] = _embed_patches(enc, loaded[enc.input_size].patches, 128, None)
        if texture:
            from .texture import texture_descriptor  # the training engineer's baseline descriptor

            features["texture baseline"] = texture_descriptor(any_set.patches)
        for method, feats in features.items():
            for k in shots:
                r = np.random.default_rng(seed + 1000 * k)

                def fit_predict(s, q, feats=feats, labels=labels, names=names):
                    clf = CosineClassifier.fit(feats[s], labels[s], names)
                    return clf.predict(feats[q]).index

                accs = [_kshot_accuracy(feats, labels, n_classes, k, r, max_per_class, fit_predict)
                        for _ in range(draws)]
                results.append({"dataset": ds_name, "method": method, "k": k, "mean": float(np.mean(accs)),
                                "std": float(np.std(accs)), "draws": draws, "accuracies": accs})
                check_cancelled(feedback)
        if adapt_steps > 0:
            from .transfer import dihedral

            for label, enc in encoders.items():
                pooled, head, post = split_network(enc)
                patches = loaded[enc.input_size].patches
                # Frozen features of the 8 rotations/reflections, as transfer --step 2 learns from them.
                views = np.stack([pooled(dihedral(patches, v)) for v in range(len(AUGMENT_VIEWS))])
                base = views[0]
                for k in shots:
                    r = np.random.default_rng(seed + 1000 * k)  # the same draws as the plain methods
                    r_adapt = np.random.default_rng(seed + 1000 * k + 1)

                    def fit_predict(s, q, views=views, head=head, post=post, r_adapt=r_adapt, labels=labels,
                                    names=names):
                        feats = views[:, s].reshape(-1, views.shape[-1])
                        clf, tuned = adapt_cosine_classifier(feats, np.tile(labels[s], len(views)), names, head,
                                                             post, steps=adapt_steps,
                                                             seed=int(r_adapt.integers(1 << 30)))
                        return clf.predict(tuned(views[0][q])).index

                    accs = [_kshot_accuracy(base, labels, n_classes, k, r, max_per_class, fit_predict)
                            for _ in range(draws)]
                    results.append({"dataset": ds_name, "method": f"{label}+adapt", "k": k,
                                    "mean": float(np.mean(accs)), "std": float(np.std(accs)), "draws": draws,
                                    "accuracies": accs})
                    check_cancelled(feedback)
        feedback.progress(1.0, f"{ds_name} done")
    facts["models"] = {label if ds is None else f"{label} ({ds})": enc.path
                       for (label, ds), enc in all_encoders.items()}
    return {"results": results, "facts": facts}


def results_table(report: dict) -> str:
    """A Markdown table: one row per dataset and method, one column per k (mean ± std, %)."""
    shots = sorted({r["k"] for r in report["results"]})
    lines = ["| dataset | method | " + " | ".join(f"{k}-shot" for k in shots) + " |",
             "|---|---|" + "---|" * len(shots)]
    keys = []
    for r in report["results"]:
        if (r["dataset"], r["method"]) not in keys:
            keys.append((r["dataset"], r["method"]))
    for ds, method in keys:
        cells = []
        for k in shots:
            hit = [r for r in report["results"] if r["dataset"] == ds and r["method"] == method and r["k"] == k]
            cells.append(f"{100 * hit[0]['mean']:.1f} ± {100 * hit[0]['std']:.1f}" if hit else "")
        lines.append(f"| {ds} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------
def _model_args(p) -> None:
    p.add_argument("--model", default=None, help="model file (default: the shipped model)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default: auto)")
    p.add_argument("--batch-size", type=int, default=128, help="patches encoded together (default: 128)")


def cmd_fewshot(args) -> int:
    feedback = ConsoleFeedback(quiet=args.quiet)
    rows, clf = classify_folder(args.support, args.query, args.model, args.device, args.batch_size, feedback,
                                scale=args.scale)
    write_predictions_csv(args.out, rows)
    counts = {c: sum(r["predicted"] == c for r in rows) for c in clf.class_names}
    print("Predicted: " + ", ".join(f"{c} {n}" for c, n in counts.items()))
    # When the query folder is itself <class>/*, say how often the prediction matches.
    truth = [r["path"].split("/", 1)[0] for r in rows]
    if all("/" in r["path"] for r in rows) and set(truth) <= set(clf.class_names):
        acc = np.mean([t == r["predicted"] for t, r in zip(truth, rows)])
        print(f"Accuracy against the query sub-folder names: {100 * acc:.1f} % of {len(rows)} images")
    print(f"Wrote {args.out}")
    return 0


def cmd_fewshot_map(args) -> int:
    from .vector import read_area

    feedback = ConsoleFeedback(quiet=args.quiet)
    if bool(args.labels) == bool(args.support):
        if not args.labels and not args.support and args.model:
            support = None  # a step-2 model carries its classes
        else:
            raise InputError("Give either --labels (points/polygons with --class-field) or --support (a folder)",
                             "Use one source of labelled examples")
    elif args.labels:
        if not args.class_field:
            raise InputError("--labels needs --class-field", "Name the field that holds each example's class")
        support = read_labelled_features(args.labels, args.class_field, args.labels_layer)
    else:
        support = args.support
    params = FewShotParams(raster=args.raster, area=read_area(args.area, args.area_layer) if args.area else None,
                           cell_size_m=args.cell_size, stride_m=args.stride, min_coverage=args.min_coverage,
                           max_nodata=args.max_nodata, band=args.band, model=args.model, device=args.device,
                           batch_size=args.batch_size, max_cells=args.max_cells, force=args.force, scale=args.scale)
    result = run_fewshot_map(params, support, args.out_raster, args.out_cells, feedback)
    print(f"Classified {int(result.classified.sum()):,} of {len(result.grid):,} cells in {result.seconds:.1f} s:")
    for c, n in result.counts().items():
        print(f"  {c:<20} {n:>8,}")
    print(f"Wrote {args.out_raster or ''} {args.out_cells or ''}".rstrip())
    return 0


def parse_transfer_models(items, datasets: list[str]):
    """``--transfer-model`` values: ``PATH`` (every dataset) or ``DATASET=PATH`` items."""
    if isinstance(items, str):
        items = [items]
    named = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            if len(items) > 1:
                raise InputError(f"'{item}': with several --transfer-model values, name each one's dataset",
                                 "Write --transfer-model HiRISE=step1_hirise.pt AID=step1_aid.pt")
            return item
        if name not in datasets:
            raise InputError(f"--transfer-model names the dataset '{name}', which is not evaluated here",
                             f"Use one of: {', '.join(datasets)}")
        named[name] = path
    return named


def cmd_evaluate_fewshot(args) -> int:
    feedback = ConsoleFeedback(quiet=args.quiet)
    datasets = {}
    if args.hirise:
        datasets["HiRISE"] = (args.hirise, args.hirise_classes or list(HIRISE_CLASSES))
    if args.aid:
        datasets["AID"] = (args.aid, None)
    if not datasets:
        raise InputError("No dataset to evaluate on", "Give --hirise DIR and/or --aid DIR")
    models = {"encoder": args.model}
    if args.transfer_model:
        models["stepwise transfer"] = parse_transfer_models(args.transfer_model, list(datasets))
    for out in (args.out, args.markdown):
        if out:
            check_destination(out, "results file")
    t = time.perf_counter()
    report = evaluate_fewshot(datasets, models, tuple(args.shots), args.draws, args.max_per_class, args.seed,
                              args.adapt_steps, args.device, feedback, split=HeldOutSplit.load(args.split, args.model),
                              threads=args.threads)
    report["facts"]["seconds"] = round(time.perf_counter() - t, 1)
    table = results_table(report)
    print(table)
    print(f"\n{args.draws} draws of the support set; {report['facts']['metric']}; at most {args.max_per_class} "
          f"held-out images a class; {report['facts']['seconds']} s")
    if args.out:
        with atomic_outputs({"json": args.out}) as tmp, open(tmp["json"], "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1)
        print(f"Wrote {args.out}")
    if args.markdown:
        with atomic_outputs({"md": args.markdown}) as tmp, open(tmp["md"], "w", encoding="utf-8") as fh:
            fh.write(table + "\n")
        print(f"Wrote {args.markdown}")
    return 0


def register_cli(sub) -> None:
    """Add ``fewshot``, ``fewshot-map``, ``evaluate-fewshot`` and ``transfer`` to the command line."""
    p = sub.add_parser("fewshot", help="classify images from a few labelled examples per class",
                       description="Classify every image under --query with a cosine-distance classifier whose "
                                   "class prototypes are the mean embeddings of the examples in --support/<class>/*. "
                                   "Writes a CSV: path (relative to --query), predicted, cosine, confidence, margin "
                                   "and cos_<class> for every class.")
    p.add_argument("--support", help="folder of labelled examples: <class>/* images (optional with a model "
                                     "written by 'transfer --step 2')")
    p.add_argument("--query", required=True, help="folder of images to classify (searched recursively)")
    p.add_argument("--out", required=True, help="predictions CSV to write")
    p.add_argument("--scale", type=float, default=None, help=f"logit scale for the confidence (default "
                                                             f"{DEFAULT_SCALE:g} or the model's)")
    _model_args(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_fewshot)

    p = sub.add_parser("fewshot-map", help="map landforms over an area from a few labelled examples",
                       description="Cut the area into cells, classify each cell with a cosine-distance classifier "
                                   "built from labelled points/polygons on the raster (or image folders), and write "
                                   "a class GeoTIFF (with colour table) and a GeoPackage of cells (class, cosine, "
                                   "confidence, margin).")
    p.add_argument("--raster", required=True, help="imagery to map (georeferenced)")
    p.add_argument("--labels", help="points or polygons with a class field (GeoPackage, GeoJSON, Shapefile)")
    p.add_argument("--labels-layer", help="layer of the labels file (default: the first)")
    p.add_argument("--class-field", help="field holding each example's class")
    p.add_argument("--support", help="instead of --labels: folder of <class>/* example images")
    p.add_argument("--area", help="polygon file (default: the raster's extent)")
    p.add_argument("--area-layer", help="layer of the area file")
    p.add_argument("--cell-size", type=float, help="cell side in metres (default: 100 raster pixels)")
    p.add_argument("--stride", type=float, help="distance between cells in metres (default: the cell size)")
    p.add_argument("--min-coverage", type=float, default=0.5)
    p.add_argument("--max-nodata", type=float, default=0.5)
    p.add_argument("--band", type=int)
    p.add_argument("--scale", type=float, default=None, help="logit scale for the confidence")
    _model_args(p)
    p.add_argument("--max-cells", type=int, default=1_000_000)
    p.add_argument("--force", action="store_true")
    p.add_argument("--out-raster", required=True, help="class GeoTIFF to write")
    p.add_argument("--out-cells", required=True, help="GeoPackage of cells to write")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_fewshot_map)

    p = sub.add_parser("evaluate-fewshot", help="k-shot accuracy: encoder, stepwise transfer, texture baseline",
                       description="k-shot balanced accuracy of the cosine classifier on held-out images (the test "
                                   "part of the scene split), over random draws of the support set, reported as "
                                   "mean ± std, for the encoder, the stepwise-transfer model and the texture "
                                   "baseline.")
    p.add_argument("--hirise", help="HiRISE landmark folder (<class>/*.jpg)")
    p.add_argument("--hirise-classes", nargs="+", help=f"classes to use (default: {' '.join(HIRISE_CLASSES)})")
    p.add_argument("--aid", help="AID folder (<Class>/*.jpg; all classes)")
    p.add_argument("--model", default=None, help="the encoder (default: the shipped model)")
    p.add_argument("--transfer-model", nargs="+",
                   help="model after the stepwise transfer (transfer --step 1), for every dataset; or one per "
                        "dataset as HiRISE=FILE AID=FILE (step 1 on that dataset's labelled training images)")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10])
    p.add_argument("--draws", type=int, default=10, help="random support draws per k (default: 10)")
    p.add_argument("--max-per-class", type=int, default=60, help="held-out images used per class (default: 60)")
    p.add_argument("--adapt-steps", type=int, default=0,
                   help="also fine-tune the last layers on each support draw for this many steps (step 2)")
    p.add_argument("--split", help="split.json of held-out images (default: the one beside the shipped model, "
                                   "else a hash of the scene id)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1, fastest for the many "
                                                           "small fine-tuning steps)")
    p.add_argument("--out", help="JSON file of all results")
    p.add_argument("--markdown", help="Markdown table to write")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_evaluate_fewshot)

    from .transfer import register_transfer_cli

    register_transfer_cli(sub)

