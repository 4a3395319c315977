"""The stepwise transfer steps on tiny real data with a real (tiny) torch model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from siamese_analog_plugin.cli import build_parser
from siamese_analog_plugin.engine.classes import CosineClassifier
from siamese_analog_plugin.engine.classify import classify_folder
from siamese_analog_plugin.engine.encoder import load_model
from siamese_analog_plugin.engine.errors import InputError, SearchCancelled
from siamese_analog_plugin.engine.feedback import Feedback
from siamese_analog_plugin.engine.support import load_labelled_folder
from siamese_analog_plugin.learning.splits import HeldOutSplit
from siamese_analog_plugin.learning.transfer import (
    adapt_cosine_classifier,
    dihedral,
    split_network,
    transfer_step1,
    transfer_step2,
)

from ..engine.test_fewshot import make_class_folder


@pytest.fixture()
def mars_set(tmp_path):
    """A tiny labelled set with two held-out images (one per class) named in a split."""
    root = make_class_folder(tmp_path / "mars", {"stripes": 6, "speckle": 6}, seed=7)
    held = {str((root / c / f"img_{c}_0.png").resolve()) for c in ("stripes", "speckle")}
    return root, HeldOutSplit(held, "test split")


class Counting(Feedback):
    def __init__(self, cancel_after: int | None = None) -> None:
        self.calls = 0
        self.cancel_after = cancel_after
        self.logs: list[str] = []

    def progress(self, fraction, message=""):
        self.calls += 1

    def log(self, message):
        self.logs.append(message)

    def cancelled(self):
        return self.cancel_after is not None and self.calls >= self.cancel_after


class TestStep1:
    def test_fine_tunes_on_the_training_part_and_records_its_lineage(self, tiny_model, mars_set, tmp_path):
        root, split = mars_set
        fb = Counting()
        out = tmp_path / "step1.pt"
        r = transfer_step1(root, out, tiny_model, epochs=2, batch_size=4, device="cpu", feedback=fb, split=split)
        enc = load_model(out, "cpu")
        t = enc.metadata.training
        assert t["step"] == 1 and t["parent"]["path"] == tiny_model and t["parent"]["step"] == 0
        assert t["classes"] == ["speckle", "stripes"]
        assert t["images"] == {"speckle": 5, "stripes": 5}  # the held-out images were not trained on
        assert t["heldout_balanced_accuracy"] is not None and "test split" in t["split"]
        assert np.array(t["linear_head"]["weight"]).shape == (2, enc.embedding_dim)
        assert [h["epoch"] for h in r.history] == [1, 2] and fb.calls >= 4
        parent = load_model(tiny_model, "cpu").network.state_dict()
        changed = [k for k, v in enc.network.state_dict().items()
                   if v.dtype.is_floating_point and not torch.allclose(v, parent[k])]
        assert any(k.startswith("trunk.") for k in changed)  # the whole encoder is fine-tuned

    def test_cancel_writes_nothing(self, tiny_model, mars_set, tmp_path):
        root, split = mars_set
        with pytest.raises(SearchCancelled):
            transfer_step1(root, tmp_path / "s1.pt", tiny_model, epochs=2, batch_size=4, device="cpu",
                           feedback=Counting(cancel_after=1), split=split)
        assert not list(tmp_path.glob("*.pt"))


class TestStep2:
    def test_without_fine_tuning_prototypes_are_the_mean_embeddings(self, tiny_model, tmp_path):
        support = make_class_folder(tmp_path / "support", {"stripes": 2, "speckle": 2}, seed=8)
        out = tmp_path / "fs.pt"
        transfer_step2(support, out, tiny_model, steps=0, augment=False, device="cpu")
        stored = CosineClassifier.from_model(load_model(out, "cpu"))
        parent = load_model(tiny_model, "cpu")
        s = load_labelled_folder(support, 100)
        expected = CosineClassifier.fit(parent.embed(s.patches), s.labels, s.class_names)
        assert stored.class_names == ["speckle", "stripes"]
        assert np.allclose(stored.prototypes, expected.prototypes, atol=1e-5)

    def test_fine_tuning_changes_only_the_last_layers_and_the_model_classifies_alone(self, tiny_model, tmp_path):
        support = make_class_folder(tmp_path / "support", {"stripes": 3, "speckle": 3}, seed=9)
        query = make_class_folder(tmp_path / "query", {"stripes": 4, "speckle": 4}, seed=10, prefix="q")
        out = tmp_path / "fs.pt"
        r = transfer_step2(support, out, tiny_model, steps=20, device="cpu")
        t = r.metadata.training
        assert t["step"] == 2 and t["support"] == {"speckle": 3, "stripes": 3} and t["fine_tune_steps"] == 20
        tuned = load_model(out, "cpu").network.state_dict()
        parent = load_model(tiny_model, "cpu").network.state_dict()
        for k, v in tuned.items():
            if v.dtype.is_floating_point:
                assert torch.allclose(v, parent[k]) == (not k.startswith("head.")), k
        rows, clf = classify_folder(None, query, str(out), "cpu")  # no support: the model's own classes
        assert clf.class_names == ["speckle", "stripes"]
        assert all(r["path"].split("/")[0] == r["predicted"] for r in rows)
        # The .onnx written beside it carries the classes too, and classifies the same on ONNX Runtime.
        rows_onnx, clf_onnx = classify_folder(None, query, str(out.with_suffix(".onnx")), "cpu", runtime="onnx")
        assert clf_onnx.class_names == clf.class_names and np.array_equal(clf_onnx.prototypes, clf.prototypes)
        assert [r["predicted"] for r in rows_onnx] == [r["predicted"] for r in rows]
        assert max(abs(a["cosine"] - b["cosine"]) for a, b in zip(rows, rows_onnx)) < 1e-5

    def test_adaptation_separates_the_support_better(self, tiny_model, tmp_path):
        enc = load_model(tiny_model, "cpu")
        s = load_labelled_folder(make_class_folder(tmp_path / "s", {"stripes": 4, "blobs": 4}, seed=11), 100)
        split = split_network(enc)
        feats = split.pooled(s.patches)
        # The frozen part and the head reproduce the encoder exactly.
        assert np.allclose(split.post(split.head(torch.from_numpy(feats))).detach().numpy(), enc.embed(s.patches),
                           atol=1e-5)

        def support_margin(steps):
            clf, embed = adapt_cosine_classifier(feats, s.labels, s.class_names, split.head, split.post, steps=steps)
            cos = clf.cosines(embed(feats))
            return float(np.mean(cos[np.arange(len(cos)), s.labels] - cos[np.arange(len(cos)), 1 - s.labels]))

        assert support_margin(40) > support_margin(0)

    def test_dihedral_views_are_the_eight_symmetries(self):
        x = np.arange(9, dtype=np.float32).reshape(1, 3, 3)
        views = {dihedral(x, k).tobytes() for k in range(8)}
        assert len(views) == 8 and np.array_equal(dihedral(x, 0), x)


def test_transfer_command_needs_its_inputs(tiny_model, tmp_path):
    parser = build_parser()
    args = parser.parse_args(["transfer", "--step", "2", "--model", tiny_model, "--out", str(tmp_path / "x.pt")])
    with pytest.raises(InputError, match="--support"):
        args.func(args)
    args = parser.parse_args(["transfer", "--step", "1", "--model", tiny_model])
    with pytest.raises(InputError, match="--out"):
        args.func(args)
