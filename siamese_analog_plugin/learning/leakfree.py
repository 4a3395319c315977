"""Leak-free evaluation: a train / validation / test split with no shared ground, and the table.

Split rules (:func:`leakfree_roles`):

* HiRISE landmark crops are split by source observation (the file-name prefix before ``-``):
  about 15 % of every class to ``test`` and 15 % to ``val``, whole observations at a time.
* AID images are their own scenes (split per image, the same shares).
* Earth dune fields are split by whole *site* (``Kalahari``, ``Simpson``...): both scenes of a
  site (``*_image.jpg`` and ``*_test.jpg``, the same ground) always go to the same side. By
  default no site is trained on: every site is evaluated, one fold per site (leave-one-site-out
  with every fold's site unseen), reported as mean and standard deviation over the sites.
* ``mars/hirise_aeolian_patches`` is one HiRISE image: test only, never trained on.

``val`` serves every choice (recipe, epochs, temperature, width); ``test`` only the model card.
On the validation side the Earth dune family is AID ``Desert`` (no dune site is on that side).

Rows of the table (:data:`ROWS`):

* ``mars_dune_to_earth``: Mars dark/bright dune crops rank an Earth gallery (AID + one site's
  dune-field patches); relevant = Desert / dune field. One fold per site.
* ``earth_dune_to_mars``: a site's dune-field patches rank the HiRISE crops; relevant = dunes.
* ``mars_landforms``: crater / dark / bright crops rank all HiRISE crops; relevant = same class.
* ``aid``: AID ranks AID; relevant = same class.
* ``mars_sand_to_earth``: aeolian sand-ripple patches rank the Earth gallery (per site fold).
* ``fewshot5``: 5-shot balanced accuracy over crater / dark_dune / bright_dune / other HiRISE
  crops, cosine prototypes, random support draws.
* ``mars_sand_map``: aeolian sand (ripple + fine) patches rank all aeolian patches; relevant = sand.

Spread: the standard deviation over site folds (rows with a site), over support draws
(``fewshot5``), else over a bootstrap of the queries by scene (HiRISE observation, AID image).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..engine.errors import InputError
from .datasets import (
    Dataset,
    ImageRecord,
    default_data_root,
    discover_dataset,
    dune_scene_windows,
    load_patches,
    split_by_scene,
)
from .evaluation import average_precision, pairwise_distances

__all__ = [
    "ROWS",
    "TARGETS",
    "leakfree_roles",
    "leakfree_split_record",
    "site_of",
    "resolve_dune_sites",
    "Bench",
    "build_bench",
    "score_bench",
    "fewshot_accuracy",
    "evaluate_leakfree",
    "format_leakfree_table",
    "validation_score",
    "sites_seen",
    "merge_site_folds",
]

SITE_ROWS = ("mars_dune_to_earth", "earth_dune_to_mars", "mars_sand_to_earth")  # scored per dune site
ROWS = ("mars_dune_to_earth", "earth_dune_to_mars", "mars_landforms", "aid", "mars_sand_to_earth", "fewshot5",
        "mars_sand_map")
TARGETS = {"mars_dune_to_earth": 0.70, "earth_dune_to_mars": 0.30, "mars_landforms": 0.60, "aid": 0.60,
           "mars_sand_to_earth": 0.65, "fewshot5": 0.75}
MARS_DUNES = ("mars:dark_dune", "mars:bright_dune")
EARTH_DUNES = ("earth:Desert", "earth:dune_field")
FEWSHOT_CLASSES = ("mars:crater", "mars:dark_dune", "mars:bright_dune", "mars:other")
SAND = ("mars:sand_ripple", "mars:sand_fine")
VAL_SHARE = 0.15
TEST_SHARE = 0.15
SITE_PATCH = 150  # side of the non-overlapping windows cut from dune-field scenes for evaluation


def site_of(record: ImageRecord) -> str:
    """The dune-field site of a record (its folder under ``earth/dune_fields``), else ``""``."""
    if record.source != "dune_field":
        return ""
    return Path(record.path).parent.name


def resolve_dune_sites(records: Sequence[ImageRecord], names: Sequence[str]) -> list[str]:
    """The dune-field site names ``names`` asks for (``all`` = every site), checked against the data.

    Raises:
        InputError: a name that is not a site folder under ``earth/dune_fields`` (the sites are listed).
    """
    sites = sorted({site_of(r) for r in records if r.source == "dune_field"})
    names = [n for n in names if n]
    if "all" in names:
        if len(names) > 1:
            raise InputError("'all' cannot be combined with site names", "Give either all or the site names")
        return sites
    unknown = [n for n in names if n not in sites]
    if unknown:
        raise InputError(f"Unknown dune-field site '{unknown[0]}'",
                         "Use one of " + (", ".join(sites) or "(none found under earth/dune_fields)") + " or all")
    return sorted(set(names))


def leakfree_roles(records: Sequence[ImageRecord], seed: int = 0, val_share: float = VAL_SHARE,
                   test_share: float = TEST_SHARE, dune_train_sites: Sequence[str] = ()) -> list[str]:
    """``"train"``, ``"val"`` or ``"test"`` for every record, with no scene or site on two sides.

    HiRISE and AID records are split by scene (:func:`split_by_scene`: test first, then val from
    the rest). Dune-field records go by site: sites in ``dune_train_sites`` train, all others are
    test (both of a site's scenes together). Aeolian patches (source ``aeolian``) are test only.
    """
    roles = [""] * len(records)
    plain = []
    for i, r in enumerate(records):
        if r.source == "dune_field":
            roles[i] = "train" if site_of(r) in dune_train_sites else "test"
        elif r.source == "aeolian":
            roles[i] = "test"
        else:
            plain.append(i)
    # split_by_scene honours a fixed held_out flag; these records have none, so drop it.
    recs = [ImageRecord(records[i].path, records[i].group, records[i].scene, records[i].source,
                        records[i].window, None) for i in plain]
    test = split_by_scene(recs, seed, test_share)
    rest = [k for k, t in enumerate(test) if not t]
    val = split_by_scene([recs[k] for k in rest], seed + 1, val_share / (1.0 - test_share))
    for k, t in enumerate(test):
        roles[plain[k]] = "test" if t else "train"
    for j, v in zip(rest, val):
        if v:
            roles[plain[j]] = "val"
    return roles


def _keys(dataset_root: str, records, roles, role: str) -> list[str]:
    return sorted({r.key(dataset_root) for r, ro in zip(records, roles) if ro == role})


def leakfree_split_record(dataset: Dataset, roles: Sequence[str], seed: int,
                          dune_train_sites: Sequence[str] = ()) -> dict:
    """The JSON record of a leak-free split (``<model>.split.json``).

    ``held_out`` lists every image training never saw (val + test), as the older split files did,
    so the few-shot and transfer commands keep away from it; ``val`` and ``test`` list the parts.
    Dune-field sites are listed by name (their windows are not listed one by one).
    """
    per_group: dict[str, dict[str, int]] = {}
    for r, ro in zip(dataset.records, roles):
        c = per_group.setdefault(r.group, {"train": 0, "val": 0, "test": 0})
        c[ro] += 1
    plain = [(r, ro) for r, ro in zip(dataset.records, roles) if r.source != "dune_field"]
    val = sorted({r.key(dataset.root) for r, ro in plain if ro == "val"})
    test = sorted({r.key(dataset.root) for r, ro in plain if ro == "test"})
    sites = sorted({site_of(r) for r in dataset.records if r.source == "dune_field"})
    held = sorted(val + test)
    return {
        "rule": "leak-free: HiRISE by source observation, AID per image (15 % val, 15 % test of every class, "
                "seeded scene order); Earth dune fields by whole site (both scenes of a site on one side); "
                "hirise_aeolian_patches test only",
        "protocol": "leakfree",
        "seed": seed,
        "val_share": VAL_SHARE,
        "test_share": TEST_SHARE,
        "data_root": "shared/data" if dataset.layout == "project" else dataset.root,
        "dune_sites": {"train": sorted(s for s in sites if s in dune_train_sites),
                       "test": sorted(s for s in sites if s not in dune_train_sites)},
        "aeolian": "test only (one HiRISE scene)",
        "counts": dict(sorted(per_group.items())),
        "val_sha256": hashlib.sha256("\n".join(val).encode()).hexdigest(),
        "test_sha256": hashlib.sha256("\n".join(test).encode()).hexdigest(),
        "held_out_sha256": hashlib.sha256("\n".join(held).encode()).hexdigest(),
        "val": val,
        "test": test,
        "held_out": held,
    }


# -- evaluation data ------------------------------------------------------------------------------

def _aeolian_records(root: Path) -> list[ImageRecord]:
    from ..engine.imagery import list_images

    folder = root / "mars" / "hirise_aeolian_patches"
    if not folder.is_dir():
        return []
    out = []
    for cls in sorted(p for p in folder.iterdir() if p.is_dir()):
        out += [ImageRecord(str(f), f"mars:{cls.name}", "aeolian", "aeolian") for f in list_images(cls)]
    return out


def _site_records(root: Path, sites: Sequence[str] | None = None) -> list[ImageRecord]:
    """Non-overlapping ``SITE_PATCH`` windows of both scenes of every dune-field site."""
    from ..engine.imagery import list_images

    folder = root / "earth" / "dune_fields"
    if not folder.is_dir():
        return []
    out = []
    for site in sorted(p for p in folder.iterdir() if p.is_dir()):
        if sites is not None and site.name not in sites:
            continue
        for scene in list_images(site):
            out += [ImageRecord(str(scene), "earth:dune_field", site.name, "dune_field", w, True)
                    for w in dune_scene_windows(scene, SITE_PATCH, SITE_PATCH)]
    return out


@dataclass
class Bench:
    """One side (val or test) of the leak-free split, decoded: patches and their labels."""

    part: str
    patches: np.ndarray  # (N, S, S) uint8
    groups: np.ndarray  # str
    sources: np.ndarray  # hirise | aid | dune_field | aeolian
    scenes: np.ndarray  # observation / image id / site
    sites: np.ndarray  # dune-field site or ""

    def __len__(self) -> int:
        return len(self.groups)


def build_bench(data_root: str | Path, part: str, size: int = 100, seed: int = 0,
                dune_train_sites: Sequence[str] = (), cache_dir: str | None = None, feedback=None,
                dataset: Dataset | None = None) -> Bench:
    """Decode the ``val`` or ``test`` side of the leak-free split (HiRISE, AID, sites, aeolian)."""
    if part not in ("val", "test"):
        raise InputError(f"Unknown split part '{part}'", "Use val or test")
    root = Path(data_root)
    dataset = dataset or discover_dataset(root)
    plain = [r for r in dataset.records if r.source != "dune_field"]
    roles = leakfree_roles(plain, seed)
    records = [r for r, ro in zip(plain, roles) if ro == part]
    if part == "test":
        all_sites = sorted({site_of(r) for r in dataset.records if r.source == "dune_field"})
        records += _site_records(root, [s for s in all_sites if s not in dune_train_sites])
        records += _aeolian_records(root)
    patches = load_patches(records, size, cache_dir, feedback, f"{part} images")
    return Bench(part, patches, np.array([r.group for r in records]), np.array([r.source for r in records]),
                 np.array([r.scene for r in records]), np.array([site_of(r) for r in records]))


# -- scoring --------------------------------------------------------------------------------------

def _aps(emb: np.ndarray, q: np.ndarray, gal: np.ndarray, rel: np.ndarray) -> np.ndarray:
    """Average precision of every query (queries with no relevant item get nan)."""
    d = pairwise_distances(emb[q], emb[gal])
    out = np.full(len(q), np.nan)
    for i in range(len(q)):
        keep = gal != q[i]
        order = np.argsort(d[i, keep], kind="stable")
        out[i] = average_precision(rel[i, keep][order])
    return out


def _mean_ap(aps) -> float:
    """Mean average precision of the queries that have one (NaN, quietly, when none has a
    relevant item in its gallery)."""
    aps = np.asarray(aps, dtype=float)
    return float(np.nanmean(aps)) if np.isfinite(aps).any() else float("nan")


def _bootstrap_std(values: np.ndarray, clusters: np.ndarray, n: int = 200, seed: int = 0) -> float:
    """Std of the mean of ``values`` over a bootstrap that resamples whole clusters (scenes)."""
    ok = ~np.isnan(values)
    values, clusters = values[ok], clusters[ok]
    if len(values) < 2:
        return float("nan")
    ids, inv = np.unique(clusters, return_inverse=True)
    sums = np.bincount(inv, weights=values, minlength=len(ids))
    counts = np.bincount(inv, minlength=len(ids))
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(n):
        pick = rng.integers(0, len(ids), len(ids))
        means.append(sums[pick].sum() / max(counts[pick].sum(), 1))
    return float(np.std(means))


def fewshot_accuracy(emb: np.ndarray, labels: np.ndarray, k: int = 5, draws: int = 20, seed: int = 0,
                     max_query_per_class: int = 60, method: str = "prototype") -> np.ndarray:
    """Balanced accuracy of a cosine classifier, one value per random support draw.

    ``method``: ``prototype`` (cosine to the normalised mean of each class's support embeddings,
    what ``fewshot`` uses) or ``knn`` (cosine to the nearest single support example).
    """
    x = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    classes = np.unique(labels)
    rng = np.random.default_rng(seed)
    accs = []
    for _ in range(draws):
        support, query = [], []
        for c in classes:
            members = rng.permutation(np.flatnonzero(labels == c))
            support.append(members[:k])
            query.append(members[k:k + max_query_per_class])
        s, q = np.concatenate(support), np.concatenate(query)
        cos = x[q] @ x[s].T
        if method == "knn":
            pred = labels[s][np.argmax(cos, axis=1)]
        else:
            protos = np.stack([x[s][labels[s] == c].mean(0) for c in classes])
            protos /= np.maximum(np.linalg.norm(protos, axis=1, keepdims=True), 1e-12)
            pred = classes[np.argmax(x[q] @ protos.T, axis=1)]
        accs.append(np.mean([np.mean(pred[labels[q] == c] == c) for c in classes if (labels[q] == c).any()]))
    return np.array(accs)


def score_bench(emb: np.ndarray, bench: Bench, draws: int = 20, seed: int = 0,
                fewshot_method: str = "prototype") -> dict[str, dict]:
    """Every row that ``bench`` allows: ``{row: {"mean", "std", "n", "chance", "folds"}}``."""
    g, src, sites = bench.groups, bench.sources, bench.sites
    idx = np.arange(len(g))
    hirise = idx[src == "hirise"]
    aid = idx[src == "aid"]
    mars_dunes = idx[np.isin(g, MARS_DUNES)]
    site_names = sorted({s for s in sites if s})
    out: dict[str, dict] = {}

    def per_query(q, gal, rel_fn):
        rel = rel_fn(q, gal)
        return _aps(emb, q, gal, rel), float(np.mean(rel))

    def is_in(family):
        return lambda q, gal: np.broadcast_to(np.isin(g[gal], family)[None, :], (len(q), len(gal)))

    def same(q, gal):
        return g[q][:, None] == g[gal][None, :]

    def folds(row, queries_of, gallery_of, rel_fn):
        vals, chances, per = [], [], {}
        for s in site_names:
            q, gal = queries_of(s), gallery_of(s)
            if not len(q) or not len(gal):
                continue
            aps, ch = per_query(q, gal, rel_fn)
            per[s] = _mean_ap(aps)
            vals.append(per[s])
            chances.append(ch)
        if vals:
            out[row] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "n": len(vals),
                        "chance": float(np.mean(chances)), "folds": per, "spread": "std over sites"}

    def single(row, q, gal, rel_fn, clusters):
        if not len(q) or not len(gal):
            return
        aps, ch = per_query(q, gal, rel_fn)
        out[row] = {"mean": _mean_ap(aps), "std": _bootstrap_std(aps, clusters), "n": int(len(q)),
                    "chance": ch, "spread": "bootstrap over query scenes"}

    if site_names:  # test side: one fold per site
        folds("mars_dune_to_earth", lambda s: mars_dunes, lambda s: np.concatenate([aid, idx[sites == s]]),
              is_in(EARTH_DUNES))
        folds("earth_dune_to_mars", lambda s: idx[sites == s], lambda s: hirise, is_in(MARS_DUNES))
        sand_ripple = idx[g == "mars:sand_ripple"]
        if len(sand_ripple):
            folds("mars_sand_to_earth", lambda s: sand_ripple, lambda s: np.concatenate([aid, idx[sites == s]]),
                  is_in(EARTH_DUNES))
    else:  # validation side: AID Desert stands for the Earth dune family
        single("mars_dune_to_earth", mars_dunes, aid, is_in(EARTH_DUNES), bench.scenes[mars_dunes])
        desert = idx[g == "earth:Desert"]
        single("earth_dune_to_mars", desert, hirise, is_in(MARS_DUNES), bench.scenes[desert])
    landform_q = idx[np.isin(g, ("mars:crater",) + MARS_DUNES)]
    single("mars_landforms", landform_q, hirise, same, bench.scenes[landform_q])
    single("aid", aid, aid, same, bench.scenes[aid])
    fs = idx[np.isin(g, FEWSHOT_CLASSES)]
    if len(fs) and all((g[fs] == c).sum() > 5 for c in FEWSHOT_CLASSES):
        accs = fewshot_accuracy(emb[fs], g[fs], 5, draws, seed, method=fewshot_method)
        out["fewshot5"] = {"mean": float(accs.mean()), "std": float(accs.std()), "n": int(draws), "chance": 0.25,
                           "spread": "std over support draws"}
    sand_q = idx[np.isin(g, SAND)]
    aeolian = idx[src == "aeolian"]
    if len(sand_q):
        single("mars_sand_map", sand_q, aeolian, is_in(SAND), np.arange(len(sand_q)))
    return out


def validation_score(rows: dict[str, dict]) -> float:
    """The one number choices are made on: the mean of the rows the validation side has."""
    vals = [rows[r]["mean"] for r in ROWS if r in rows and not np.isnan(rows[r]["mean"])]
    return float(np.mean(vals)) if vals else float("nan")


# -- running it -----------------------------------------------------------------------------------

def _embed_encoder(encoder, patches_u8: np.ndarray) -> np.ndarray:
    return encoder.embed(patches_u8.astype(np.float32) / 255.0)


def sites_seen(metadata, all_sites: Sequence[str]) -> list[str]:
    """The dune-field sites a model was trained on, from its metadata.

    Leak-free models record ``dune_train_sites``. A model of the older 9:1 split trained on the
    ``*_image`` scene of every site when dune fields were among its sources. A transfer step
    (``transfer --step 1/2``) saw what its parent saw. When the record cannot tell, every site
    counts as seen.
    """
    t = getattr(metadata, "training", metadata) or {}
    while t.get("protocol") != "leakfree" and "step" in t and "parent" in t:  # up to the encoder's own training
        if "dune_fields" in str(t.get("data", "")):  # a step trained on dune-field scenes saw their sites
            return sorted(all_sites)
        t = t["parent"]
        if not isinstance(t, dict):
            return sorted(all_sites)
    if t.get("protocol") == "leakfree":
        return sorted(t.get("dune_train_sites", []))
    data = t.get("data")
    if not isinstance(data, dict):
        return sorted(all_sites)
    return sorted(all_sites) if "dune_field" in data.get("sources", []) else []


def merge_site_folds(rows: dict[str, dict], seen: Sequence[str], fold_rows: dict[str, dict[str, dict]],
                     fold_files: dict[str, str] | None = None) -> dict[str, dict]:
    """Rows whose per-site values never come from a model that trained on that site.

    ``rows``: a model's scores; per-site values of the sites in ``seen`` are dropped. ``fold_rows``:
    site -> the scores of a fold model that did not see that site; its value for the site is used.
    The result's site rows are the mean and std over the sites left (a row with none is dropped).
    """
    out = dict(rows)
    for row in SITE_ROWS:
        base = rows.get(row)
        if base is not None and "folds" not in base:
            continue  # scored without sites (the validation side: AID Desert stands for dune fields)
        per = {s: v for s, v in (base or {}).get("folds", {}).items() if s not in seen}
        source = {s: "model" for s in per}
        for site, frows in fold_rows.items():
            value = frows.get(row, {}).get("folds", {}).get(site)
            if value is not None and (site in seen or site not in per):  # the model's own unseen sites stay
                per[site] = value
                source[site] = (fold_files or {}).get(site, "fold model")
        ref = base or next((f[row] for f in fold_rows.values() if row in f), None)
        if not per or ref is None:
            out.pop(row, None)
            continue
        vals = np.array([per[s] for s in sorted(per)])
        out[row] = {**ref, "mean": float(np.mean(vals)), "std": float(np.std(vals)), "n": len(vals),
                    "folds": dict(sorted(per.items())), "fold_source": source,
                    "spread": "std over sites" + (" (unseen-site fold models)" if fold_rows else "")}
    return out


def evaluate_leakfree(models: dict[str, str | None], data_root: str | None = None, part: str = "test",
                      seed: int = 0, untrained: bool = True, texture: bool = True, draws: int = 20,
                      cache_dir: str | None = None, device: str = "cpu", feedback=None,
                      fewshot_method: str = "prototype", bench: Bench | None = None,
                      folds: Sequence[str] = ()) -> dict:
    """Score model files (label -> path, ``None`` = shipped) and the baselines on one split side.

    A model's per-site rows never use a site it trained on (:func:`sites_seen`): those values are
    dropped, or, for the first model, taken from the ``folds`` model files (leave-one-site-out
    models: each site is scored with a fold model that never saw it).

    Returns ``{"columns": {label: rows}, "info": {...}}``; ``rows`` as :func:`score_bench`.

    Raises:
        InputError: a fold model that trained on every site, or two fold models for one site.
    """
    import torch

    from ..engine.encoder import build_network, load_model
    from .evaluation import embed_with_network
    from .texture import texture_descriptor

    root = Path(data_root or default_data_root())
    bench = bench or build_bench(root, part, 100, seed, (), cache_dir, feedback)
    all_sites = sorted({s for s in bench.sites if s})
    fold_rows: dict[str, dict] = {}
    fold_files: dict[str, str] = {}
    for path in folds if all_sites else ():  # (the validation side has no dune site to fill)
        enc = load_model(path, device)
        unseen = [s for s in all_sites if s not in sites_seen(enc.metadata, all_sites)]
        if not unseen and all_sites:
            raise InputError(f"The fold model '{path}' was trained on every dune-field site",
                             "Give models trained with --split leakfree --dune-sites leaving one site out")
        rows = score_bench(_embed_encoder(enc, bench.patches), bench, draws, seed, fewshot_method)
        for site in unseen:
            if site in fold_rows:
                raise InputError(f"Two fold models leave out the site '{site}': {fold_files[site]} and {path}",
                                 "Give one fold model per left-out site")
            fold_rows[site], fold_files[site] = rows, str(path)
    columns: dict[str, dict] = {}
    first = None
    for label, path in models.items():
        t = time.perf_counter()
        enc = load_model(path, device)
        rows = score_bench(_embed_encoder(enc, bench.patches), bench, draws, seed, fewshot_method)
        seen = sites_seen(enc.metadata, all_sites)
        columns[label] = merge_site_folds(rows, seen, fold_rows if first is None else {}, fold_files)
        columns[label]["_file"] = {"path": str(enc.path), "seconds": round(time.perf_counter() - t, 1),
                                   "sites_seen": seen}
        first = first or enc
    if untrained and first is not None:
        torch.manual_seed(seed)
        meta = first.metadata
        net = build_network(meta.architecture, meta.input_size, **{**meta.arch_params,
                                                                    "embedding_dim": meta.embedding_dim})
        columns["untrained"] = score_bench(embed_with_network(net, bench.patches, meta.normalisation), bench,
                                           draws, seed, fewshot_method)
    if texture:
        columns["texture"] = score_bench(texture_descriptor(bench.patches.astype(np.float32) / 255.0), bench,
                                         draws, seed, fewshot_method)
    counts: dict[str, int] = {}
    for gname in bench.groups:
        counts[gname] = counts.get(gname, 0) + 1
    info = {"part": part, "seed": seed, "images": len(bench), "counts": dict(sorted(counts.items())),
            "sites": all_sites, "folds": fold_files,
            "hirise_observations": int(len({s for s, src in zip(bench.scenes, bench.sources) if src == "hirise"}))}
    return {"columns": columns, "info": info}


def format_leakfree_table(report: dict) -> str:
    """Markdown: one row per task, one column per encoder, ``mean ± spread``; chance and target."""
    cols = list(report["columns"])
    lines = ["| row | " + " | ".join(cols) + " | chance | target | spread over |",
             "|---|" + "---|" * (len(cols) + 3)]
    for row in ROWS:
        cells, chance, spread = [], None, ""
        for c in cols:
            r = report["columns"][c].get(row)
            if r is None:
                cells.append("n/a")
                continue
            chance, spread = r["chance"], r.get("spread", "")
            cells.append(f"{r['mean']:.3f} ± {r['std']:.3f}")
        if all(c == "n/a" for c in cells):
            continue
        target = TARGETS.get(row)
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {chance:.3f} | "
                     + (f">= {target:.2f}" if target else "") + f" | {spread} |")
    # Only the rows every column has, so the means compare like with like (a model's seen sites
    # take its site rows away).
    common = [r for r in ROWS if all(r in report["columns"][c] and not np.isnan(report["columns"][c][r]["mean"])
                                     for c in cols)]
    means = [validation_score({k: v for k, v in report["columns"][c].items() if k in common}) for c in cols]
    lines.append(f"| mean of the {len(common)} rows every column has | " + " | ".join(f"{m:.3f}" for m in means)
                 + " | | | |")
    return "\n".join(lines)
