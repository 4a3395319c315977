"""Networks, the model file format, devices."""

from __future__ import annotations

import os
import zipfile

import numpy as np
import pytest
import torch

from siamese_analog_plugin.engine.devices import resolve_device
from siamese_analog_plugin.engine.encoder import (
    CPU_CHUNK,
    AnalogEncoder,
    ModelMetadata,
    build_network,
    load_model,
    normalise_patches,
    save_model,
)
from siamese_analog_plugin.engine.errors import InputError, ModelError


class TestPaperNetwork:
    def test_layers_are_the_published_ones(self):
        net = build_network("paper", 100)
        convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
        assert [c.out_channels for c in convs] == [4, 8, 8]
        assert all(c.kernel_size == (3, 3) and c.stride == (1, 1) and c.padding == (1, 1) for c in convs)
        kinds = [type(m).__name__ for m in net.cnn]
        assert kinds == ["Conv2d", "ReLU", "BatchNorm2d"] * 3
        linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
        assert [(lin.in_features, lin.out_features) for lin in linears] == [(80000, 500), (500, 500), (500, 5)]
        n = sum(p.numel() for p in net.parameters())
        assert 40_000_000 < n < 40_500_000  # ~40 M, as the issue says

    def test_output_is_a_5d_embedding(self):
        net = build_network("paper", 100).eval()
        with torch.no_grad():
            assert net(torch.zeros(2, 1, 100, 100)).shape == (2, 5)


class TestCompactNetwork:
    def test_embedding_shape_and_norm(self):
        net = build_network("compact", 100, embedding_dim=16).eval()
        with torch.no_grad():
            z = net(torch.randn(3, 1, 100, 100))
        assert z.shape == (3, 16)
        assert torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)

    def test_unknown_architecture(self):
        with pytest.raises(ModelError, match="Unknown encoder architecture"):
            build_network("resnet9000")

    def test_center_pooling_tells_a_central_object_from_the_same_object_off_centre(self):
        torch.manual_seed(0)
        net = build_network("compact", 100, embedding_dim=16, pooling="center").eval()
        first = [m for m in net.head.modules() if isinstance(m, torch.nn.Linear)][0]
        assert first.in_features == 4 * 128  # whole-patch and central mean/std of 128 maps
        yy, xx = np.mgrid[0:100, 0:100]
        centre = ((yy - 50) ** 2 + (xx - 50) ** 2 < 15 ** 2).astype(np.float32)
        corner = ((yy - 18) ** 2 + (xx - 18) ** 2 < 15 ** 2).astype(np.float32)
        x = torch.from_numpy(np.stack([centre, corner, np.rot90(corner).copy()]))[:, None]
        with torch.no_grad():
            f = net.trunk(x)
            h, w = f.shape[-2:]
            whole = f.mean(dim=(2, 3))
            mid = f[:, :, h // 4:h - h // 4, w // 4:w - w // 4].mean(dim=(2, 3))
            z = net(x)
        # The whole-patch statistics barely see where the disc lies; the central ones do.
        assert (mid[0] - mid[1]).norm() > 2 * (whole[0] - whole[1]).norm()
        assert z.shape == (3, 16) and torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)

    def test_unknown_pooling(self):
        with pytest.raises(ModelError, match="Unknown pooling 'max'"):
            build_network("compact", 100, pooling="max")

    def test_pooling_is_kept_in_the_model_file(self, tmp_path):
        net = build_network("compact", 32, embedding_dim=8, widths=(4, 8), pooling="center")
        save_model(tmp_path / "c.pt", net, ModelMetadata(architecture="compact", input_size=32, embedding_dim=8,
                                                           arch_params={"widths": [4, 8], "pooling": "center"}))
        enc = load_model(tmp_path / "c.pt", "cpu")
        x = np.random.default_rng(1).random((2, 32, 32), dtype=np.float32)
        with torch.no_grad():
            expected = net.eval()(torch.from_numpy(normalise_patches(x, {"mode": "per_patch"}))[:, None]).numpy()
        assert np.allclose(enc.embed(x), expected, atol=1e-5)


class TestNormalisation:
    def test_per_patch_removes_brightness_and_contrast(self):
        rng = np.random.default_rng(0)
        p = rng.random((1, 10, 10)).astype(np.float32)
        a = normalise_patches(p, {"mode": "per_patch"})
        b = normalise_patches(0.3 * p + 0.5, {"mode": "per_patch"})
        assert np.allclose(a, b, atol=1e-4)
        assert abs(a.mean()) < 1e-5 and a.std() == pytest.approx(1, abs=1e-3)

    def test_global(self):
        x = np.full((1, 2, 2), 0.75, np.float32)
        assert np.allclose(normalise_patches(x, {"mode": "global", "mean": 0.5, "std": 0.25}), 1.0)

    def test_values_are_numpys_mean_and_std_to_the_bit_and_the_input_is_kept(self):
        rng = np.random.default_rng(3)
        for shape in ((1, 100, 100), (9, 100, 100), (100, 100)):
            x = (rng.random(shape) ** rng.uniform(0.2, 5)).astype(np.float32) * rng.uniform(0.1, 3)
            x[..., :10, :] = 0.25 if x.ndim == 2 else x[..., :10, :]
            if x.ndim == 3:
                x[0] = 0.5  # a flat patch: its standard deviation is floored
            before = x.copy()
            mean, std = x.mean(axis=(-2, -1), keepdims=True), x.std(axis=(-2, -1), keepdims=True)
            assert np.array_equal(normalise_patches(x, {"mode": "per_patch"}), (x - mean) / np.maximum(std, 1e-3))
            assert np.array_equal(x, before)

    def test_unknown_mode(self):
        with pytest.raises(ModelError, match="Unknown normalisation mode 'robust'"):
            normalise_patches(np.zeros((1, 4, 4), np.float32), {"mode": "robust"})


class TestModelFile:
    def test_round_trip_keeps_weights_and_metadata(self, tmp_path):
        torch.manual_seed(1)
        net = build_network("compact", 64, embedding_dim=8, widths=(4, 8))
        meta = ModelMetadata("compact", 64, 8, {"widths": [4, 8]}, {"mode": "per_patch"},
                             {"epochs": 3, "data": "unit test"}, "tiny")
        save_model(tmp_path / "m.pt", net, meta)
        enc = load_model(tmp_path / "m.pt", "cpu")
        assert enc.metadata == meta
        assert enc.input_size == 64 and enc.embedding_dim == 8
        x = np.random.default_rng(0).random((5, 64, 64)).astype(np.float32)
        with torch.no_grad():
            expected = net.eval()(torch.from_numpy(normalise_patches(x, meta.normalisation)[:, None])).numpy()
        assert np.allclose(enc.embed(x, batch_size=2), expected, atol=1e-5)
        assert "compact" in enc.describe() and "unit test" in enc.describe()

    def test_missing_file(self, tmp_path):
        with pytest.raises(ModelError, match="does not exist"):
            load_model(tmp_path / "nope.pt")

    def test_random_bytes(self, tmp_path):
        p = tmp_path / "corrupt.pt"
        p.write_bytes(os.urandom(2048))
        with pytest.raises(ModelError, match="not a Siamese Analog Finder model"):
            load_model(p)

    def test_truncated_file(self, tmp_path, tiny_model):
        p = tmp_path / "cut.pt"
        data = open(tiny_model, "rb").read()
        p.write_bytes(data[: len(data) // 2])
        with pytest.raises(ModelError, match="corrupt, truncated"):
            load_model(p)

    def test_foreign_checkpoint(self, tmp_path):
        p = tmp_path / "foreign.pt"
        torch.save({"model": {"w": torch.zeros(3)}, "epoch": 4}, p)
        with pytest.raises(ModelError, match="not a Siamese Analog Finder model"):
            load_model(p)

    def test_pickled_code_is_never_run(self, tmp_path):
        marker = tmp_path / "pwned"

        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        p = tmp_path / "evil.pt"
        torch.save({"format": "siamese-analog-finder/model", "state_dict": {}, "x": Evil()}, p)
        with pytest.raises(ModelError):
            load_model(p)
        assert not marker.exists()

    def test_weights_that_do_not_fit(self, tmp_path):
        net = build_network("compact", 100, embedding_dim=8)
        save_model(tmp_path / "m.pt", net, ModelMetadata("compact", 100, 16))  # says 16-d, holds 8-d
        with pytest.raises(ModelError, match="do not match the architecture"):
            load_model(tmp_path / "m.pt")

    def test_file_is_a_plain_zip_of_tensors(self, tiny_model):
        with zipfile.ZipFile(tiny_model) as z:
            assert any(n.endswith("data.pkl") for n in z.namelist())

    def test_unwritable_destination(self, tmp_path):
        (tmp_path / "a_file").write_text("not a folder")
        with pytest.raises(ModelError, match="Cannot write the model file"):
            save_model(tmp_path / "a_file" / "m.pt", build_network("compact"), ModelMetadata("compact"))


def with_batch_norm_statistics(net, seed=0):
    """Give every batch norm non-trivial statistics and affine terms (as after training)."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) * 3 + 0.2)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))
    return net


class TestInferenceNetwork:
    """What embeds is a copy made for speed (batch norms folded, channels-last); same results."""

    @pytest.mark.parametrize("arch, size, params", [
        ("compact", 100, {}), ("compact", 64, {"widths": (4, 8), "pooling": "meanstd"}), ("paper", 40, {})])
    def test_same_embeddings_as_the_network(self, arch, size, params):
        torch.manual_seed(0)
        net = with_batch_norm_statistics(build_network(arch, size, embedding_dim=16, **params))
        enc = AnalogEncoder(net, ModelMetadata(arch, size, 16, params), torch.device("cpu"))
        x = np.random.default_rng(0).random((7, size, size)).astype(np.float32)
        with torch.inference_mode():
            expected = net(enc.to_tensor(x)).numpy()
        got = enc.embed(x, batch_size=3)
        assert np.allclose(got, expected, atol=1e-5, rtol=1e-5)
        folded = [m for m in enc.inference_network.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        kept = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert len(kept) >= 2 and len(folded) == (len(kept) if arch == "paper" else 0)  # paper: conv-ReLU-BN

    @pytest.mark.parametrize("n", [CPU_CHUNK, CPU_CHUNK + 1, 3 * CPU_CHUNK + 5])
    def test_cpu_batches_are_embedded_in_chunks_with_the_same_result(self, n):
        """A batch larger than CPU_CHUNK goes through in chunks: every row is its own embedding."""
        torch.manual_seed(1)
        net = with_batch_norm_statistics(build_network("compact", 64, embedding_dim=8, widths=(4, 8)))
        enc = AnalogEncoder(net, ModelMetadata("compact", 64, 8, {"widths": [4, 8]}), torch.device("cpu"))
        x = enc.to_tensor(np.random.default_rng(3).random((n, 64, 64)).astype(np.float32))
        got = enc.embed_tensor(x)
        assert got.shape == (n, 8) and got.dtype == np.float32
        with torch.inference_mode():
            expected = net(x).numpy()
        assert np.allclose(got, expected, atol=1e-5, rtol=1e-5)
        alone = np.concatenate([enc.embed_tensor(x[i:i + 1]) for i in range(n)])
        assert np.allclose(got, alone, atol=1e-5, rtol=1e-5)

    @pytest.mark.parametrize("shape", [(3, 4, 50, 50), (2, 5, 25, 25), (1, 2, 7, 12)])
    def test_fast_pooling_and_statistics_give_torchs_values(self, shape):
        """The inference copy's 2 x 2 max pooling is torch's to the bit (odd sizes too), and the
        pooled mean and standard deviation are torch's to ~1e-6."""
        from siamese_analog_plugin.engine.encoder import _max_pool_2x2_class, _mean_std

        x = torch.relu(torch.randn(*shape)).contiguous(memory_format=torch.channels_last)
        assert torch.equal(_max_pool_2x2_class()()(x), torch.nn.functional.max_pool2d(x, 2))
        mean, std = _mean_std(x)
        assert torch.allclose(mean, x.mean(dim=(2, 3)), atol=1e-6)
        assert torch.allclose(std, x.std(dim=(2, 3)), atol=1e-6)
        net = build_network("compact", 64, embedding_dim=8, widths=(4, 8))
        enc = AnalogEncoder(net, ModelMetadata("compact", 64, 8, {"widths": [4, 8]}), torch.device("cpu"))
        kinds = [type(m).__name__ for m in enc.inference_network.modules()]
        assert "MaxPool2x2" in kinds and "MaxPool2d" not in kinds

    def test_the_network_itself_is_left_as_it_is(self):
        net = with_batch_norm_statistics(build_network("compact", 64, embedding_dim=8, widths=(4, 8)))
        before = {k: v.clone() for k, v in net.state_dict().items()}
        enc = AnalogEncoder(net, ModelMetadata("compact", 64, 8, {"widths": [4, 8]}), torch.device("cpu"))
        enc.embed(np.random.default_rng(1).random((2, 64, 64)).astype(np.float32))
        assert enc.network is net and any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
        assert all(p.requires_grad for p in net.parameters())  # still trainable

    def test_rebuilt_when_the_weights_change(self):
        """Fine-tuning trains ``network`` in place: embeddings made after a step see the new weights."""
        net = with_batch_norm_statistics(build_network("compact", 64, embedding_dim=8, widths=(4, 8)))
        enc = AnalogEncoder(net, ModelMetadata("compact", 64, 8, {"widths": [4, 8]}), torch.device("cpu"))
        x = np.random.default_rng(2).random((3, 64, 64)).astype(np.float32)
        first, copy = enc.embed(x), enc.inference_network
        assert enc.inference_network is copy  # not rebuilt for nothing
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        net.train()
        net(enc.to_tensor(x)).sum().backward()
        opt.step()
        net.eval()
        with torch.inference_mode():
            expected = net(enc.to_tensor(x)).numpy()
        after = enc.embed(x)
        assert not np.allclose(after, first) and np.allclose(after, expected, atol=1e-5)


class TestDevices:
    def test_auto_on_this_machine(self):
        dev = resolve_device("auto")
        assert dev.type == ("cuda" if torch.cuda.is_available() else "cpu")

    @pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where no GPU exists")
    def test_cuda_without_gpu(self):
        with pytest.raises(InputError, match="no CUDA GPU"):
            resolve_device("cuda:0")

    def test_unknown(self):
        with pytest.raises(InputError, match="Unknown device 'tpu'"):
            resolve_device("tpu")

    def test_model_reports_device(self, tiny_model):
        assert str(load_model(tiny_model, "cpu").device) == "cpu"
