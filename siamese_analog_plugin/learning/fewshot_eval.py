"""k-shot evaluation: balanced accuracy over random support draws, against a texture baseline."""

from __future__ import annotations

import time

import numpy as np

from ..engine.classes import CosineClassifier
from ..engine.classify import _embed_patches
from ..engine.encoder import load_model
from ..engine.errors import InputError
from ..engine.feedback import Feedback, check_cancelled
from ..engine.support import load_labelled_folder
from .splits import HeldOutSplit, split_files

HIRISE_CLASSES = ("crater", "dark_dune", "bright_dune", "other")


AUGMENT_VIEWS = range(8)  # the dihedral views step 2 learns from


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
