"""Training data: discovery, the held-out split by scene, pair rules, preloading and augmentation.

The encoder learns *landform*, not planet. Every image carries a group ``planet:landform``
(``mars:crater``, ``earth:Desert``, ``earth:dune_field``...). Two images are a similar pair when
they share a group, or when their groups are declared analogs in :data:`ANALOG_PAIRS` (Mars
dark/bright dunes with Earth dune fields and AID Desert scenes). A few cross-planet pairs whose
relation the labels cannot tell are ignored (:data:`IGNORED_PAIRS`); every other pair is
dissimilar. A whole table of pair labels is built once per dataset, so the label of any pair of
images in a batch is one indexing operation.

Data layouts understood by :func:`discover_dataset`:

* the project layout under ``shared/data`` (``mars/hirise_landmarks/<class>``,
  ``earth/aid/<Class>``, ``earth/dune_fields/<Site>/*_image.jpg|*_test.jpg``);
* any plain labelled folder ``root/<class>/<image>`` (one planet, same class = similar).

Scenes: crops whose file names share the prefix before the first ``-`` come from one scene (the
HiRISE observation id); the split never puts one scene on both sides.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..engine.errors import InputError
from ..engine.imagery import GreyReader, list_images, load_image_patch

__all__ = [
    "ANALOG_PAIRS",
    "IGNORED_PAIRS",
    "EXCLUDED_CLASSES",
    "ImageRecord",
    "Dataset",
    "PairTable",
    "default_data_root",
    "discover_dataset",
    "split_by_scene",
    "scene_of",
    "load_patches",
    "sample_pairs",
    "augment_batch",
    "per_patch_normalise",
    "split_record",
    "group_weights",
    "dune_scene_windows",
]

# Cross-planet analogs the data allows us to assert: Mars dune fields look like Earth sand seas.
# Earth Desert (AID) and the dune-field scenes are one landform seen in two collections.
DUNE_FAMILY = ("mars:dark_dune", "mars:bright_dune", "earth:Desert", "earth:dune_field")
ANALOG_PAIRS: frozenset[frozenset[str]] = frozenset(
    frozenset((a, b)) for i, a in enumerate(DUNE_FAMILY) for b in DUNE_FAMILY[i + 1:]
    # Dark vs bright dunes stay dissimilar: the HiRISE labels separate them (mars_map needs it).
    if {a, b} != {"mars:dark_dune", "mars:bright_dune"})
# Mars "other" is a catch-all of plains, ridges and mesas: it may well look like Earth bare land,
# mountains or desert pavement, so we neither pull nor push those pairs.
IGNORED_PAIRS: frozenset[frozenset[str]] = frozenset(
    frozenset(("mars:other", e)) for e in ("earth:BareLand", "earth:Mountain", "earth:Desert"))
# HiRISE "edge" crops sit on the image border and are mostly no-data: they teach nothing.
EXCLUDED_CLASSES = ("edge",)


def default_data_root() -> Path:
    """``shared/data`` beside the repository (``<repo>/../shared/data``)."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def scene_of(path: str | os.PathLike) -> str:
    """Scene id of a crop: the file-name prefix before the first ``-`` (HiRISE observation id)."""
    stem = Path(path).stem
    return stem.split("-", 1)[0] if "-" in stem else stem


@dataclass(frozen=True)
class ImageRecord:
    """One training/evaluation image (or a window of a large scene).

    Attributes:
        path: image file.
        group: ``planet:landform`` label.
        scene: split unit; images of one scene never fall on both sides of the split.
        source: collection name (``hirise``, ``aid``, ``dune_field`` or ``folder``).
        window: ``(col, row, side)`` in pixels for a crop of a large scene, else ``None``
            (the image's centred square is used).
        held_out: fixed held-out role from the data itself (dune-field ``*_test`` scenes);
            ``None`` lets :func:`split_by_scene` decide.
    """

    path: str
    group: str
    scene: str
    source: str
    window: tuple[int, int, int] | None = None
    held_out: bool | None = None

    @property
    def planet(self) -> str:
        return self.group.split(":", 1)[0]

    @property
    def landform(self) -> str:
        return self.group.split(":", 1)[1]

    def key(self, root: str | os.PathLike | None = None) -> str:
        """A stable text id (path relative to ``root`` when given, plus the window)."""
        p = Path(self.path)
        if root is not None:
            try:
                p = p.relative_to(Path(root))
            except ValueError:
                pass
        return str(p) + (f"#{self.window[0]},{self.window[1]},{self.window[2]}" if self.window else "")


@dataclass
class Dataset:
    """What :func:`discover_dataset` found: images plus the scene rasters cut into windows."""

    root: str
    records: list[ImageRecord]
    layout: str  # "project" or "folders"

    def groups(self) -> list[str]:
        return sorted({r.group for r in self.records})


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _labelled_folder(folder: Path, planet: str, source: str, exclude: Sequence[str] = ()) -> list[ImageRecord]:
    records = []
    for cls in _class_folders(folder):
        if cls.name in exclude:
            continue
        files = list_images(cls)
        if not files:
            raise InputError(f"The class folder '{cls}' holds no images",
                             "Remove the empty folder or put its images back")
        records += [ImageRecord(str(f), f"{planet}:{cls.name}", scene_of(f), source) for f in files]
    return records


def dune_scene_windows(path: str | os.PathLike, side: int, stride: int) -> list[tuple[int, int, int]]:
    """Square windows ``(col, row, side)`` tiling a scene with the given stride (no partial windows)."""
    from ..engine.imagery import describe_raster

    info = describe_raster(path)
    cols = range(0, info.width - side + 1, stride)
    rows = range(0, info.height - side + 1, stride)
    return [(c, r, side) for r in rows for c in cols]


def discover_dataset(root: str | os.PathLike, train_window_sides: Sequence[int] = (150, 200, 260),
                     train_stride: int = 50, test_window: int = 150) -> Dataset:
    """Find the labelled images under ``root``.

    Args:
        root: the data folder (project layout or ``root/<class>/<image>``).
        train_window_sides: window sides (pixels) cut from training dune-field scenes; several
            sides so the encoder sees dunes at several scales.
        train_stride: step between training windows (overlap is fine inside the training side).
        test_window: side of the non-overlapping windows cut from held-out scenes (the
            evaluation's 150x150 dune-field patches).

    Raises:
        InputError: the folder is missing, holds no class folders, or a class folder is empty.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"The training data folder '{root}' does not exist",
                         "Give --data the folder holding mars/ and earth/ (or <class>/ folders)")
    hirise = root / "mars" / "hirise_landmarks"
    aid = root / "earth" / "aid"
    dunes = root / "earth" / "dune_fields"
    if hirise.is_dir() or aid.is_dir() or dunes.is_dir():
        records: list[ImageRecord] = []
        if hirise.is_dir():
            records += _labelled_folder(hirise, "mars", "hirise", exclude=EXCLUDED_CLASSES)
        if aid.is_dir():
            records += _labelled_folder(aid, "earth", "aid")
        if dunes.is_dir():
            for site in _class_folders(dunes):
                for scene in list_images(site):
                    # The DuneDetection project ships one training and one test scene per site;
                    # we keep its test scenes as our held-out scenes.
                    held = scene.stem.lower().endswith("_test")
                    if held:
                        windows = dune_scene_windows(scene, test_window, test_window)
                    else:
                        windows = [w for s in train_window_sides for w in dune_scene_windows(scene, s, train_stride)]
                    records += [ImageRecord(str(scene), "earth:dune_field", f"{site.name}/{scene.stem}",
                                            "dune_field", w, held) for w in windows]
        layout = "project"
    else:
        records = _labelled_folder(root, "earth", "folder")
        layout = "folders"
    if not records:
        raise InputError(f"No labelled images were found under '{root}'",
                         "Lay the images out as <data>/<class>/<image> (or the project's mars/ and earth/ layout)")
    return Dataset(str(root), records, layout)


def split_by_scene(records: Sequence[ImageRecord], seed: int, test_fraction: float = 0.1) -> list[bool]:
    """Choose held-out images, whole scenes at a time, about ``test_fraction`` of every group.

    Scenes are visited in a seeded random order; a scene goes to the held-out side when some
    group it holds is still below its target and no group would overshoot it by much. Groups
    whose images all come from a few big scenes (HiRISE dunes) therefore land near the target
    without ever splitting a scene. Records with a fixed ``held_out`` role keep it.

    Returns:
        One flag per record, ``True`` = held out.
    """
    rng = np.random.default_rng(seed)
    fixed = {r.scene: r.held_out for r in records if r.held_out is not None}
    counts: dict[str, dict[str, int]] = {}
    totals: dict[str, int] = {}
    for r in records:
        if r.scene in fixed:
            continue
        counts.setdefault(r.scene, {}).setdefault(r.group, 0)
        counts[r.scene][r.group] += 1
        totals[r.group] = totals.get(r.group, 0) + 1
    target = {g: max(1, round(test_fraction * n)) if n > 1 else 0 for g, n in totals.items()}
    cap = {g: max(1.7 * t, t + 3) for g, t in target.items()}
    taken = dict.fromkeys(totals, 0)
    scenes = sorted(counts)
    test_scenes = set()
    for idx in rng.permutation(len(scenes)):
        scene = scenes[idx]
        held = counts[scene]
        needed = any(taken[g] < target[g] for g in held)
        fits = all(taken[g] + n <= cap[g] for g, n in held.items())
        # Never take every image of a group: training must keep some of it.
        keeps = all(taken[g] + n < totals[g] for g, n in held.items())
        if needed and fits and keeps:
            test_scenes.add(scene)
            for g, n in held.items():
                taken[g] += n
        if all(taken[g] >= target[g] for g in totals):
            break
    return [fixed[r.scene] if r.scene in fixed else r.scene in test_scenes for r in records]


class PairTable:
    """Similar (1) / dissimilar (0) / ignored (-1) label for every pair of groups.

    Args:
        groups: the group names (``planet:landform``).
        analog_pairs: unordered group pairs that are similar across groups.
        ignored_pairs: unordered group pairs left out of the loss.
    """

    def __init__(self, groups: Sequence[str], analog_pairs: Iterable[frozenset] = ANALOG_PAIRS,
                 ignored_pairs: Iterable[frozenset] = IGNORED_PAIRS) -> None:
        self.groups = list(groups)
        self.index = {g: i for i, g in enumerate(self.groups)}
        n = len(self.groups)
        table = np.zeros((n, n), dtype=np.int8)
        analog = set(analog_pairs)
        ignored = set(ignored_pairs)
        for i, a in enumerate(self.groups):
            for j, b in enumerate(self.groups):
                if i == j or frozenset((a, b)) in analog:
                    table[i, j] = 1
                elif frozenset((a, b)) in ignored:
                    table[i, j] = -1
        self.table = table

    def label(self, a: str, b: str) -> int:
        """Pair label of two groups: 1 similar, 0 dissimilar, -1 ignored."""
        return int(self.table[self.index[a], self.index[b]])

    def similar_groups(self, group: int) -> np.ndarray:
        """Indices of the groups similar to ``group`` (itself included)."""
        return np.flatnonzero(self.table[group] == 1)

    def dissimilar_groups(self, group: int) -> np.ndarray:
        return np.flatnonzero(self.table[group] == 0)

    def describe(self) -> list[str]:
        """The cross-group similar and ignored pairs, as text (for the model card)."""
        out = []
        n = len(self.groups)
        for i in range(n):
            for j in range(i + 1, n):
                if self.table[i, j] != 0:
                    kind = "similar" if self.table[i, j] == 1 else "ignored"
                    out.append(f"{self.groups[i]} ~ {self.groups[j]}: {kind}")
        return out


def group_weights(groups: Sequence[str]) -> np.ndarray:
    """How often each group is drawn as a pair anchor.

    Groups are drawn evenly rather than by size, so the 30 AID classes do not drown the five Mars
    classes; Mars classes and the dune family (the point of the tool) get extra weight.
    """
    w = np.ones(len(groups), dtype=np.float64)
    for i, g in enumerate(groups):
        if g.startswith("mars:"):
            w[i] = 3.0
        if g in DUNE_FAMILY:
            w[i] = 4.0
    return w / w.sum()


def sample_pairs(group_ids: np.ndarray, table: PairTable, n_pairs: int, rng: np.random.Generator,
                 weights: np.ndarray | None = None,
                 cross_share: float = 0.5,
                 hard_share: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw balanced labelled pairs of image indices.

    Half the pairs are similar, half dissimilar. A similar pair takes its partner from another
    group declared analog (a cross-planet dune pair) with probability ``cross_share`` when the
    anchor's group has one, else from the anchor's own group. A dissimilar pair takes its
    partner, with probability ``hard_share``, from a group of the anchor's own planet (same
    sensor and look, the negatives that are hard to tell apart: crater vs other HiRISE terrain,
    dune field vs bare land), else from any dissimilar group.

    Args:
        group_ids: group index of every image that may be drawn.
        table: the pair rules.
        n_pairs: number of pairs.
        rng: numpy random generator (seeded by the caller for reproducibility).
        weights: anchor probability per group (default: :func:`group_weights`).
        cross_share: share of similar pairs drawn across groups when possible.
        hard_share: share of dissimilar pairs drawn from the anchor's planet when possible.

    Returns:
        ``(a, b, label)`` arrays of length ``n_pairs``: image indices and 1/0 labels.
    """
    n_groups = len(table.groups)
    members = [np.flatnonzero(group_ids == g) for g in range(n_groups)]
    present = np.array([len(m) > 0 for m in members])
    if present.sum() < 2:
        raise InputError("Pairs need images of at least two classes", "Add another class folder")
    w = group_weights(table.groups) if weights is None else np.asarray(weights, dtype=np.float64)
    w = np.where(present, w, 0.0)
    w = w / w.sum()
    a = np.empty(n_pairs, dtype=np.int64)
    b = np.empty(n_pairs, dtype=np.int64)
    label = (np.arange(n_pairs) % 2 == 0).astype(np.int64)
    anchors = rng.choice(n_groups, size=n_pairs, p=w)
    for k in range(n_pairs):
        g = anchors[k]
        a[k] = rng.choice(members[g])
        if label[k] == 1:
            others = [h for h in table.similar_groups(g) if h != g and present[h]]
            h = rng.choice(others) if others and rng.random() < cross_share else g
            pool = members[h]
            pick = rng.choice(pool)
            if h == g and len(pool) > 1:
                while pick == a[k]:  # a pair of one image with itself teaches nothing
                    pick = rng.choice(pool)
            b[k] = pick
        else:
            others = [h for h in table.dissimilar_groups(g) if present[h]]
            if not others:
                label[k] = 1
                b[k] = rng.choice(members[g])
                continue
            planet = table.groups[g].split(":", 1)[0]
            near = [h for h in others if table.groups[h].split(":", 1)[0] == planet]
            if near and rng.random() < hard_share:
                others = near
            ow = w[others] / w[others].sum()
            b[k] = rng.choice(members[rng.choice(others, p=ow)])
    return a, b, label


# -- pixels ------------------------------------------------------------------------------------

def _cache_key(records: Sequence[ImageRecord], size: int) -> str:
    h = hashlib.sha256()
    h.update(f"v1|{size}".encode())
    for r in records:
        st = os.stat(r.path)
        h.update(f"|{r.key()}|{st.st_size}|{int(st.st_mtime)}".encode())
    return h.hexdigest()[:20]


def load_patches(records: Sequence[ImageRecord], size: int, cache_dir: str | os.PathLike | None = None,
                 feedback=None, what: str = "images") -> np.ndarray:
    """Decode every record once into a ``(N, size, size)`` uint8 array (grey, engine reader).

    Images go through the engine's own reader (:func:`load_image_patch`: centred square,
    luminance, GDAL average resampling) so training sees what a search sees. Scene windows are
    read with one reader per scene. With ``cache_dir`` the array is kept in an ``.npy`` file
    keyed by the file list, sizes and dates, so later runs skip decoding.
    """
    cache_file = None
    if cache_dir:
        cache_file = Path(cache_dir) / f"patches-{_cache_key(records, size)}.npy"
        if cache_file.exists():
            arr = np.load(cache_file)
            if arr.shape == (len(records), size, size):
                return arr
    out = np.empty((len(records), size, size), dtype=np.uint8)
    readers: dict[str, GreyReader] = {}
    try:
        for i, r in enumerate(records):
            if r.window is None:
                patch, _ = load_image_patch(r.path, size)
            else:
                reader = readers.get(r.path)
                if reader is None:
                    reader = readers[r.path] = GreyReader(r.path, what="scene")
                col, row, side = r.window
                patch, _ = reader.read_window(col, row, side, side, size)
            out[i] = np.clip(np.rint(patch * 255.0), 0, 255).astype(np.uint8)
            if feedback is not None and (i % 500 == 0 or i == len(records) - 1):
                feedback.progress((i + 1) / len(records), f"decoding {what} {i + 1}/{len(records)}")
    finally:
        for reader in readers.values():
            reader.close()
    if cache_file is not None:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(cache_file.name + f".tmp-{os.getpid()}.npy")
            np.save(tmp, out)
            os.replace(tmp, cache_file)
        except OSError:
            pass  # a cache is an optimisation only
    return out


def per_patch_normalise(x):
    """Zero mean, unit standard deviation per patch (torch), as ``normalise_patches`` does."""
    mean = x.mean(dim=(-2, -1), keepdim=True)
    std = x.std(dim=(-2, -1), keepdim=True, unbiased=False)
    return (x - mean) / std.clamp_min(1e-3)


def augment_batch(images, out_size: int, generator, strength: float = 1.0):
    """Random views of a batch of grey images, on tensors.

    Each image gets one random similarity transform (dihedral rotation and flip, half the time
    plus an arbitrary angle, a crop of 75-100 % of its side anywhere inside it, resampled to
    ``out_size``), then with some probability a Gaussian blur (sensor resolution, focus), a gamma
    change and a little noise (illumination, exposure). The result is per-patch normalised.

    Args:
        images: ``(B, S, S)`` uint8 or float tensor in [0, 1] (uint8 is scaled by 1/255).
        out_size: side of the output patches.
        generator: ``torch.Generator`` for reproducible draws.
        strength: 0 = no augmentation (only resampling and normalisation), 1 = full.

    Returns:
        ``(B, 1, out_size, out_size)`` float32 tensor, per-patch normalised.
    """
    import torch
    import torch.nn.functional as F  # noqa: N812 - the usual torch spelling

    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    x = x[:, None]
    b = x.shape[0]

    def rand(*shape):
        return torch.rand(*shape, generator=generator)

    if strength > 0:
        # Mild crops (75-100 % of the side): HiRISE landmark crops are centred on their landform,
        # and a crop that loses the crater would teach a wrong label.
        scale = 1.0 - 0.25 * strength * rand(b)
        angle = (torch.randint(0, 4, (b,), generator=generator).float() * (math.pi / 2)
                 + (rand(b) < 0.5).float() * (rand(b) - 0.5) * (math.pi / 2) * strength)
        flip = torch.where(rand(b) < 0.5, -1.0, 1.0)
        # Keep the crop's centre such that the unrotated crop stays inside the image.
        tx = (rand(b) * 2 - 1) * (1 - scale)
        ty = (rand(b) * 2 - 1) * (1 - scale)
        cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
        theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
        grid = F.affine_grid(theta, (b, 1, out_size, out_size), align_corners=False)
        # Reflection fills the corners a rotated crop uncovers with plausible texture.
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        # Gaussian blur, per-image sigma, on half the batch.
        sigma = (0.3 + 1.2 * rand(b)) * (rand(b) < 0.35 * strength).float()
        if bool((sigma > 0).any()):
            radius = 4
            t = torch.arange(-radius, radius + 1, dtype=torch.float32)
            k = torch.exp(-0.5 * (t[None] / sigma.clamp_min(1e-3)[:, None]) ** 2)
            k = torch.where(sigma[:, None] > 0, k, (t[None] == 0).float())
            k = k / k.sum(1, keepdim=True)
            y = x.reshape(1, b, out_size, out_size)
            y = F.pad(y, (radius, radius, radius, radius), mode="reflect")
            y = F.conv2d(y, k[:, None, :, None], groups=b)
            y = F.conv2d(y, k[:, None, None, :], groups=b)
            x = y.reshape(b, 1, out_size, out_size)
        gamma = torch.exp((rand(b) * 2 - 1) * 0.25 * strength)[:, None, None, None]
        x = x.clamp(0, 1) ** gamma
        noise = (rand(b) < 0.3 * strength).float()[:, None, None, None] * 0.02
        x = x + noise * torch.randn(x.shape, generator=generator)
    elif x.shape[-1] != out_size:
        x = F.interpolate(x, size=(out_size, out_size), mode="area")
    return per_patch_normalise(x)


def split_record(dataset: Dataset, held_out: Sequence[bool], seed: int, test_fraction: float) -> dict:
    """A JSON-able record of the split: rule, seed and the held-out keys (for ``split.json``)."""
    keys = [r.key(dataset.root) for r, h in zip(dataset.records, held_out) if h]
    per_group: dict[str, list[int]] = {}
    for r, h in zip(dataset.records, held_out):
        c = per_group.setdefault(r.group, [0, 0])
        c[1 if h else 0] += 1
    return {
        "rule": "whole scenes held out (HiRISE observation id, AID image, dune-field *_test scenes), "
                f"about {test_fraction:.0%} of every class, seeded scene order",
        "seed": seed,
        "test_fraction": test_fraction,
        "data_root": "shared/data" if dataset.layout == "project" else dataset.root,
        "counts": {g: {"train": c[0], "held_out": c[1]} for g, c in sorted(per_group.items())},
        "held_out_sha256": hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest(),
        "held_out": sorted(keys),
    }


def records_to_json(records: Sequence[ImageRecord]) -> str:
    return json.dumps([asdict(r) for r in records])


def default_cache_dir() -> Path:
    """Where decoded patches are cached between runs (``$XDG_CACHE_HOME/siamese_analog_finder``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "siamese_analog_finder"
