"""A hand-made texture descriptor: the baseline the trained encoder has to beat.

Three histograms per patch, each L1-normalised and square-rooted (Hellinger), so the Euclidean
distance between descriptors compares distributions:

* intensity of the per-patch standardised patch (contrast and brightness removed);
* gradient magnitude (log scale), i.e. how rough the surface is;
* gradient orientation over [0, pi), weighted by magnitude and rotated so that its strongest
  bin comes first: the dominant direction is discarded, only the anisotropy remains, so the
  descriptor does not change when the scene is rotated.
"""

from __future__ import annotations

import numpy as np

__all__ = ["texture_descriptor", "TEXTURE_BINS"]

TEXTURE_BINS = (16, 16, 12)  # intensity, magnitude, orientation


def texture_descriptor(patches: np.ndarray, bins: tuple[int, int, int] = TEXTURE_BINS) -> np.ndarray:
    """Describe grey patches by intensity, gradient-magnitude and gradient-orientation histograms.

    Args:
        patches: ``(N, S, S)`` grey patches (any range; each is standardised first).
        bins: number of bins of the intensity, magnitude and orientation histograms.

    Returns:
        ``(N, sum(bins))`` float32 descriptors; compare them with the Euclidean distance.
    """
    x = np.asarray(patches, dtype=np.float32)
    if x.ndim == 2:
        x = x[None]
    n_int, n_mag, n_ori = bins
    mean = x.mean(axis=(1, 2), keepdims=True)
    std = np.maximum(x.std(axis=(1, 2), keepdims=True), 1e-3)
    z = (x - mean) / std
    # Central differences: the same on rows and columns, so a 90 degree turn permutes them exactly.
    gy = np.zeros_like(z)
    gx = np.zeros_like(z)
    gy[:, 1:-1, :] = (z[:, 2:, :] - z[:, :-2, :]) / 2
    gx[:, :, 1:-1] = (z[:, :, 2:] - z[:, :, :-2]) / 2
    inner = (slice(None), slice(1, -1), slice(1, -1))
    gx, gy = gx[inner], gy[inner]
    mag = np.hypot(gx, gy)
    ori = np.mod(np.arctan2(gy, gx), np.pi)

    out = np.empty((len(x), n_int + n_mag + n_ori), dtype=np.float32)
    int_edges = np.linspace(-2.5, 2.5, n_int + 1)
    mag_edges = np.linspace(0.0, np.log1p(3.0), n_mag + 1)
    for i in range(len(x)):
        h_int, _ = np.histogram(np.clip(z[i], -2.5, 2.5), bins=int_edges)
        h_mag, _ = np.histogram(np.clip(np.log1p(mag[i]), 0, mag_edges[-1]), bins=mag_edges)
        h_ori, _ = np.histogram(ori[i], bins=n_ori, range=(0.0, np.pi), weights=mag[i])
        h_ori = np.roll(h_ori, -int(np.argmax(h_ori)))
        parts = []
        for h in (h_int, h_mag, h_ori):
            h = h.astype(np.float64)
            parts.append(np.sqrt(h / max(h.sum(), 1e-12)))
        out[i] = np.concatenate(parts) / np.sqrt(3.0)
    return out
