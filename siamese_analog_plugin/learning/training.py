"""Training the Siamese encoder: pairs, the contrastive loss, the training loop, resuming.

The paper's method: pairs of 100x100 normalised grey patches labelled similar or dissimilar,
the contrastive loss with a margin, heavy augmentation (rotation, blur, scale, greyscale), a
9:1 train/test split, Adam (lr 1e-3, weight decay 5e-4), batches of 64 pairs.

Two choices make it fit a small CPU:

* every image is decoded once into an in-memory uint8 cache (and a disk cache), and every view
  is a fresh random augmentation made on tensors, so the paper's x10 expanded set is never
  stored: with ``--augment 10`` a run draws about 10 views of every training image;
* each batch of 64 labelled pairs (128 views) also scores every other pair of views in the
  batch whose label the pair rules define, so one forward pass trains on thousands of pairs
  and the hard ones (dissimilar but closer than the margin) drive the loss.

Reproducible: the network initialisation and every epoch's draws are seeded from ``--seed`` and
the epoch number, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..engine.errors import InputError
from .datasets import (
    PairTable,
    augment_batch,
    default_data_root,
    discover_dataset,
    group_weights,
    load_patches,
    sample_pairs,
    split_by_scene,
    split_record,
)

__all__ = [
    "TrainConfig",
    "contrastive_loss",
    "batch_pair_loss",
    "proxy_class_loss",
    "train",
    "state_path_for",
]

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "models" / "siamese_compact.pt"




def state_path_for(out: str | os.PathLike) -> Path:
    """The training-state file written beside a model (``OUT.state.pt``)."""
    out = Path(out)
    return out.with_name(out.name + ".state.pt") if out.suffix != ".pt" else out.with_suffix(".state.pt")


@dataclass
class TrainConfig:
    """Training settings (the command-line options).

    Attributes:
        data: data folder. arch: ``compact`` or ``paper``. epochs: number of epochs.
        batch_size: labelled pairs per batch. lr, weight_decay: Adam settings. margin: the
        contrastive margin (embedding distance beyond which dissimilar pairs cost nothing).
        seed: seeds the split, the initialisation and every draw. device: ``auto``/``cpu``/``cuda``.
        out: model file to write. resume: training-state file to continue from. augment: views
        of each training image over the whole run (the paper's x10), which sets the epoch length.
        pairs_per_epoch: overrides the epoch length in pairs. input_size: encoder input side.
        cache_size: side of the cached images
        (views are cropped from them). embedding_dim: embedding size (architecture default when
        ``None``). test_fraction: held-out share. schedule: ``cosine`` or ``constant`` lr.
        cache_dir: decoded-patch cache (``None``: no disk cache). threads: torch CPU threads.
        arch_params: extra architecture parameters. class_loss: weight of the auxiliary
        class loss (:func:`proxy_class_loss`; 0 = contrastive loss only). class_scale: its
        logit scale. class_targets: ``all`` (every group has its proxy) or ``non_analog`` (groups
        with a cross-group analog are left to the contrastive loss alone).
    """

    data: str = field(default_factory=lambda: str(default_data_root()))
    arch: str = "compact"
    epochs: int = 48
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 5e-4
    margin: float = 1.0
    seed: int = 0
    device: str = "auto"
    out: str = str(DEFAULT_OUT)
    resume: str | None = None
    augment: int = 10
    pairs_per_epoch: int | None = None
    input_size: int = 100
    cache_size: int = 128
    embedding_dim: int | None = None
    test_fraction: float = 0.1
    schedule: str = "cosine"
    cache_dir: str | None = None
    threads: int = 2
    arch_params: dict = field(default_factory=dict)
    eval_pairs: int = 4000
    class_loss: float = 1.0
    class_scale: float = 16.0
    class_targets: str = "non_analog"
    # "leakfree" (learning/leakfree.py: train / val / test, no ground on two sides; per-epoch numbers
    # are on val) or "legacy" (the older 9:1 split by split_by_scene). init: a model file whose weights start
    # the run (a pre-trained encoder of learning/pretrain.py).
    split: str = "legacy"
    init: str | None = None
    # With split="leakfree": the Earth dune-field sites trained on (both scenes of each); every other
    # site stays on the test side. () = none (every site a test fold); ("all",) = every site.
    dune_train_sites: tuple = ()


# -- loss ----------------------------------------------------------------------------------------

def contrastive_loss(distance, label, margin: float):
    """The contrastive loss of Hadsell et al. per pair.

    ``y * d^2 + (1 - y) * max(0, margin - d)^2``: similar pairs (y=1) are pulled together,
    dissimilar pairs are pushed apart until they are ``margin`` away, then cost nothing.
    """
    import torch

    label = label.to(distance.dtype)
    return label * distance.pow(2) + (1 - label) * torch.clamp(margin - distance, min=0).pow(2)


def batch_pair_loss(z, group_ids, table_tensor, margin: float):
    """Contrastive loss over every labelled pair of views in a batch.

    Similar and dissimilar pairs are averaged separately and added, so the many dissimilar
    pairs do not swamp the few similar ones; dissimilar pairs already beyond the margin cost
    zero and are left out of their average (online hard-negative mining), so the hard ones
    carry the gradient.

    Args:
        z: ``(B, D)`` embeddings.
        group_ids: ``(B,)`` group index of each view.
        table_tensor: ``(G, G)`` int tensor, 1 similar / 0 dissimilar / -1 ignored.
        margin: the contrastive margin.

    Returns:
        ``(loss, stats)`` with stats the mean similar and dissimilar distances.
    """
    import torch

    diff = z[:, None, :] - z[None, :, :]
    d = torch.sqrt(diff.pow(2).sum(-1) + 1e-9)
    labels = table_tensor[group_ids][:, group_ids]
    upper = torch.triu(torch.ones_like(labels, dtype=torch.bool), diagonal=1)
    pos = (labels == 1) & upper
    neg = (labels == 0) & upper
    loss = z.new_zeros(())
    stats = {"d_similar": float("nan"), "d_dissimilar": float("nan")}
    if pos.any():
        loss = loss + contrastive_loss(d[pos], torch.ones_like(d[pos]), margin).mean()
        stats["d_similar"] = float(d[pos].detach().mean())
    if neg.any():
        # Averaged over the dissimilar pairs still inside the margin: most in-batch negatives are
        # easy (zero loss) and would otherwise dilute the few hard ones to nothing.
        neg_loss = contrastive_loss(d[neg], torch.zeros_like(d[neg]), margin)
        active = (neg_loss.detach() > 0).sum().clamp_min(1)
        loss = loss + neg_loss.sum() / active
        stats["d_dissimilar"] = float(d[neg].detach().mean())
    return loss, stats


def proxy_class_loss(z, group_ids, proxies, scale: float):
    """Cross-entropy of cosine-similarity logits against one learned proxy per group.

    An auxiliary to the contrastive loss: every view is scored against all groups at once (not
    only against the few partners in its batch), which gives the 30 AID scene classes a signal per
    view. The embedding stays the one the search uses (the Euclidean distance between
    L2-normalised embeddings is a monotone function of their cosine).
    """
    import torch

    if not bool((group_ids >= 0).any()):
        return z.new_zeros(())
    logits = scale * torch.nn.functional.normalize(z, dim=1) @ torch.nn.functional.normalize(proxies, dim=1).T
    return torch.nn.functional.cross_entropy(logits, group_ids, ignore_index=-100)


def class_targets(table: PairTable, mode: str) -> np.ndarray:
    """Class-loss target of each group: its own index, or -100 (left out) for groups with an analog
    in another group when ``mode`` is ``non_analog``."""
    targets = np.arange(len(table.groups), dtype=np.int64)
    if mode == "non_analog":
        analog = (table.table == 1).sum(axis=1) > 1
        targets[analog] = -100
    elif mode != "all":
        raise InputError(f"Unknown class-loss targets '{mode}'", "Use --class-targets all or non_analog")
    return targets


# -- training ------------------------------------------------------------------------------------

def _arch_params(config: TrainConfig) -> tuple[dict, int]:
    params = dict(config.arch_params)
    if config.arch == "compact":
        dim = config.embedding_dim or 32
        # Record every parameter in the model file, so later changes of defaults never break it.
        from ..engine.encoder import COMPACT_DEFAULTS

        for key, value in COMPACT_DEFAULTS.items():
            params.setdefault(key, list(value) if isinstance(value, tuple) else value)
        side = -(-config.input_size // int(params["stem_stride"]))  # after the strided first layer
        for _ in range(len(params["widths"]) - 1):
            side //= 2  # a 2x2 max-pooling between layers
        if side < 2:
            raise InputError(f"{len(params['widths'])} layers pool a {config.input_size} px patch below 2x2 "
                             "feature maps", "Give fewer --widths (at most 5 for 100 px patches)")
    elif config.arch == "paper":
        dim = config.embedding_dim or 5
    else:
        raise InputError(f"Unknown architecture '{config.arch}'", "Use --arch compact or --arch paper")
    return params, dim


def _save_state(path: Path, network, optimizer, epoch: int, history: list, config: TrainConfig,
                proxies=None) -> None:
    import torch

    payload = {
        "epoch": epoch,
        "model": {k: v.detach().cpu() for k, v in network.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "history": json.dumps(history),
        "config": json.dumps(asdict(config)),
    }
    if proxies is not None:
        payload["proxies"] = proxies.detach().cpu()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def train(config: TrainConfig, feedback=None) -> dict:
    """Train an encoder and write it with :func:`save_model` (plus a state file and the split).

    Args:
        config: the settings.
        feedback: a :class:`~.feedback.Feedback` for progress and per-epoch lines.

    Returns:
        A summary: final held-out metrics, history, paths, time taken.

    Raises:
        InputError: missing or empty data, an unknown architecture or device, a bad resume file.
    """
    import torch

    from ..engine.devices import resolve_device
    from ..engine.encoder import ModelMetadata, build_network, save_model
    from ..engine.feedback import Feedback
    from .evaluation import build_eval_data, embed_with_network, score_embeddings

    fb = feedback or Feedback()
    t_start = time.monotonic()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    if config.epochs < 1 or config.batch_size < 2:
        raise InputError("Training needs at least one epoch and two pairs per batch", "Raise --epochs/--batch-size")
    params, dim = _arch_params(config)

    dataset = discover_dataset(config.data)
    if config.split == "leakfree":
        from .leakfree import leakfree_roles, resolve_dune_sites

        sites = resolve_dune_sites(dataset.records, config.dune_train_sites)
        roles = leakfree_roles(dataset.records, config.seed, dune_train_sites=sites)
        fb.log("dune-field sites trained on: " + (", ".join(sites) or "none (all are test folds)"))
        full_dataset, full_roles = dataset, roles
        dataset = type(dataset)(dataset.root, [r for r, ro in zip(dataset.records, roles) if ro != "test"],
                                dataset.layout)
        held_out = [ro == "val" for ro in roles if ro != "test"]
    else:
        held_out = split_by_scene(dataset.records, config.seed, config.test_fraction)
    train_records = [r for r, h in zip(dataset.records, held_out) if not h]
    table = PairTable(dataset.groups())
    fb.log(f"data: {len(dataset.records)} images in {len(table.groups)} classes ({dataset.layout} layout), "
           f"{len(train_records)} for training, {sum(held_out)} held out (whole scenes, seed {config.seed})")
    cache = None if config.cache_dir in (None, "") else config.cache_dir
    images = torch.from_numpy(load_patches(train_records, config.cache_size, cache, fb, "training images"))
    group_ids = np.array([table.index[r.group] for r in train_records])
    eval_data = build_eval_data(dataset, held_out, config.input_size, config.seed, cache,
                                n_pairs=config.eval_pairs, feedback=fb)

    torch.manual_seed(config.seed)
    network = build_network(config.arch, config.input_size, embedding_dim=dim, **params).to(device)
    if config.init:
        from ..engine.encoder import load_model

        start = load_model(config.init, "cpu")
        network.load_state_dict(start.network.state_dict())
        fb.log(f"starting from the weights of {config.init}")
    n_params = sum(p.numel() for p in network.parameters())
    train_params = list(network.parameters())
    proxies = None
    if config.class_loss > 0:
        proxies = torch.nn.Parameter(torch.randn(len(table.groups), dim, device=device) * 0.1)
        train_params.append(proxies)
    optimizer = torch.optim.Adam(train_params, lr=config.lr, weight_decay=config.weight_decay)
    # The paper expands the training set x10 with augmented copies; here every view is freshly
    # augmented, and --augment N means each training image is seen as about N views over the run.
    pairs_per_epoch = config.pairs_per_epoch or max(
        config.batch_size, config.augment * len(train_records) // (2 * config.epochs))
    steps = max(1, pairs_per_epoch // config.batch_size)
    total_steps = steps * config.epochs
    history: list[dict] = []
    start_epoch = 0
    out = Path(config.out)
    state_file = state_path_for(out)
    if config.resume:
        try:
            state = torch.load(config.resume, map_location="cpu", weights_only=True)
            network.load_state_dict(state["model"])
            if proxies is not None:
                proxies.data.copy_(state["proxies"].to(device))
            optimizer.load_state_dict(state["optimizer"])
        except Exception as exc:
            raise InputError(f"Cannot resume from '{config.resume}': {exc}",
                             "Give the .state.pt file a previous run with the same --arch wrote") from exc
        start_epoch = int(state["epoch"])
        history = json.loads(state["history"])
        fb.log(f"resuming after epoch {start_epoch}")

    def lr_at(step: int) -> float:
        if config.schedule == "constant":
            return config.lr
        # Cosine decay to 5 % of the rate: big steps early, a settled model at the end.
        return config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / total_steps)))

    table_t = torch.from_numpy(table.table.astype(np.int64)).to(device)
    group_t = torch.from_numpy(group_ids)
    class_t = torch.from_numpy(class_targets(table, config.class_targets)).to(device)
    fb.log(f"training {config.arch} ({n_params:,} parameters) on {device}: {config.epochs} epochs x {steps} "
           f"batches of {config.batch_size} pairs, margin {config.margin}")
    metrics: dict = history[-1]["held_out"] if history else {}
    for epoch in range(start_epoch, config.epochs):
        # Every epoch's draws depend only on (seed, epoch): resuming repeats them exactly.
        rng = np.random.default_rng([config.seed, epoch])
        gen = torch.Generator().manual_seed(config.seed * 100003 + epoch)
        a, b, _ = sample_pairs(group_ids, table, steps * config.batch_size, rng, group_weights(table.groups))
        network.train()
        t_epoch = time.monotonic()
        losses = []
        for step in range(steps):
            sl = slice(step * config.batch_size, (step + 1) * config.batch_size)
            idx = torch.from_numpy(np.concatenate([a[sl], b[sl]]))
            views = augment_batch(images[idx], config.input_size, gen).to(device)
            for pg in optimizer.param_groups:
                pg["lr"] = lr_at(epoch * steps + step)
            z = network(views)
            views_groups = group_t[idx].to(device)
            loss, stats = batch_pair_loss(z, views_groups, table_t, config.margin)
            if proxies is not None:
                loss = loss + config.class_loss * proxy_class_loss(z, class_t[views_groups], proxies,
                                                                   config.class_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            fb.progress((epoch * steps + step + 1) / total_steps,
                        f"epoch {epoch + 1}/{config.epochs} batch {step + 1}/{steps} loss {np.mean(losses[-20:]):.4f}")
            if fb.cancelled():
                raise InputError("Training was cancelled", "Resume it with --resume " + str(state_file))
        network.eval()
        metrics = score_embeddings(
            embed_with_network(network, eval_data.patches, {"mode": "per_patch"}, device), eval_data,
            embed_with_network(network, eval_data.train_patches, {"mode": "per_patch"}, device))
        row = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": round(time.monotonic() - t_epoch, 1),
               "held_out": {k: round(v, 4) for k, v in metrics.items()}}
        history.append(row)
        maps = " ".join(f"{k}={metrics[k]:.3f}" for k in ("cross_dune_map", "earth_to_mars_map", "mars_map",
                                                          "earth_map") if k in metrics)
        fb.log(f"epoch {epoch + 1}/{config.epochs}: loss {row['loss']:.4f}  held-out pair accuracy "
               f"{metrics['pair_accuracy']:.4f}  roc_auc {metrics['roc_auc']:.4f}  {maps}  ({row['seconds']} s)")
        out.parent.mkdir(parents=True, exist_ok=True)
        _save_state(state_file, network, optimizer, epoch + 1, history, config, proxies)

    split = split_record(dataset, held_out, config.seed, config.test_fraction)
    if config.split == "leakfree":
        from .leakfree import leakfree_split_record

        split = leakfree_split_record(full_dataset, full_roles, config.seed, sites)
    trained_on = sorted({r.source for r in train_records})
    meta = ModelMetadata(
        architecture=config.arch, input_size=config.input_size, embedding_dim=dim, arch_params=params,
        normalisation={"mode": "per_patch"},
        training={
            "data": {"root": "shared/data" if dataset.layout == "project" else dataset.root, "sources": trained_on,
                     "classes": table.groups, "excluded": "HiRISE edge (no-data border crops)",
                     "counts": split["counts"]},
            "pairs": ["same class = similar", *table.describe(), "all other pairs = dissimilar"],
            "loss": f"contrastive, margin {config.margin}, all labelled in-batch pairs "
                    "(dissimilar ones averaged over those inside the margin)"
                    + (f"; plus {config.class_loss} x cosine-proxy class cross-entropy (scale {config.class_scale}, "
                       f"{config.class_targets} groups)" if config.class_loss > 0 else ""),
            "epochs": config.epochs, "pairs_per_epoch": steps * config.batch_size, "batch_size": config.batch_size,
            "optimizer": f"Adam lr {config.lr} ({config.schedule}), weight decay {config.weight_decay}",
            "augment": f"x{config.augment}: rotation (any angle, flips), crop 75-100 % (scale), blur, gamma, noise; "
                       "greyscale luminance",
            "seed": config.seed, "test_fraction": config.test_fraction,
            "split": ("leak-free train/val/test: HiRISE by observation, AID per image, dune fields by site, "
                      "aeolian patches test only" if config.split == "leakfree" else
                      "whole scenes held out: HiRISE observation ids, AID images, dune-field *_test scenes"),
            "protocol": config.split,
            **({"dune_train_sites": list(sites)} if config.split == "leakfree" else {}),
            **({"init": Path(config.init).name} if config.init else {}),
            "held_out_sha256": split["held_out_sha256"],
            "threshold": round(float(metrics.get("threshold", config.margin / 2)), 4),
            "held_out_metrics": {k: round(v, 4) for k, v in metrics.items() if not k.endswith("_chance")},
            "date": _dt.date.today().isoformat(),
        },
        description=(f"Siamese {config.arch} encoder trained on HiRISE, AID and dune-field imagery to match "
                     "landforms across Mars and Earth (contrastive loss)"),
    )
    save_model(out, network, meta)
    from .export import onnx_beside

    onnx_file = onnx_beside(out, fb.log)  # the same model for the onnx runtime
    split_file = out.with_suffix(".split.json")
    split_file.write_text(json.dumps(split, indent=1))
    elapsed = time.monotonic() - t_start
    fb.log(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB), {split_file.name}; state in {state_file.name}; "
           f"{elapsed / 60:.1f} min")
    return {"out": str(out), "onnx": onnx_file, "state": str(state_file), "split": str(split_file), "metrics": metrics,
            "history": history, "seconds": elapsed}


# -- command line --------------------------------------------------------------------------------



