"""Embedding a folder of images (the ``embed`` command and the Embed images algorithm)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .encoder import AnalogEncoder
from .errors import InputError
from .feedback import Feedback, check_cancelled
from .imagery import images_in_folder, load_image_patch
from .runtime import load_runtime

__all__ = ["embed_folder"]


def embed_folder(folder: str | os.PathLike, model: str | None = None, device: str = "auto", batch_size: int = 128,
                 feedback: Feedback | None = None, encoder: AnalogEncoder | None = None, runtime: str = "auto"):
    """Embed every image under ``folder`` (recursively), with ``model`` on ``runtime`` (or ``encoder``).

    Returns:
        ``(paths, embeddings, device)``: paths relative to ``folder`` with forward slashes,
        an ``(N, D)`` float32 array, and the device used.

    Raises:
        InputError: the folder is missing or holds no image, or the batch size is below 1.
    """
    if not isinstance(batch_size, int) or batch_size < 1:  # a negative step would skip every image
        raise InputError(f"The batch size must be a whole number of at least 1, not {batch_size}", "Use e.g. 128")
    folder = Path(folder)
    files = images_in_folder(folder)
    feedback = feedback or Feedback()
    encoder = encoder or load_runtime(model, runtime, device)
    feedback.log(f"Embedding {len(files)} images on {encoder.device}")
    size = encoder.input_size
    out = np.empty((len(files), encoder.embedding_dim), dtype=np.float32)
    for start in range(0, len(files), batch_size):
        check_cancelled(feedback)
        chunk = files[start:start + batch_size]
        patches = np.stack([load_image_patch(f, size)[0] for f in chunk])
        out[start:start + len(chunk)] = encoder.embed(patches, batch_size)
        feedback.progress((start + len(chunk)) / len(files), f"{start + len(chunk)}/{len(files)} images")
    paths = [f.relative_to(folder).as_posix() for f in files]
    return paths, out, str(encoder.device)
