"""Self-supervised pre-training of the encoder on both planets' imagery (SimCLR-style).

Instance discrimination: every image of a batch is seen as two strongly augmented views; the
NT-Xent loss (normalised temperature-scaled cross-entropy) asks each view to pick its twin out
of the 2B - 1 other views of the batch, so every batch holds 2B - 2 negatives per view.

Images (all unlabelled here, only the training side of the leak-free split, :mod:`.leakfree`):

* CTX tiles (``mars/ctx_mc11e``): random windows of 160, 320 and 640 px (about 1-4 km);
* the georeferenced Mars rasters (``mars/georeferenced``, not the elevation model): windows at
  three sizes;
* HiRISE landmark crops and AID images of the leak-free training side;
* Earth dune-field scenes of the sites that are on the training side (none by default: every
  site is kept for the leave-one-site-out evaluation).

Views: a random square crop of 40-100 % of the cached image's side (several ground scales),
then :func:`.datasets.augment_batch` (rotation, flips, crop, blur, gamma, noise) at
``strength`` 1.5. The loss reads the encoder's own L2-normalised embedding (no projection head):
the pre-trained file is a complete encoder that ``evaluate`` can score and ``train --init`` can
fine-tune with the labelled pairs.
"""

from __future__ import annotations

import datetime as _dt
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..engine.errors import InputError
from .datasets import augment_batch, default_data_root, discover_dataset, load_patches

__all__ = ["nt_xent_loss", "PretrainConfig", "build_pool", "random_scale_crops", "pretrain"]

CTX_SIDES = (160, 320, 640)
CTX_PER_SIDE = 250  # windows per tile and side
GEO_SIDES = (96, 160, 240)
GEO_PER_SIDE = 40
POOL_WEIGHTS = {"hirise": 0.3, "ctx": 0.3, "aid": 0.3, "mars_geo": 0.1, "dune_field": 0.1}


def nt_xent_loss(z1, z2, temperature: float = 0.2):
    """NT-Xent of two views per instance: ``(B, D)`` and ``(B, D)``, rows i of both are a pair.

    Both are L2-normalised; the logits are cosine / temperature over all 2B views but the view
    itself; the target of view i is its twin. Mean over the 2B views.
    """
    import torch
    import torch.nn.functional as F  # noqa: N812

    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, target)


@dataclass
class PretrainConfig:
    data: str = field(default_factory=lambda: str(default_data_root()))
    out: str = "models/siamese_pretrained.pt"
    steps: int = 1200
    batch: int = 128  # instances; 2 x batch views a step
    lr: float = 1e-3
    weight_decay: float = 1e-5
    temperature: float = 0.2
    strength: float = 1.5
    min_scale: float = 0.4
    seed: int = 0
    threads: int = 1
    cache_dir: str | None = None
    max_minutes: float | None = None
    schedule_steps: int | None = None  # length of the cosine decay (default: steps)
    widths: tuple = (16, 32, 64, 128)
    embedding_dim: int = 32
    dune_train_sites: tuple = ()


def _windows(img: np.ndarray, sides, per_side: int, rng, size: int) -> list[np.ndarray]:
    """Random square windows of ``img`` (grey uint8 or float) at several sides, area-resampled."""
    from PIL import Image

    out = []
    h, w = img.shape
    for side in sides:
        side = min(side, h, w)
        for _ in range(per_side):
            r, c = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            win = img[r:r + side, c:c + side]
            if (win == 0).mean() > 0.2 or win.std() < 2:  # no-data borders, flat fills
                continue
            out.append(np.asarray(Image.fromarray(win).resize((size, size), Image.BOX)))
    return out


def _grey8(path: Path) -> np.ndarray:
    """A raster or image as grey uint8 (float rasters stretched by their 1-99 % range, no-data 0)."""
    import rasterio

    with rasterio.open(path) as ds:
        data = ds.read().astype(np.float32)
        nodata = ds.nodata
    valid = np.ones(data.shape[1:], bool) if nodata is None else (data != nodata).all(0)
    grey = data[0] if len(data) < 3 else 0.299 * data[0] + 0.587 * data[1] + 0.114 * data[2]
    if data.dtype != np.uint8 and grey[valid].size:
        lo, hi = np.percentile(grey[valid], (1, 99))
        grey = (grey - lo) / max(hi - lo, 1e-6) * 254 + 1
    out = np.clip(np.rint(grey), 1, 255).astype(np.uint8)
    out[~valid] = 0
    return out


def build_pool(data_root: str | Path, seed: int = 0, size: int = 128, cache_dir: str | None = None,
               dune_train_sites=(), feedback=None) -> tuple[np.ndarray, np.ndarray]:
    """The unlabelled images of pre-training: ``(N, size, size)`` uint8 and each one's source."""
    from .leakfree import leakfree_roles, site_of

    root = Path(data_root)
    rng = np.random.default_rng([seed, 11])
    dataset = discover_dataset(root)
    roles = leakfree_roles(dataset.records, seed, dune_train_sites=dune_train_sites)
    # The training side of the leak-free split, in the order train() reads it (same patch cache).
    train = [r for r, ro in zip(dataset.records, roles) if ro == "train"]
    labelled = load_patches(train, size, cache_dir, feedback, "training images")
    keep = [i for i, r in enumerate(train) if r.source != "dune_field" or site_of(r) in dune_train_sites]
    parts = [labelled[keep]]
    sources = [np.array([train[i].source for i in keep])]
    extra: list[np.ndarray] = []
    extra_src: list[str] = []
    for tile in sorted((root / "mars" / "ctx_mc11e").glob("*.png")):
        wins = _windows(_grey8(tile), CTX_SIDES, CTX_PER_SIDE, rng, size)
        extra += wins
        extra_src += ["ctx"] * len(wins)
    for raster in sorted((root / "mars" / "georeferenced").glob("*.tif")):
        if "dtm" in raster.name.lower():
            continue  # elevation, not an image
        wins = _windows(_grey8(raster), GEO_SIDES, GEO_PER_SIDE, rng, size)
        extra += wins
        extra_src += ["mars_geo"] * len(wins)
    if extra:
        parts.append(np.stack(extra))
        sources.append(np.array(extra_src))
    return np.concatenate(parts), np.concatenate(sources)


def random_scale_crops(images, min_scale: float, generator):
    """A random square crop of ``min_scale``-100 % of every image's side, resized back (several
    ground scales of one image: the encoder learns to see a landform whatever the cell size)."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    b, s = images.shape[0], images.shape[-1]
    scale = min_scale + (1 - min_scale) * torch.rand(b, generator=generator)
    tx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - scale)
    ty = (torch.rand(b, generator=generator) * 2 - 1) * (1 - scale)
    zero = torch.zeros(b)
    theta = torch.stack([torch.stack([scale, zero, tx], 1), torch.stack([zero, scale, ty], 1)], 1)
    x = images.float()[:, None] / (255.0 if images.dtype == torch.uint8 else 1.0)
    grid = F.affine_grid(theta, (b, 1, s, s), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)[:, 0]


def pretrain(config: PretrainConfig, feedback=None) -> dict:
    """Run the pre-training and write a model file (the shipped format) at ``config.out``."""
    import torch

    from ..engine.encoder import COMPACT_DEFAULTS, ModelMetadata, build_network, save_model
    from ..engine.feedback import Feedback

    fb = feedback or Feedback()
    t0 = time.monotonic()
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.steps < 1 or config.batch < 2:
        raise InputError("Pre-training needs at least one step and two images a batch", "Raise --steps/--batch")
    pool, sources = build_pool(config.data, config.seed, 128, config.cache_dir, config.dune_train_sites, fb)
    names = sorted(set(sources))
    counts = {n: int((sources == n).sum()) for n in names}
    fb.log(f"pre-training pool: {len(pool)} images {counts}")
    w = np.array([POOL_WEIGHTS.get(s, 0.1) / counts[s] for s in sources])
    w /= w.sum()
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in COMPACT_DEFAULTS.items()}
    params["widths"] = list(config.widths)
    torch.manual_seed(config.seed)
    network = build_network("compact", 100, embedding_dim=config.embedding_dim, **params)
    opt = torch.optim.Adam(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    images = torch.from_numpy(pool)
    rng = np.random.default_rng([config.seed, 12])
    gen = torch.Generator().manual_seed(config.seed)
    history, losses = [], []
    network.train()
    step = 0
    for step in range(config.steps):
        horizon = config.schedule_steps or config.steps
        lr = config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(step / horizon, 1.0))))
        if step < 50:
            lr *= (step + 1) / 50  # warm-up: NT-Xent from a random start is unstable with big steps
        for pg in opt.param_groups:
            pg["lr"] = lr
        idx = torch.from_numpy(rng.choice(len(pool), size=config.batch, replace=False, p=w))
        batch = images[idx]
        v1 = augment_batch(random_scale_crops(batch, config.min_scale, gen), 100, gen, config.strength)
        v2 = augment_batch(random_scale_crops(batch, config.min_scale, gen), 100, gen, config.strength)
        z = network(torch.cat([v1, v2]))
        loss = nt_xent_loss(z[:config.batch], z[config.batch:], config.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 25 == 0 or step == config.steps - 1:
            row = {"step": step + 1, "loss": round(float(np.mean(losses[-25:])), 4),
                   "minutes": round((time.monotonic() - t0) / 60, 2)}
            history.append(row)
            fb.log(f"step {row['step']}/{config.steps}: NT-Xent {row['loss']:.4f} ({row['minutes']} min)")
        if config.max_minutes and (time.monotonic() - t0) / 60 > config.max_minutes:
            fb.log(f"stopping after {step + 1} steps: the {config.max_minutes} min budget is spent")
            break
    meta = ModelMetadata(
        architecture="compact", input_size=100, embedding_dim=config.embedding_dim, arch_params=params,
        normalisation={"mode": "per_patch"},
        training={"stage": "self-supervised pre-training (NT-Xent, SimCLR-style)", "steps": step + 1,
                  "config": {k: v for k, v in asdict(config).items() if k not in ("data", "out", "cache_dir")},
                  "pool": counts, "split": "leak-free training side only (learning/leakfree.py)",
                  "seed": config.seed, "history": history[-5:], "date": _dt.date.today().isoformat(),
                  "minutes": round((time.monotonic() - t0) / 60, 1)},
        description="Compact encoder pre-trained by instance discrimination on Mars and Earth imagery")
    save_model(config.out, network, meta)
    fb.log(f"wrote {config.out} after {step + 1} steps, {(time.monotonic() - t0) / 60:.1f} min")
    return {"out": config.out, "history": history, "steps": step + 1}
