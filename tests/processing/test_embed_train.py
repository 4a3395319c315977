"""``embedimages`` and ``trainencoder`` over the engine's embedding and training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ..conftest import SAMPLE_HIRISE


def write_texture_folders(root: Path, per_class: int = 6, size: int = 64) -> dict[str, list[Path]]:
    """A tiny labelled tree ``root/<class>/<scene>-<n>.png``: stripes vs speckle, two scenes per class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    made: dict[str, list[Path]] = {}
    for cls in ("stripes", "speckle"):
        folder = root / cls
        folder.mkdir(parents=True)
        made[cls] = []
        for i in range(per_class):
            if cls == "stripes":
                img = 127 + 100 * np.sin((xx * np.cos(i) + yy * np.sin(i)) / (2 + i % 3))
            else:
                img = rng.random((size, size)) * 255
            path = folder / f"{cls}scene{i % 2}-{i}.png"
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
            made[cls].append(path)
    return made


def test_embed_images(run_alg, tiny_model_path, tmp_path, feedback):
    images = tmp_path / "images"
    made = write_texture_folders(images, per_class=3)
    out = tmp_path / "emb.npz"
    res = run_alg("siameseanalog:embedimages", {"INPUT": str(images), "MODEL": tiny_model_path, "DEVICE": "cpu",
                                                "OUTPUT": str(out)})
    assert res["OUTPUT"] == str(out) and res["IMAGE_COUNT"] == 6 and res["EMBEDDING_DIM"] == 8
    data = np.load(out)
    assert sorted(data["paths"]) == sorted(p.relative_to(images).as_posix() for ps in made.values() for p in ps)
    assert data["embeddings"].shape == (6, 8)
    assert np.allclose(np.linalg.norm(data["embeddings"], axis=1), 1.0, atol=1e-4)  # compact: L2-normalised
    assert "Embedded 6 images" in feedback.log


def test_embed_images_bad_folder(run_alg, tiny_model_path, tmp_path):
    from qgis.core import QgsProcessingException

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(QgsProcessingException, match="holds no images"):
        run_alg("siameseanalog:embedimages", {"INPUT": str(empty), "MODEL": tiny_model_path,
                                              "OUTPUT": str(tmp_path / "e.npz")})
    assert not (tmp_path / "e.npz").exists()


def test_train_one_epoch_then_search_with_the_model(run_alg, tmp_path, feedback):
    from siamese_analog_plugin.engine.encoder import load_model

    data = tmp_path / "training"
    write_texture_folders(data)
    out = tmp_path / "trained.pt"
    res = run_alg("siameseanalog:trainencoder", {
        "INPUT": str(data), "EPOCHS": 1, "DEVICE": "cpu", "BATCH_SIZE": 8, "AUGMENT": 2, "EMBEDDING_DIM": 8,
        "TEST_FRACTION": 0.2, "OUTPUT": str(out)})
    assert res["OUTPUT"] == str(out) and out.exists()
    assert res["DEVICE_USED"] == "cpu"
    assert max(feedback.progress_values) == pytest.approx(100.0)
    assert "epoch 1/1" in feedback.log
    encoder = load_model(out, "cpu")
    assert encoder.embedding_dim == 8 and encoder.metadata.training["epochs"] == 1
    # The trained model drives the search algorithm.
    emb = run_alg("siameseanalog:embedimages", {"INPUT": str(SAMPLE_HIRISE[0].parent), "MODEL": str(out),
                                                "DEVICE": "cpu", "OUTPUT": str(tmp_path / "e.npz")})
    assert emb["EMBEDDING_DIM"] == 8


def test_train_cancel_writes_no_model(run_alg, tmp_path):
    from qgis.core import QgsProcessingException

    from .conftest import RecordingFeedback

    data = tmp_path / "training"
    write_texture_folders(data)
    out = tmp_path / "out" / "trained.pt"
    out.parent.mkdir()
    fb = RecordingFeedback.make(cancel_after_progress=1)
    with pytest.raises(QgsProcessingException, match="cancelled"):
        run_alg("siameseanalog:trainencoder", {"INPUT": str(data), "EPOCHS": 3, "DEVICE": "cpu", "BATCH_SIZE": 4,
                                               "AUGMENT": 4, "OUTPUT": str(out)}, fb=fb)
    assert not out.exists()


def test_train_bad_data_folder(run_alg, tmp_path):
    from qgis.core import QgsProcessingException

    with pytest.raises(QgsProcessingException):
        run_alg("siameseanalog:trainencoder", {"INPUT": str(tmp_path / "missing"), "EPOCHS": 1,
                                               "OUTPUT": str(tmp_path / "m.pt")})
    assert not (tmp_path / "m.pt").exists()
