"""Stepwise deep feature transfer (after SDFT), one command per step.

* Step 0: the encoder trained on the large set (the shipped model, or any model file).
* Step 1 (:func:`transfer_step1`): fine-tune it on a medium labelled Mars set (``<class>/*``
  images, training part of the scene split) through a linear classifier head, cross-entropy.
* Step 2 (:func:`transfer_step2`): adapt to the few target examples with a cosine-distance
  classifier: prototypes are the normalised mean embeddings of each class; optionally the last
  layers (the head after the convolutional trunk) and the prototypes are fine-tuned a few
  steps on ``scale * cosine`` logits, with the trunk frozen.

Each step writes a model file in the usual format; ``metadata.training`` records the step, its
data and its parent model. A step-2 model also carries its classes and prototypes, so it
classifies on its own (``fewshot --query ...`` with no support folder).
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..engine.classes import DEFAULT_SCALE, CosineClassifier
from ..engine.encoder import AnalogEncoder, ModelMetadata, load_model, save_model
from ..engine.errors import InputError, ModelError
from ..engine.feedback import Feedback, check_cancelled
from ..engine.support import SupportSet, load_labelled_folder
from .export import onnx_beside
from .splits import HeldOutSplit, split_files

__all__ = [
    "NetworkSplit",
    "TransferResult",
    "split_network",
    "dihedral",
    "adapt_cosine_classifier",
    "transfer_step1",
    "transfer_step2",
]


def _torch():
    import torch

    return torch


@dataclass
class NetworkSplit:
    """An encoder cut into a frozen part and its last layers.

    Attributes:
        pooled: ``patches (N, S, S) in [0, 1] -> (N, F)`` numpy features before the last layers.
        head: the last layers (a torch module of the encoder itself).
        post: applied after ``head`` (L2 normalisation for the compact encoder).
        set_head: puts a (fine-tuned) head module back into the encoder.
    """

    pooled: object
    head: object
    post: object
    set_head: object

    def __iter__(self):  # pooled, head, post = split_network(enc)
        return iter((self.pooled, self.head, self.post))


def split_network(encoder: AnalogEncoder, batch_size: int = 128) -> NetworkSplit:
    """Cut an encoder's network before its last layers (compact: the MLP after pooling;
    paper: the last fully connected layer)."""
    torch = _torch()
    net = encoder.network
    if hasattr(net, "features") and hasattr(net, "head"):
        frozen = net.features

        l2 = bool(getattr(net, "l2", True))

        def post(z):
            return torch.nn.functional.normalize(z, dim=1) if l2 else z

        head = net.head

        def set_head(module) -> None:
            net.head = module
    elif hasattr(net, "cnn") and hasattr(net, "fc"):
        def frozen(x):
            return net.fc[:-1](torch.flatten(net.cnn(x), 1))

        def post(z):
            return z

        head = net.fc[-1]

        def set_head(module) -> None:
            net.fc[-1] = module
    else:
        raise ModelError("This encoder's network has no known last layers to adapt",
                         "Use a 'compact' or 'paper' model")

    def pooled(patches: np.ndarray) -> np.ndarray:
        net.eval()
        out = []
        with torch.inference_mode():
            for start in range(0, len(patches), batch_size):
                x = encoder.to_tensor(patches[start:start + batch_size]).to(encoder.device)
                out.append(frozen(x).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)

    return NetworkSplit(pooled, head, post, set_head)


def dihedral(patches: np.ndarray, which: int) -> np.ndarray:
    """One of the 8 rotations/reflections of ``(N, S, S)`` patches (0 = identity): ground
    textures seen from orbit have no preferred up."""
    x = np.rot90(patches, which % 4, axes=(-2, -1))
    return np.ascontiguousarray(x[..., ::-1] if which >= 4 else x)


def adapt_cosine_classifier(features: np.ndarray, labels: np.ndarray, class_names: list[str], head, post,
                            steps: int = 0, lr: float = 1e-3, scale: float = DEFAULT_SCALE,
                            weight_decay: float = 1e-4, seed: int = 0):
    """Step 2: a cosine classifier on the support set, optionally fine-tuning the last layers.

    The prototypes start as the normalised mean embeddings (weight imprinting); with
    ``steps > 0`` a copy of ``head`` and the prototypes are trained with cross-entropy on
    ``scale * cosine`` logits (full batch, Adam), the frozen features given.

    Returns:
        ``(classifier, embed)``: the :class:`CosineClassifier` and a function mapping frozen
        features ``(N, F)`` to embeddings through the (tuned) head; ``embed.head`` is the module.
    """
    torch = _torch()
    torch.manual_seed(seed)
    head = copy.deepcopy(head).cpu()
    f = torch.from_numpy(np.asarray(features, dtype=np.float32))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    n_classes = len(class_names)

    def embed_t(x):
        return post(head(x))

    head.eval()  # no dropout/batch-norm in the heads; eval keeps it deterministic
    with torch.no_grad():
        z = torch.nn.functional.normalize(embed_t(f), dim=1)
        protos = torch.stack([z[y == c].mean(dim=0) for c in range(n_classes)])
    if steps > 0:
        w = torch.nn.Parameter(protos.clone())
        opt = torch.optim.Adam(list(head.parameters()) + [w], lr=lr, weight_decay=weight_decay)
        for _ in range(steps):
            opt.zero_grad()
            z = torch.nn.functional.normalize(embed_t(f), dim=1)
            logits = scale * z @ torch.nn.functional.normalize(w, dim=1).T
            loss = torch.nn.functional.cross_entropy(logits, y)
            loss.backward()
            opt.step()
        protos = w.detach()
    clf = CosineClassifier(list(class_names), protos.numpy().astype(np.float32), float(scale))

    def embed(feats: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return embed_t(torch.from_numpy(np.asarray(feats, dtype=np.float32))).numpy()

    embed.head = head
    return clf, embed


@dataclass
class TransferResult:
    """What a transfer step wrote."""

    path: str
    metadata: ModelMetadata
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def _parent_summary(encoder: AnalogEncoder) -> dict:
    from ..engine.embeddings import file_sha256

    t = encoder.metadata.training or {}
    out = {"path": encoder.path or "", "step": int(t.get("step", 0)), "description": encoder.metadata.description,
           "data": t.get("data", t.get("dataset", ""))}
    if encoder.path and Path(encoder.path).is_file():
        out["sha256"] = file_sha256(encoder.path)
    # What the evaluation needs to keep the parent's training ground out (learning/leakfree.sites_seen).
    for key in ("protocol", "dune_train_sites", "parent"):
        if key in t:
            out[key] = t[key]
    return out


def _class_weights(labels: np.ndarray, n_classes: int):
    torch = _torch()
    counts = np.bincount(labels, minlength=n_classes).astype(np.float32)
    w = counts.sum() / np.maximum(counts, 1) / n_classes
    return torch.from_numpy(w)


def transfer_step1(data: str | os.PathLike, out: str | os.PathLike, parent: str | None = None,
                   classes: list[str] | None = None, epochs: int = 8, batch_size: int = 32, lr: float = 1e-4,
                   head_lr: float = 1e-2, max_per_class: int = 300, device: str = "auto", seed: int = 0,
                   feedback: Feedback | None = None, split: HeldOutSplit | None = None) -> TransferResult:
    """Step 1: fine-tune an encoder on a labelled Mars set through a linear classifier head.

    Args:
        data: ``<class>/*`` images (e.g. the HiRISE landmarks); only the ``train`` part of the
            scene split is used, so the held-out scenes stay unseen for evaluation.
        out: the model file to write.
        parent: the step-0 model (default: the shipped model).
        classes: classes to use (default: every class folder but HiRISE ``edge``).
        epochs, batch_size, lr (encoder), head_lr (linear head): the training schedule.
        max_per_class: at most this many images a class (random, seeded), for balance and time.
        split: which images are held out (default: :meth:`HeldOutSplit.load`, the training split).

    Raises:
        InputError: no data, fewer than two classes; SearchCancelled when cancelled (nothing written).
    """
    torch = _torch()
    from ..engine.errors import OutputError
    from ..engine.outputs import check_destination

    feedback = feedback or Feedback()
    t0 = time.perf_counter()
    if epochs < 1 or batch_size < 2:
        raise InputError(f"Training needs at least 1 epoch and batches of 2 (got {epochs}, {batch_size})",
                         "Use e.g. --epochs 4 --batch-size 32")
    check_destination(out, "model file")
    if Path(out).suffix != ".pt":
        raise OutputError(f"The model file '{out}' should end in .pt", "Give a name like step1.pt")
    encoder = load_model(parent, device)
    split = split or HeldOutSplit.load(model=encoder.path)
    rng = np.random.default_rng(seed)
    if not classes:
        from ..engine.support import _class_folders
        from .datasets import EXCLUDED_CLASSES  # HiRISE "edge": no-data border crops teach nothing

        classes = [c for c, _ in _class_folders(Path(data)) if c not in EXCLUDED_CLASSES] if Path(data).is_dir() \
            else None
    files = split_files(data, classes, "train", split)
    files = {c: sorted(rng.permutation(np.array(v, dtype=object))[:max_per_class].tolist())
             for c, v in files.items() if v}
    feedback.log(f"Step 1: {sum(len(v) for v in files.values())} training images of {len(files)} classes "
                 f"({', '.join(f'{c} {len(v)}' for c, v in files.items())}); parent {encoder.path}")
    train = load_labelled_folder(data, encoder.input_size, list(files), files=files, what="training folder")
    n_classes = len(train.class_names)
    net = encoder.network
    torch.manual_seed(seed)  # the head's initialisation too: a step is reproducible from its seed
    linear = torch.nn.Linear(encoder.embedding_dim, n_classes).to(encoder.device)
    opt = torch.optim.Adam([{"params": net.parameters(), "lr": lr}, {"params": linear.parameters(), "lr": head_lr}])
    loss_fn = torch.nn.CrossEntropyLoss(weight=_class_weights(train.labels, n_classes).to(encoder.device))
    generator = torch.Generator().manual_seed(seed)
    if encoder.metadata.normalisation.get("mode", "per_patch") == "per_patch":
        from .datasets import augment_batch

        def augment(patches: np.ndarray):
            # The training engineer's views (rotation, crop, blur, gamma, noise), per-patch normalised.
            return augment_batch(torch.from_numpy(patches), encoder.input_size, generator)
        augmentation = "core.datasets.augment_batch (rotation, crop, blur, gamma, noise)"
    else:
        def augment(patches: np.ndarray):
            which = rng.integers(0, 8, len(patches))
            return encoder.to_tensor(np.stack([dihedral(p, int(w)) for p, w in zip(patches, which)]))
        augmentation = "random rotations/reflections"
    n = len(train.labels)
    steps_per_epoch = max(1, n // batch_size)
    history = []
    for epoch in range(epochs):
        net.train()
        order = rng.permutation(n)
        total, correct, seen = 0.0, 0, 0
        for b in range(steps_per_epoch):
            check_cancelled(feedback)
            idx = order[b * batch_size:(b + 1) * batch_size]
            x = augment(train.patches[idx]).to(encoder.device)
            y = torch.from_numpy(train.labels[idx]).to(encoder.device)
            logits = linear(net(x))
            loss = loss_fn(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(idx)
            feedback.progress((epoch + (b + 1) / steps_per_epoch) / epochs,
                              f"epoch {epoch + 1}/{epochs}, loss {total / seen:.3f}")
        history.append({"epoch": epoch + 1, "loss": round(total / seen, 4), "train_accuracy": round(correct / seen, 4)})
        feedback.log(f"epoch {epoch + 1}/{epochs}: loss {total / seen:.3f}, training accuracy {correct / seen:.1%}")
    net.eval()
    # Accuracy of the linear head on the held-out scenes: a check, never used to choose anything.
    heldout = split_files(data, list(files), "test", split)
    heldout = {c: sorted(rng.permutation(np.array(v, dtype=object))[:max_per_class].tolist())
               for c, v in heldout.items()}
    heldout_acc = None
    if all(heldout.values()):
        test = load_labelled_folder(data, encoder.input_size, list(files), files=heldout, what="held-out folder")
        with torch.inference_mode():
            emb = torch.from_numpy(encoder.embed(test.patches)).to(encoder.device)
            pred = linear(emb).argmax(1).cpu().numpy()
        recalls = [float((pred[test.labels == c] == c).mean()) for c in range(n_classes)]
        heldout_acc = round(float(np.mean(recalls)), 4)
        feedback.log(f"held-out balanced accuracy of the linear head: {heldout_acc:.1%}")
    seconds = time.perf_counter() - t0
    meta = copy.deepcopy(encoder.metadata)
    meta.description = (f"Stepwise transfer step 1: {Path(encoder.path or 'encoder').name} fine-tuned on "
                        f"{Path(data).name} ({', '.join(train.class_names)}) with a linear classifier head")
    meta.training = {
        "method": "stepwise deep feature transfer", "step": 1, "parent": _parent_summary(encoder),
        "data": str(data), "split": f"training part; held out: {split.source}",
        "classes": train.class_names, "images": train.counts(), "epochs": epochs, "batch_size": batch_size,
        "lr": lr, "head_lr": head_lr, "augmentation": augmentation, "seed": seed,
        "history": history, "heldout_balanced_accuracy": heldout_acc, "seconds": round(seconds, 1),
        "device": str(encoder.device),
        "linear_head": {"weight": linear.weight.detach().cpu().numpy().round(6).tolist(),
                        "bias": linear.bias.detach().cpu().numpy().round(6).tolist()},
    }
    save_model(out, net, meta)
    feedback.log(f"Wrote {out} in {seconds:.0f} s")
    onnx_beside(out, feedback.log)
    return TransferResult(str(out), meta, history, seconds)


def transfer_step2(support: str | os.PathLike | SupportSet, out: str | os.PathLike, parent: str | None = None,
                   steps: int = 30, lr: float = 1e-3, scale: float = DEFAULT_SCALE, augment: bool = True,
                   device: str = "auto", seed: int = 0, feedback: Feedback | None = None) -> TransferResult:
    """Step 2: adapt a model to the few target examples with a cosine-distance classifier.

    Args:
        support: ``<class>/*`` folder of the few labelled examples (or a :class:`SupportSet`).
        out: the model file to write; it carries the classes and their prototypes.
        parent: the step-1 model (or any model; default: the shipped one).
        steps: fine-tuning steps of the last layers and prototypes (0: prototypes only).
        augment: also learn from the 8 rotations/reflections of every example.

    Raises:
        InputError: no support, fewer than two classes.
    """
    from ..engine.errors import OutputError
    from ..engine.outputs import check_destination

    feedback = feedback or Feedback()
    t0 = time.perf_counter()
    check_destination(out, "model file")
    if Path(out).suffix != ".pt":
        raise OutputError(f"The model file '{out}' should end in .pt", "Give a name like fewshot.pt")
    if steps < 0:
        raise InputError(f"The number of fine-tuning steps must be 0 or more, not {steps}", "Use e.g. 30")
    encoder = load_model(parent, device)
    data = str(support) if not isinstance(support, SupportSet) else "(in memory)"
    if not isinstance(support, SupportSet):
        support = load_labelled_folder(support, encoder.input_size, feedback=feedback)
    feedback.log("Step 2: examples " + ", ".join(f"{c} {k}" for c, k in support.counts().items())
                 + f"; parent {encoder.path}")
    split = split_network(encoder)
    variants = range(8) if augment else range(1)
    feats = np.concatenate([split.pooled(dihedral(support.patches, v)) for v in variants])
    labels = np.tile(support.labels, len(variants))
    check_cancelled(feedback)
    clf, embed = adapt_cosine_classifier(feats, labels, support.class_names, split.head, split.post, steps=steps,
                                         lr=lr, scale=scale, seed=seed)
    split.set_head(embed.head.to(encoder.device))
    train_acc = float((clf.predict(embed(feats)).index == labels).mean())
    feedback.progress(1.0, "adapted")
    seconds = time.perf_counter() - t0
    meta = copy.deepcopy(encoder.metadata)
    meta.description = (f"Stepwise transfer step 2: {Path(encoder.path or 'encoder').name} adapted to "
                        f"{sum(support.counts().values())} examples of {len(support.class_names)} classes "
                        f"({', '.join(support.class_names)}) with a cosine-distance classifier")
    meta.training = {
        "method": "stepwise deep feature transfer", "step": 2, "parent": _parent_summary(encoder), "data": data,
        "support": support.counts(), "fine_tune_steps": steps, "lr": lr, "augmentation": bool(augment),
        "tuned_layers": "last layers after the convolutional trunk", "support_accuracy": round(train_acc, 4),
        "seconds": round(seconds, 1), "seed": seed, "cosine_classifier": clf.to_dict(),
    }
    save_model(out, encoder.network, meta)
    feedback.log(f"Support accuracy after adaptation {train_acc:.1%}; wrote {out} in {seconds:.1f} s")
    onnx_beside(out, feedback.log)  # its cosine classifier travels in the ONNX metadata too
    return TransferResult(str(out), meta, [{"support_accuracy": train_acc}], seconds)






