"""Training: data discovery, split by scene, pair rules, augmentation, loss, loop, resume, seeding."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from siamese_analog_plugin.engine.encoder import load_model  # noqa: E402
from siamese_analog_plugin.engine.errors import InputError  # noqa: E402
from siamese_analog_plugin.learning.datasets import (  # noqa: E402
    ANALOG_PAIRS,
    ImageRecord,
    PairTable,
    augment_batch,
    discover_dataset,
    sample_pairs,
    scene_of,
    split_by_scene,
)
from siamese_analog_plugin.learning.training import (  # noqa: E402
    TrainConfig,
    batch_pair_loss,
    class_targets,
    contrastive_loss,
    proxy_class_loss,
    state_path_for,
    train,
)


def _texture(kind: str, rng: np.random.Generator, size: int = 48) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == "stripes":
        period = rng.uniform(5, 9)
        angle = rng.uniform(0, np.pi)
        img = 0.5 + 0.4 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    elif kind == "spots":
        img = np.full((size, size), 0.3, np.float32)
        for _ in range(8):
            cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(3, 6)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 0.9
    else:
        img = rng.uniform(0, 1, (size, size))
    img = img + rng.normal(0, 0.03, (size, size))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Three classes, three scenes each, four crops per scene (``scene-NN.png``)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("classes")
    rng = np.random.default_rng(0)
    for cls in ("stripes", "spots", "noise"):
        (root / cls).mkdir()
        for s in range(3):
            for k in range(4):
                Image.fromarray(_texture(cls, rng)).save(root / cls / f"{cls}{s}-{k:02d}.png")
    return root


def _config(folders, tmp_path, **kw) -> TrainConfig:
    base = dict(data=str(folders), epochs=2, batch_size=16, pairs_per_epoch=64, input_size=32, cache_size=40,
                embedding_dim=8, arch_params={"widths": [4, 8], "stem_stride": 1, "stem_kernel": 3},
                out=str(tmp_path / "m.pt"), threads=2, eval_pairs=64, test_fraction=0.25)
    base.update(kw)
    return TrainConfig(**base)


class TestDiscoveryAndSplit:
    def test_scene_is_prefix_before_dash(self):
        assert scene_of("/x/ESP_016683_2535_RED-0042.jpg") == "ESP_016683_2535_RED"
        assert scene_of("desert_26.jpg") == "desert_26"

    def test_discovers_class_folders(self, folders):
        ds = discover_dataset(folders)
        assert ds.layout == "folders"
        assert ds.groups() == ["earth:noise", "earth:spots", "earth:stripes"]
        assert len(ds.records) == 36

    def test_missing_and_empty_folders_raise_input_errors(self, tmp_path):
        with pytest.raises(InputError, match="does not exist"):
            discover_dataset(tmp_path / "nope")
        (tmp_path / "empty_class").mkdir()
        with pytest.raises(InputError, match="holds no images"):
            discover_dataset(tmp_path)

    def test_no_scene_on_both_sides(self, folders):
        ds = discover_dataset(folders)
        held = split_by_scene(ds.records, seed=3, test_fraction=0.25)
        test_scenes = {r.scene for r, h in zip(ds.records, held) if h}
        train_scenes = {r.scene for r, h in zip(ds.records, held) if not h}
        assert test_scenes and train_scenes and not test_scenes & train_scenes
        # Every class keeps training images and gets held-out ones.
        for g in ds.groups():
            flags = [h for r, h in zip(ds.records, held) if r.group == g]
            assert 0 < sum(flags) < len(flags)

    def test_split_is_deterministic_from_the_seed(self, folders):
        ds = discover_dataset(folders)
        assert split_by_scene(ds.records, 5) == split_by_scene(ds.records, 5)

    def test_fixed_roles_are_kept(self):
        recs = [ImageRecord(f"/s{i}.jpg", "earth:dune_field", "site/a_test", "dune_field", (0, 0, 10), True)
                for i in range(3)]
        recs += [ImageRecord(f"/t{i}.jpg", "earth:dune_field", "site/a_image", "dune_field", (0, 0, 10), False)
                 for i in range(3)]
        assert split_by_scene(recs, 0) == [True] * 3 + [False] * 3


class TestPairs:
    def test_table_rules(self):
        groups = ["mars:dark_dune", "mars:bright_dune", "earth:dune_field", "earth:Desert", "mars:crater",
                  "mars:other", "earth:Mountain", "earth:Forest"]
        t = PairTable(groups)
        assert t.label("mars:crater", "mars:crater") == 1
        assert t.label("mars:dark_dune", "earth:dune_field") == 1  # cross-planet analog
        assert t.label("mars:bright_dune", "earth:Desert") == 1
        assert t.label("mars:dark_dune", "mars:bright_dune") == 0  # labels keep them apart on Mars
        assert t.label("mars:crater", "earth:dune_field") == 0
        assert t.label("mars:other", "earth:Mountain") == -1
        assert t.label("earth:Forest", "earth:Mountain") == 0
        assert frozenset(("mars:dark_dune", "earth:Desert")) in ANALOG_PAIRS

    def test_sampled_pairs_are_balanced_and_follow_the_rules(self):
        groups = ["mars:dark_dune", "earth:dune_field", "mars:crater", "earth:Forest"]
        t = PairTable(groups)
        gid = np.repeat(np.arange(4), 10)
        a, b, y = sample_pairs(gid, t, 400, np.random.default_rng(1))
        assert y.mean() == pytest.approx(0.5)
        labels = t.table[gid[a], gid[b]]
        assert np.array_equal(labels, y)
        assert not np.any((a == b) & (y == 1))
        cross = (y == 1) & (gid[a] != gid[b])
        assert cross.sum() > 20  # dune anchors draw cross-planet partners


class TestAugmentation:
    def test_shape_normalisation_and_reproducibility(self):
        imgs = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (6, 40, 40), dtype=np.uint8))
        v1 = augment_batch(imgs, 32, torch.Generator().manual_seed(4))
        v2 = augment_batch(imgs, 32, torch.Generator().manual_seed(4))
        assert v1.shape == (6, 1, 32, 32)
        assert torch.equal(v1, v2)
        assert torch.allclose(v1.mean(dim=(2, 3)), torch.zeros(6, 1), atol=1e-4)
        plain = augment_batch(imgs, 32, torch.Generator().manual_seed(4), strength=0)
        assert plain.shape == (6, 1, 32, 32) and not torch.equal(plain, v1)


class TestLoss:
    def test_contrastive_loss(self):
        d = torch.tensor([0.0, 0.5, 0.5, 1.5])
        y = torch.tensor([1, 1, 0, 0])
        loss = contrastive_loss(d, y, margin=1.0)
        assert torch.allclose(loss, torch.tensor([0.0, 0.25, 0.25, 0.0]))  # beyond the margin: free

    def test_gradient_pulls_similar_and_pushes_close_dissimilar(self):
        z = torch.tensor([[0.0, 0.0], [0.3, 0.0], [0.0, 0.2]], requires_grad=True)
        groups = torch.tensor([0, 0, 1])
        table = torch.tensor([[1, 0], [0, 1]])
        loss, stats = batch_pair_loss(z, groups, table, margin=1.0)
        loss.backward()
        # Point 1 is pulled towards point 0 (same group): its gradient points away from it.
        assert z.grad[1, 0] > 0
        # Point 2 (other group, closer than the margin) is pushed away from point 0.
        assert z.grad[2, 1] < 0
        assert stats["d_similar"] == pytest.approx(0.3, abs=1e-4)


    def test_proxy_class_loss_is_low_when_each_view_points_at_its_proxy(self):
        proxies = torch.eye(3, 4)
        groups = torch.tensor([0, 1, 2])
        right = proxy_class_loss(torch.eye(3, 4) * 5, groups, proxies, scale=16.0)
        wrong = proxy_class_loss(torch.eye(3, 4)[[1, 2, 0]], groups, proxies, scale=16.0)
        assert float(right) < 1e-3 < 1.0 < float(wrong)  # length of z does not matter (cosine)
        z = torch.zeros(1, 4, requires_grad=True)
        with torch.no_grad():
            z += torch.tensor([[1.0, 1.0, 0.0, 0.0]])
        proxy_class_loss(z, torch.tensor([0]), proxies, scale=16.0).backward()
        assert z.grad[0, 0] < 0 < z.grad[0, 1]  # moved towards proxy 0, away from proxy 1


    def test_class_targets_leave_analog_groups_to_the_contrastive_loss(self):
        table = PairTable(["mars:crater", "mars:dark_dune", "earth:dune_field", "earth:Forest"])
        assert class_targets(table, "all").tolist() == [0, 1, 2, 3]
        assert class_targets(table, "non_analog").tolist() == [0, -100, -100, 3]
        with pytest.raises(InputError, match="class-loss targets"):
            class_targets(table, "some")
        z = torch.randn(2, 4)
        assert float(proxy_class_loss(z, torch.tensor([-100, -100]), torch.eye(4), 16.0)) == 0.0


class TestTrainingLoop:
    def test_trains_saves_loadable_model_and_lowers_loss(self, folders, tmp_path):
        cfg = _config(folders, tmp_path, epochs=4, pairs_per_epoch=128, lr=3e-3)
        result = train(cfg)
        enc = load_model(cfg.out, "cpu")
        assert enc.metadata.architecture == "compact" and enc.input_size == 32
        assert enc.metadata.training["seed"] == 0 and "pairs" in enc.metadata.training
        emb = enc.embed(np.random.default_rng(0).random((3, 32, 32), dtype=np.float32))
        assert emb.shape == (3, 8) and np.all(np.isfinite(emb))
        losses = [h["loss"] for h in result["history"]]
        assert losses[-1] < losses[0]
        assert state_path_for(cfg.out).exists()
        assert (tmp_path / "m.split.json").exists()
        # The same model for ONNX Runtime, beside it, embeds the same.
        from siamese_analog_plugin.engine.runtime import load_runtime

        assert result["onnx"] == str(tmp_path / "m.onnx")
        onx = load_runtime(result["onnx"], "onnx", "cpu")
        assert onx.metadata.to_json() == enc.metadata.to_json()
        assert np.abs(onx.embed(np.random.default_rng(0).random((3, 32, 32), dtype=np.float32)) - emb).max() < 1e-5

    def test_resume_continues_and_same_seed_gives_same_weights(self, folders, tmp_path):
        # A constant rate: the cosine schedule depends on --epochs, so a 1-epoch run stopped early
        # and a 2-epoch run differ by design; the resume mechanics are what is tested here.
        full = train(_config(folders, tmp_path / "full", epochs=2, schedule="constant"))
        first = train(_config(folders, tmp_path / "part", epochs=1, schedule="constant"))
        assert len(first["history"]) == 1
        resumed = train(_config(folders, tmp_path / "part", epochs=2, schedule="constant", resume=first["state"]))
        assert [h["epoch"] for h in resumed["history"]] == [1, 2]
        a = load_model(full["out"], "cpu").network.state_dict()
        b = load_model(resumed["out"], "cpu").network.state_dict()
        for key in a:
            assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key

    def test_class_loss_and_center_pooling_train_and_resume_exactly(self, folders, tmp_path):
        kw = dict(schedule="constant", class_loss=1.0, arch_params={"widths": [4, 8], "stem_stride": 1,
                                                                  "stem_kernel": 3, "pooling": "center"})
        full = train(_config(folders, tmp_path / "full", epochs=2, **kw))
        first = train(_config(folders, tmp_path / "part", epochs=1, **kw))
        resumed = train(_config(folders, tmp_path / "part", epochs=2, resume=first["state"], **kw))
        enc = load_model(full["out"], "cpu")
        assert enc.metadata.arch_params["pooling"] == "center"
        assert "cosine-proxy class" in enc.metadata.training["loss"]
        # The proxies are part of the training state: without them the resumed run would differ.
        assert "proxies" in torch.load(first["state"], weights_only=True)
        a, b = enc.network.state_dict(), load_model(resumed["out"], "cpu").network.state_dict()
        for key in a:
            assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key

    def test_unknown_architecture(self, folders, tmp_path):
        with pytest.raises(InputError, match="Unknown architecture"):
            train(_config(folders, tmp_path, arch="resnet"))
