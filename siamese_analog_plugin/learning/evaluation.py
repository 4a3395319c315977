"""Held-out evaluation: retrieval mAPs, pair verification, and the baselines.

All distances are Euclidean between embeddings. Tasks on the held-out images (see
:func:`retrieval_tasks`):

* ``cross_dune_map``: Mars dune crops (dark + bright) rank an Earth gallery (AID images and
  150x150 patches of held-out dune-field scenes); relevant = Desert and dune-field patches.
* ``earth_to_mars_map``: Earth dune-field patches rank the HiRISE crops; relevant = dunes.
* ``mars_map``: crater / dark / bright dune crops rank all HiRISE crops; relevant = same class.
* ``earth_map``: every AID image ranks the others; relevant = same class.
* ``pair_accuracy`` / ``roc_auc``: held-out pairs labelled by the training pair rules; the
  accuracy threshold is chosen on training pairs, never on held-out ones.

Baselines computed in the same run: the untrained network (same architecture, seeded init) and
the hand-made texture descriptor of :mod:`.texture`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..engine.errors import InputError
from .datasets import (
    Dataset,
    PairTable,
    default_data_root,
    discover_dataset,
    load_patches,
    sample_pairs,
    split_by_scene,
)

__all__ = [
    "average_precision",
    "retrieval_map",
    "roc_auc",
    "best_threshold",
    "pairwise_distances",
    "EvalData",
    "build_eval_data",
    "retrieval_tasks",
    "score_embeddings",
    "evaluate_model",
    "format_table",
]

METRICS = ("cross_dune_map", "earth_to_mars_map", "mars_map", "earth_map", "pair_accuracy", "roc_auc")
TARGETS = {"cross_dune_map": 0.40, "earth_to_mars_map": 0.40, "mars_map": 0.60, "earth_map": 0.40}
MARS_DUNES = ("mars:dark_dune", "mars:bright_dune")
EARTH_DUNES = ("earth:Desert", "earth:dune_field")


# -- metrics -----------------------------------------------------------------------------------

def average_precision(relevant_in_rank_order: Sequence[bool]) -> float:
    """Average precision of one ranked list: mean of precision@k over the ranks k of relevant items.

    Returns ``nan`` when nothing is relevant.
    """
    rel = np.asarray(relevant_in_rank_order, dtype=bool)
    n_rel = int(rel.sum())
    if n_rel == 0:
        return float("nan")
    hits = np.cumsum(rel)
    ranks = np.flatnonzero(rel) + 1
    return float(np.mean(hits[rel] / ranks))


def retrieval_map(distances: np.ndarray, relevant: np.ndarray, exclude: np.ndarray | None = None) -> float:
    """Mean average precision of queries ranking a gallery by increasing distance.

    Args:
        distances: ``(Q, G)`` query-to-gallery distances.
        relevant: ``(Q, G)`` bool, which gallery items are relevant to each query.
        exclude: ``(Q, G)`` bool, items left out of a query's ranking (the query itself).

    Returns:
        The mean over queries that have at least one relevant item (``nan`` if none has).
    """
    aps = []
    for q in range(distances.shape[0]):
        keep = np.ones(distances.shape[1], dtype=bool) if exclude is None else ~exclude[q]
        d = distances[q, keep]
        r = relevant[q, keep]
        order = np.argsort(d, kind="stable")
        ap = average_precision(r[order])
        if not np.isnan(ap):
            aps.append(ap)
    return float(np.mean(aps)) if aps else float("nan")


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (probability a positive outscores a negative; ties count half)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # Average ranks over ties (Mann-Whitney U).
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def best_threshold(distances: np.ndarray, labels: np.ndarray) -> float:
    """Distance threshold (similar when ``d <= t``) that maximises accuracy on these pairs."""
    d = np.asarray(distances, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    order = np.argsort(d, kind="stable")
    d, y = d[order], y[order]
    # Accuracy when the first k pairs are called similar.
    correct = np.concatenate([[(~y).sum()], (~y).sum() + np.cumsum(np.where(y, 1, -1))])
    k = int(np.argmax(correct))
    if k == 0:
        return float(d[0] - 1e-6)
    if k == len(d):
        return float(d[-1] + 1e-6)
    return float((d[k - 1] + d[k]) / 2)


def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances between the rows of ``a`` and ``b``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.maximum(sq, 0.0))


# -- data --------------------------------------------------------------------------------------

@dataclass
class EvalData:
    """Held-out images and fixed pairs, plus training pairs to choose the accuracy threshold.

    Attributes:
        groups: group name of every held-out image.
        sources: collection of every held-out image.
        patches: ``(N, S, S)`` uint8 held-out patches (engine reader, encoder input size).
        pairs: ``(a, b, label)`` held-out pairs.
        train_patches: ``(M, S, S)`` uint8 patches of a fixed training subset.
        train_pairs: ``(a, b, label)`` pairs over ``train_patches``.
        table: the pair rules.
    """

    groups: list[str]
    sources: list[str]
    patches: np.ndarray
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray]
    train_patches: np.ndarray
    train_pairs: tuple[np.ndarray, np.ndarray, np.ndarray]
    table: PairTable


def build_eval_data(dataset: Dataset, held_out: Sequence[bool], size: int, seed: int,
                    cache_dir: str | None = None, n_pairs: int = 4000, n_train_images: int = 1500,
                    feedback=None) -> EvalData:
    """Load held-out patches and draw the fixed evaluation pairs (seeded)."""
    table = PairTable(dataset.groups())
    held = [r for r, h in zip(dataset.records, held_out) if h]
    train = [r for r, h in zip(dataset.records, held_out) if not h]
    if not held:
        raise InputError("The split left no held-out images", "Use more images per class or a larger test fraction")
    rng = np.random.default_rng([seed, 7])
    pick = np.sort(rng.choice(len(train), size=min(n_train_images, len(train)), replace=False))
    train_sub = [train[i] for i in pick]
    patches = load_patches(held, size, cache_dir, feedback, "held-out images")
    train_patches = load_patches(train_sub, size, cache_dir, feedback, "training sample")
    gid = np.array([table.index[r.group] for r in held])
    tgid = np.array([table.index[r.group] for r in train_sub])
    pairs = sample_pairs(gid, table, n_pairs, np.random.default_rng([seed, 8]))
    train_pairs = sample_pairs(tgid, table, n_pairs, np.random.default_rng([seed, 9]))
    return EvalData([r.group for r in held], [r.source for r in held], patches, pairs, train_patches,
                    train_pairs, table)


def retrieval_tasks(groups: Sequence[str], sources: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    """Query and gallery indices of each retrieval task, and how relevance is decided.

    Returns:
        ``{name: (query_idx, gallery_idx, rule)}`` with rule ``"same"`` (same group) or
        ``"earth_dune"`` / ``"mars_dune"`` (gallery item in that family). Tasks whose queries
        or gallery are missing in this data are left out.
    """
    g = np.asarray(groups)
    s = np.asarray(sources)
    idx = np.arange(len(g))
    aid = idx[np.isin(s, ("aid", "folder"))]
    hirise = idx[s == "hirise"]
    mars_dunes = idx[np.isin(g, MARS_DUNES)]
    dune_patches = idx[g == "earth:dune_field"]
    tasks = {
        "cross_dune_map": (mars_dunes, np.concatenate([aid, dune_patches]), "earth_dune"),
        "earth_to_mars_map": (dune_patches, hirise, "mars_dune"),
        "mars_map": (idx[np.isin(g, ("mars:crater",) + MARS_DUNES)], hirise, "same"),
        "earth_map": (aid, aid, "same"),
    }
    return {k: v for k, v in tasks.items() if len(v[0]) and len(v[1])}


def score_embeddings(emb: np.ndarray, data: EvalData, train_emb: np.ndarray) -> dict[str, float]:
    """All metrics for one set of held-out embeddings (and the training-sample embeddings)."""
    g = np.asarray(data.groups)
    out: dict[str, float] = {}
    for name, (q, gal, rule) in retrieval_tasks(data.groups, data.sources).items():
        d = pairwise_distances(emb[q], emb[gal])
        if rule == "same":
            rel = g[q][:, None] == g[gal][None, :]
        elif rule == "earth_dune":
            rel = np.broadcast_to(np.isin(g[gal], EARTH_DUNES)[None, :], d.shape)
        else:
            rel = np.broadcast_to(np.isin(g[gal], MARS_DUNES)[None, :], d.shape)
        exclude = q[:, None] == gal[None, :]
        out[name] = retrieval_map(d, rel, exclude)
        out[name.replace("_map", "_chance")] = float(np.mean(rel[~exclude]))
    a, b, y = data.pairs
    ta, tb, ty = data.train_pairs
    d_train = np.linalg.norm(train_emb[ta] - train_emb[tb], axis=1)
    t = best_threshold(d_train, ty)
    d = np.linalg.norm(emb[a] - emb[b], axis=1)
    out["pair_accuracy"] = float(np.mean((d <= t) == (y == 1)))
    out["roc_auc"] = roc_auc(-d, y)
    out["threshold"] = t
    return out


def _to_unit(patches_u8: np.ndarray) -> np.ndarray:
    return patches_u8.astype(np.float32) / 255.0


def embed_with_network(network, patches_u8: np.ndarray, normalisation: dict, device=None,
                       batch_size: int = 256) -> np.ndarray:
    """Embed uint8 patches with a bare network (eval mode), normalised as the model file says."""
    import torch

    from ..engine.encoder import normalise_patches

    device = device or torch.device("cpu")
    was_training = network.training
    network.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(patches_u8), batch_size):
            x = normalise_patches(_to_unit(patches_u8[start:start + batch_size]), normalisation)
            out.append(network(torch.from_numpy(x[:, None]).to(device)).float().cpu().numpy())
    network.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def evaluate_model(model_path: str | None, data_root: str | None = None, seed: int | None = None,
                   test_fraction: float | None = None, baselines: bool = True, device: str = "auto",
                   cache_dir: str | None = None, feedback=None) -> dict[str, dict[str, float]]:
    """Evaluate a model file (and the baselines) on the held-out split it was trained with.

    The split is recomputed from the seed and test fraction stored in the model file (or given),
    so it is the one training excluded; when a ``<model>.split.json`` sits beside the model,
    the recomputed held-out list is checked against it.

    Returns:
        ``{"model": metrics, "untrained": metrics, "texture": metrics}`` (baselines optional).
    """
    import torch

    from ..engine.encoder import build_network, load_model
    from .texture import texture_descriptor

    encoder = load_model(model_path, device)
    meta = encoder.metadata
    training = meta.training or {}
    seed = int(training.get("seed", 0)) if seed is None else seed
    test_fraction = float(training.get("test_fraction", 0.1)) if test_fraction is None else test_fraction
    dataset = discover_dataset(data_root or default_data_root())
    held_out = split_by_scene(dataset.records, seed, test_fraction)
    split_file = Path(encoder.path).with_suffix(".split.json") if encoder.path else None
    if split_file is not None and split_file.exists() and feedback is not None:
        from .datasets import split_record

        recorded = json.loads(split_file.read_text()).get("held_out_sha256")
        now = split_record(dataset, held_out, seed, test_fraction)["held_out_sha256"]
        if recorded != now:
            feedback.log(f"warning: the held-out images differ from {split_file.name} (other data or seed)")
    data = build_eval_data(dataset, held_out, meta.input_size, seed, cache_dir, feedback=feedback)
    results: dict[str, dict[str, float]] = {}
    embed = encoder.embed
    results["model"] = score_embeddings(embed(_to_unit(data.patches)), data, embed(_to_unit(data.train_patches)))
    if baselines:
        torch.manual_seed(seed)
        params = {**meta.arch_params, "embedding_dim": meta.embedding_dim}
        net = build_network(meta.architecture, meta.input_size, **params).to(encoder.device)
        results["untrained"] = score_embeddings(
            embed_with_network(net, data.patches, meta.normalisation, encoder.device), data,
            embed_with_network(net, data.train_patches, meta.normalisation, encoder.device))
        results["texture"] = score_embeddings(texture_descriptor(_to_unit(data.patches)), data,
                                              texture_descriptor(_to_unit(data.train_patches)))
    n_held = int(np.sum(held_out))
    results["_info"] = {"held_out_images": n_held, "seed": seed, "test_fraction": test_fraction,
                        **{k: v for k, v in results["model"].items() if k.endswith("_chance")}}
    return results


def format_table(results: dict[str, dict[str, float]]) -> str:
    """The evaluation table as Markdown: one row per metric, one column per encoder."""
    columns = [c for c in ("model", "untrained", "texture") if c in results]
    info = results.get("_info", {})
    header = "| metric | " + " | ".join(columns) + " | chance | target |"
    lines = [header, "|" + "---|" * (len(columns) + 3)]
    for m in METRICS:
        if m not in results[columns[0]]:
            continue
        chance = info.get(m.replace("_map", "_chance"))
        if m == "pair_accuracy":
            chance = 0.5
        elif m == "roc_auc":
            chance = 0.5
        cells = [f"{results[c][m]:.3f}" for c in columns]
        target = TARGETS.get(m)
        chance_text = f"{chance:.3f}" if chance is not None else ""
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {chance_text} | "
                     + (f">= {target:.2f}" if target else "") + " |")
    return "\n".join(lines)







