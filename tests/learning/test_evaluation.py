"""Evaluation metrics, retrieval tasks and the texture baseline."""

from __future__ import annotations

import numpy as np
import pytest

from siamese_analog_plugin.learning.evaluation import (
    average_precision,
    best_threshold,
    format_table,
    pairwise_distances,
    retrieval_map,
    retrieval_tasks,
    roc_auc,
)
from siamese_analog_plugin.learning.texture import texture_descriptor


class TestAveragePrecision:
    def test_hand_computed(self):
        # Relevant at ranks 1, 3, 4: (1/1 + 2/3 + 3/4) / 3.
        assert average_precision([1, 0, 1, 1, 0]) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
        assert average_precision([1, 1, 0]) == 1.0
        assert np.isnan(average_precision([0, 0]))

    def test_map_ranks_by_distance_and_excludes_self(self):
        d = np.array([[0.0, 0.1, 0.5, 0.3],
                      [0.1, 0.0, 0.2, 0.9]])
        rel = np.array([[True, False, True, False],
                        [False, True, False, True]])
        exclude = np.array([[True, False, False, False],
                            [False, True, False, False]])
        # Query 0 ranks items 1, 3, 2 -> relevant at rank 3: AP 1/3.
        # Query 1 ranks items 0, 2, 3 -> relevant at rank 3: AP 1/3.
        assert retrieval_map(d, rel, exclude) == pytest.approx(1 / 3)
        # Without exclusion each query finds itself first, then its other relevant item 4th: (1 + 2/4) / 2.
        assert retrieval_map(d, rel) == pytest.approx(0.75)


class TestPairMetrics:
    def test_roc_auc(self):
        assert roc_auc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([1, 1, 0, 0])) == 1.0
        assert roc_auc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([1, 1, 0, 0])) == 0.0
        # One inversion among four positive/negative pairs.
        assert roc_auc(np.array([0.9, 0.3, 0.5, 0.1]), np.array([1, 1, 0, 0])) == 0.75
        assert roc_auc(np.array([0.5, 0.5]), np.array([1, 0])) == 0.5  # ties count half

    def test_best_threshold_separates(self):
        d = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
        y = np.array([1, 1, 1, 0, 0])
        t = best_threshold(d, y)
        assert 0.3 < t < 0.8

    def test_pairwise_distances(self):
        a = np.array([[0.0, 0.0], [3.0, 4.0]])
        assert np.allclose(pairwise_distances(a, a), [[0, 5], [5, 0]])


class TestTasks:
    def test_tasks_on_project_groups(self):
        groups = ["mars:dark_dune", "mars:crater", "mars:other", "earth:Desert", "earth:Forest",
                  "earth:dune_field"]
        sources = ["hirise", "hirise", "hirise", "aid", "aid", "dune_field"]
        tasks = retrieval_tasks(groups, sources)
        q, g, rule = tasks["cross_dune_map"]
        assert list(q) == [0] and list(g) == [3, 4, 5] and rule == "earth_dune"
        q, g, _ = tasks["earth_to_mars_map"]
        assert list(q) == [5] and list(g) == [0, 1, 2]
        q, g, _ = tasks["mars_map"]
        assert list(q) == [0, 1]

    def test_plain_folders_only_get_earth_map(self):
        tasks = retrieval_tasks(["earth:a", "earth:b"], ["folder", "folder"])
        assert list(tasks) == ["earth_map"]

    def test_table(self):
        row = {"cross_dune_map": 0.5, "earth_to_mars_map": 0.4, "mars_map": 0.7, "earth_map": 0.45,
               "pair_accuracy": 0.9, "roc_auc": 0.95}
        text = format_table({"model": row, "texture": row, "_info": {"cross_dune_chance": 0.07}})
        assert "| cross_dune_map | 0.500 | 0.500 | 0.070 | >= 0.40 |" in text


class TestTextureDescriptor:
    def test_shape_and_normalisation(self):
        x = np.random.default_rng(0).random((3, 40, 40), dtype=np.float32)
        d = texture_descriptor(x)
        assert d.shape == (3, 44) and d.dtype == np.float32
        assert np.allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-5)  # three unit histograms / sqrt 3

    def test_invariant_to_brightness_contrast_and_right_angle_rotation(self):
        rng = np.random.default_rng(1)
        yy, xx = np.mgrid[0:48, 0:48]
        x = (0.5 + 0.3 * np.sin(xx / 3.0) + 0.05 * rng.random((48, 48))).astype(np.float32)
        base = texture_descriptor(x[None])[0]
        assert np.allclose(texture_descriptor((0.5 * x + 0.2)[None])[0], base, atol=1e-3)
        assert np.allclose(texture_descriptor(np.rot90(x)[None].copy())[0], base, atol=1e-3)

    def test_separates_different_textures(self):
        yy, xx = np.mgrid[0:48, 0:48]
        stripes = np.sin(xx / 2.0).astype(np.float32)
        noise = np.random.default_rng(2).random((48, 48)).astype(np.float32)
        stripes2 = np.sin(yy / 2.0 + 0.3).astype(np.float32)
        d = texture_descriptor(np.stack([stripes, stripes2, noise]))
        assert np.linalg.norm(d[0] - d[1]) < np.linalg.norm(d[0] - d[2])
