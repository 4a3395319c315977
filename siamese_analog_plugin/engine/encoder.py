"""Siamese encoders G_w and the model file format.

Two networks:

* ``paper``: the published encoder, exactly: three 3x3 convolutions (4, 8, 8 filters, stride 1,
  same padding) each followed by ReLU and BatchNorm, flattened into fully connected layers
  (500, 500) ending in a 5-d embedding. On a 100x100 patch that is ~40 M parameters.
* ``compact``: the shipped default. Small convolutional trunk, then orderless pooling (mean and
  standard deviation of every feature map), which suits texture, and an L2-normalised embedding.

A model file is a zip written by ``torch.save`` that holds only tensors, strings and numbers:
``{"format": ..., "version": 1, "metadata": <json str>, "state_dict": {...}}``. It is read with
``torch.load(weights_only=True)``, so opening a model never runs code from the file. The
metadata carries everything needed to use the weights: architecture and its parameters, input
size, normalisation, embedding size and training provenance.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, ModelError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ARCHITECTURES",
    "build_network",
    "normalise_patches",
    "normalise_in_place",
    "ModelMetadata",
    "AnalogEncoder",
    "save_model",
    "load_model",
    "default_model_path",
    "COMPACT_DEFAULTS",
]

FORMAT = "siamese-analog-finder/model"
FORMAT_VERSION = 1
ARCHITECTURES = ("paper", "compact")
DEFAULT_MODEL_NAME = "siamese_compact.pt"
CPU_CHUNK = 32  # patches a CPU forward pass takes at once (AnalogEncoder.embed_tensor)
# Defaults of the compact network (trained model files record their own values).
COMPACT_DEFAULTS = {"widths": (16, 32, 64, 128), "l2_normalise": True, "stem_stride": 2, "stem_kernel": 5,
                    "pooling": "center"}
POOLINGS = ("meanstd", "center")


def _torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - exercised only without torch
        raise ModelError(
            "PyTorch is not installed, and the encoder needs it",
            "Install it with: pip install torch (CPU build: pip install torch --index-url "
            "https://download.pytorch.org/whl/cpu)") from exc
    return torch


def build_network(architecture: str, input_size: int = 100, **params: Any):
    """Build an untrained encoder network.

    Args:
        architecture: ``"paper"`` or ``"compact"``.
        input_size: side of the square grey input patch, in pixels.
        **params: architecture parameters (``embedding_dim``; for ``compact`` also
            ``widths``, ``l2_normalise``, ``stem_stride``, ``stem_kernel`` and ``pooling``).

    Returns:
        A ``torch.nn.Module`` mapping ``(N, 1, S, S)`` to ``(N, D)``.
    """
    torch = _torch()
    nn = torch.nn

    if architecture == "paper":
        dim = int(params.get("embedding_dim", 5))
        hidden = int(params.get("hidden", 500))

        class PaperEncoder(nn.Module):
            """The published encoder: 3 x (conv3x3, ReLU, BatchNorm) -> FC 500 -> FC 500 -> FC dim."""

            def __init__(self) -> None:
                super().__init__()
                self.cnn = nn.Sequential(
                    nn.Conv2d(1, 4, kernel_size=3, stride=1, padding=1), nn.ReLU(inplace=True), nn.BatchNorm2d(4),
                    nn.Conv2d(4, 8, kernel_size=3, stride=1, padding=1), nn.ReLU(inplace=True), nn.BatchNorm2d(8),
                    nn.Conv2d(8, 8, kernel_size=3, stride=1, padding=1), nn.ReLU(inplace=True), nn.BatchNorm2d(8),
                )
                self.fc = nn.Sequential(
                    nn.Linear(8 * input_size * input_size, hidden), nn.ReLU(inplace=True),
                    nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
                    nn.Linear(hidden, dim),
                )

            def forward(self, x):
                return self.fc(torch.flatten(self.cnn(x), 1))

        return PaperEncoder()

    if architecture == "compact":
        dim = int(params.get("embedding_dim", 32))
        widths = [int(w) for w in params.get("widths", COMPACT_DEFAULTS["widths"])]
        l2 = bool(params.get("l2_normalise", COMPACT_DEFAULTS["l2_normalise"]))
        # A strided first convolution: a full-resolution first layer cost 4x the training time
        # on CPU for no gain in retrieval (measured on the held-out split).
        stem_stride = int(params.get("stem_stride", COMPACT_DEFAULTS["stem_stride"]))
        stem_kernel = int(params.get("stem_kernel", COMPACT_DEFAULTS["stem_kernel"]))
        # "meanstd": mean and standard deviation of each feature map over the whole patch (orderless
        # texture statistics). "center": the same statistics over the patch and over its central
        # half, so an object in the middle (a crater) differs from the same texture spread out,
        # and the pooling stays blind to rotation.
        pooling = str(params.get("pooling", COMPACT_DEFAULTS["pooling"]))
        if pooling not in POOLINGS:
            raise ModelError(f"Unknown pooling '{pooling}' in the model parameters",
                             f"Use one of: {', '.join(POOLINGS)}")
        n_stats = 2 if pooling == "meanstd" else 4

        class CompactEncoder(nn.Module):
            """Conv trunk -> mean+std pooling (texture statistics) -> MLP -> embedding."""

            def __init__(self) -> None:
                super().__init__()
                layers: list = []
                channels = 1
                for i, width in enumerate(widths):
                    k, stride = (stem_kernel, stem_stride) if i == 0 else (3, 1)
                    layers += [nn.Conv2d(channels, width, k, stride=stride, padding=k // 2, bias=False),
                               nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                    if i < len(widths) - 1:
                        layers.append(nn.MaxPool2d(2))
                    channels = width
                self.trunk = nn.Sequential(*layers)
                self.head = nn.Sequential(nn.Linear(n_stats * channels, 2 * channels), nn.ReLU(inplace=True),
                                          nn.Linear(2 * channels, dim))
                self.l2 = l2

            def features(self, x):
                """The pooled statistics the head reads (what step-2 adaptation keeps frozen)."""
                f = self.trunk(x)
                stats = list(_mean_std(f))
                if n_stats == 4:
                    h, w = f.shape[-2:]
                    stats += _mean_std(f[:, :, h // 4:h - h // 4, w // 4:w - w // 4])
                return torch.cat(stats, dim=1)

            def forward(self, x):
                z = self.head(self.features(x))
                return torch.nn.functional.normalize(z, dim=1) if self.l2 else z

        return CompactEncoder()

    raise ModelError(f"Unknown encoder architecture '{architecture}'",
                     f"Use one of: {', '.join(ARCHITECTURES)}")


def _mean_std(f):
    """Per-channel mean and (unbiased) standard deviation of ``(N, C, H, W)`` features, as
    ``f.mean``/``f.std`` over ``(2, 3)`` give them (to ~1e-7), in two passes: torch's one-pass
    (Welford) reduction over a few spatial positions per channel cost ~15 times more, a fifth
    of the shipped encoder's time on CPU."""
    mean = f.mean(dim=(2, 3))
    d = f - mean[:, :, None, None]
    return mean, (d * d).sum(dim=(2, 3)).div(f.shape[2] * f.shape[3] - 1).sqrt()


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _is_plain_pool_2x2(module) -> bool:
    """Whether ``module`` is ``MaxPool2d(2)``: 2 x 2 windows, stride 2, no padding, floor mode."""
    nn = _torch().nn
    return isinstance(module, nn.MaxPool2d) and _pair(module.kernel_size) == (2, 2) and \
        _pair(module.stride) == (2, 2) and _pair(module.padding) == (0, 0) and _pair(module.dilation) == (1, 1) and \
        not module.ceil_mode and not module.return_indices


@functools.cache
def _max_pool_2x2_class():
    torch = _torch()

    class MaxPool2x2(torch.nn.Module):
        """``MaxPool2d(2)`` for inference as the larger of four strided views: the same values,
        2-3 times faster on CPU than torch's kernel, which also computes the argmax."""

        def forward(self, x):
            h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
            top = torch.maximum(x[..., 0:h:2, 0:w:2], x[..., 0:h:2, 1:w:2])
            return torch.maximum(top, torch.maximum(x[..., 1:h:2, 0:w:2], x[..., 1:h:2, 1:w:2]), out=top)

    return MaxPool2x2


def optimise_for_inference(network, device, pool_views: bool | None = None):
    """An eval-mode copy of ``network`` for inference only (``network`` is left as it is).

    Every ``Conv2d`` directly followed by a ``BatchNorm2d`` in a ``Sequential`` becomes one
    convolution (``fuse_conv_bn_eval``: the normalisation's scale and shift folded into the
    weights and bias), and on CPU and CUDA the module is made channels-last. The compact
    encoder's trunk is conv -> BN -> ReLU, so every batch norm is folded; the paper encoder's
    (conv -> ReLU -> BN) has none to fold. On CPU each 2 x 2 max pooling becomes the maximum
    of four strided views (the same values, 2-3 times faster); ``pool_views=False`` keeps
    torch's ``MaxPool2d`` (the ONNX export: ONNX Runtime has its own fast pooling).
    """
    import copy

    torch = _torch()
    nn = torch.nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    net = copy.deepcopy(network).eval()
    for module in net.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = module._modules[a], module._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                module._modules[a] = fuse_conv_bn_eval(conv, bn)
                module._modules[b] = nn.Identity()
        if pool_views if pool_views is not None else torch.device(device).type == "cpu":
            for name, pool in module._modules.items():
                if _is_plain_pool_2x2(pool):
                    module._modules[name] = _max_pool_2x2_class()()
    if torch.device(device).type in ("cpu", "cuda"):
        net = net.to(memory_format=torch.channels_last)
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def normalise_patches(patches: np.ndarray, normalisation: dict) -> np.ndarray:
    """Normalise grey patches in [0, 1] the way the encoder was trained.

    Args:
        patches: ``(N, S, S)`` (or ``(S, S)``) float32 in [0, 1]; left unchanged.
        normalisation: ``{"mode": "per_patch"}`` (zero mean, unit standard deviation per
            patch: removes illumination and contrast differences between images) or
            ``{"mode": "global", "mean": m, "std": s}``.

    Returns:
        A new float32 array of the same shape.
    """
    x = np.array(patches, dtype=np.float32)
    normalise_in_place(x.reshape(-1, *x.shape[-2:]), normalisation)
    return x


def normalise_in_place(x: np.ndarray, normalisation: dict, chunk: int = 8) -> np.ndarray:
    """:func:`normalise_patches` of float32 ``(N, S, S)`` patches, written into ``x`` (returned).

    The arithmetic of ``(x - mean) / max(std, 1e-3)`` with numpy's own order for the standard
    deviation (mean, deviations, mean of their squares, square root), without batch-sized
    temporaries: only the squares need a buffer, ``chunk`` patches big. The search normalises
    each batch in its own array with it.
    """
    mode = normalisation.get("mode", "per_patch")
    if mode == "global":
        x -= float(normalisation["mean"])
        x /= float(normalisation["std"])
        return x
    if mode != "per_patch":
        raise ModelError(f"Unknown normalisation mode '{mode}' in the model file",
                         "Use a model written by this version of Siamese Analog Finder")
    mean = x.mean(axis=(-2, -1), keepdims=True)
    x -= mean
    std = np.empty_like(mean)
    squares = np.empty((min(chunk, len(x)), *x.shape[1:]), dtype=x.dtype)
    for a in range(0, len(x), chunk):
        part = x[a:a + chunk]
        sq = np.multiply(part, part, out=squares[:len(part)])
        std[a:a + chunk] = sq.mean(axis=(-2, -1), keepdims=True)
    np.sqrt(std, out=std)
    x /= np.maximum(std, 1e-3)
    return x


@dataclass
class ModelMetadata:
    """What a model file says about itself (its model card, in data)."""

    architecture: str
    input_size: int = 100
    embedding_dim: int = 5
    arch_params: dict = field(default_factory=dict)
    normalisation: dict = field(default_factory=lambda: {"mode": "per_patch"})
    training: dict = field(default_factory=dict)
    description: str = ""

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelMetadata:
        data = json.loads(text)
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


class AnalogEncoder:
    """A loaded encoder on a device: turns grey patches into embeddings.

    Attributes:
        network: the torch module, in eval mode, on ``device``.
        metadata: the :class:`ModelMetadata` from the file.
        device: the ``torch.device`` actually used.
        path: the file it came from (``None`` when built in memory).

    It is the ``torch`` runtime of :mod:`.runtime` (the same inference interface as
    :class:`~.runtime.OnnxEncoder`).
    """

    runtime = "torch"

    def __init__(self, network, metadata: ModelMetadata, device, path: str | None = None) -> None:
        self.network = network.eval().to(device)
        self.metadata = metadata
        self.device = device
        self.path = path
        self._inference: tuple[tuple, Any] | None = None

    @property
    def inference_network(self):
        """What embeds: an eval-mode copy of :attr:`network` made for speed, same results.

        Each batch normalisation that follows a convolution is folded into that convolution's
        weights and bias, and on CPU and CUDA the weights are laid out channels-last (oneDNN /
        cuDNN's fast path). On the shipped encoder this makes CPU inference about 2.5x faster;
        embeddings differ from :attr:`network`'s by float rounding (about 1e-7, tested). The copy
        is rebuilt when a parameter or buffer of :attr:`network` changes (training, loading
        weights), so embedding during fine-tuning sees the current weights.
        """
        tensors = [*self.network.parameters(), *self.network.buffers()]
        key = tuple((t.data_ptr(), getattr(t, "_version", None)) for t in tensors)
        if self._inference is None or self._inference[0] != key:
            self._inference = (key, optimise_for_inference(self.network, self.device))
        return self._inference[1]

    @property
    def input_size(self) -> int:
        return self.metadata.input_size

    @property
    def provider(self) -> str:
        """What runs the network: ``torch`` and the device (for the runtime interface)."""
        return f"torch {self.device}"

    @property
    def embedding_dim(self) -> int:
        return self.metadata.embedding_dim

    def to_tensor(self, patches: np.ndarray):
        """Normalise ``(N, S, S)`` patches in [0, 1] into an ``(N, 1, S, S)`` tensor on the CPU."""
        torch = _torch()
        x = normalise_patches(patches, self.metadata.normalisation)
        return torch.from_numpy(np.ascontiguousarray(x[:, None]))

    def embed_tensor(self, x):
        """Embed an already normalised ``(N, 1, S, S)`` tensor; returns ``(N, D)`` float32 numpy.

        On CPU the network takes :data:`CPU_CHUNK` patches at a time: as fast as whole batches
        (faster, at times: the activations stay in cache), and each pass's activations are a
        fraction as large. With batches of 128 the freed activations of several threads left
        ~250 MB in the C allocator's arenas on a long search; in chunks of 32, ~100 MB.
        """
        torch = _torch()
        with torch.inference_mode():
            net = self.inference_network
            if self.device.type == "cpu" and len(x) > CPU_CHUNK:
                out = np.empty((len(x), self.embedding_dim), dtype=np.float32)
                for a in range(0, len(x), CPU_CHUNK):
                    out[a:a + CPU_CHUNK] = net(x[a:a + CPU_CHUNK]).float().numpy()
                return out
            if self.device.type == "cuda":
                x = x.pin_memory().to(self.device, non_blocking=True)
            else:
                x = x.to(self.device)
            return net(x).float().cpu().numpy()

    def embed_normalised(self, x: np.ndarray) -> np.ndarray:
        """Embed already normalised float32 patches, numpy ``(N, 1, S, S)`` or ``(N, S, S)``;
        returns ``(N, D)`` float32 (the runtime interface's name for :meth:`embed_tensor`)."""
        torch = _torch()
        x = np.ascontiguousarray(x, dtype=np.float32)
        return self.embed_tensor(torch.from_numpy(x if x.ndim == 4 else x[:, None]))

    def embed(self, patches: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Embed grey patches in [0, 1], ``(N, S, S)``, batch by batch. Returns ``(N, D)`` float32."""
        return embed_in_batches(self, patches, batch_size)

    def describe(self) -> str:
        """A human-readable model card summary."""
        params = sum(p.numel() for p in self.network.parameters())
        return describe_model(self.path, self.metadata, [f"parameters     : {params:,}"],
                              ["runtime        : torch", f"device         : {self.device}"])


def describe_model(path, m: ModelMetadata, after_architecture: list[str], runtime: list[str]) -> str:
    """The lines of ``describe()`` for either runtime: file, architecture, input, embedding size,
    the runtime's own lines, then the description and the training record."""
    lines = [
        f"model file     : {path or '(in memory)'}",
        f"architecture   : {m.architecture} {json.dumps(m.arch_params, sort_keys=True)}",
        *after_architecture,
        f"input          : {m.input_size}x{m.input_size} grey, normalisation {json.dumps(m.normalisation)}",
        f"embedding size : {m.embedding_dim}",
        *runtime,
    ]
    if m.description:
        lines.append(f"description    : {m.description}")
    for key, value in sorted(m.training.items()):
        text = json.dumps(value) if not isinstance(value, str) else value
        lines.append(f"training.{key:<8}: {text}" if len(key) < 8 else f"training.{key}: {text}")
    return "\n".join(lines)


def embed_in_batches(encoder, patches: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Embed grey patches in [0, 1], ``(N, S, S)``, with any runtime's encoder (``to_tensor`` and
    ``embed_tensor``), batch by batch. Returns ``(N, D)`` float32."""
    patches = np.asarray(patches, dtype=np.float32)
    size = encoder.input_size
    if patches.ndim != 3 or patches.shape[1:] != (size, size):
        raise InputError(f"Patches of shape {patches.shape[1:]} were given to an encoder that takes {size}x{size}",
                         "Resample them to the encoder's input size first")
    out = np.empty((len(patches), encoder.embedding_dim), dtype=np.float32)
    for start in range(0, len(patches), batch_size):
        chunk = patches[start:start + batch_size]
        out[start:start + len(chunk)] = encoder.embed_tensor(encoder.to_tensor(chunk))
    return out


def save_model(path: str | os.PathLike, network, metadata: ModelMetadata) -> None:
    """Write a model file (atomically: a temporary name, then a rename)."""
    torch = _torch()
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    payload = {"format": FORMAT, "version": FORMAT_VERSION, "metadata": metadata.to_json(), "state_dict": state}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch.save reports I/O failures as RuntimeError
        if tmp.parent.is_dir():
            tmp.unlink(missing_ok=True)
        raise ModelError(f"Cannot write the model file '{path}': {getattr(exc, 'strerror', None) or exc}",
                         "Choose a folder you can write to") from exc


def default_model_path() -> Path:
    """The shipped model: inside the installed plugin, or in the repository's ``models/``."""
    here = Path(__file__).resolve().parent.parent  # the package folder
    for candidate in (here / "models" / DEFAULT_MODEL_NAME, here.parent / "models" / DEFAULT_MODEL_NAME):
        if candidate.exists():
            return candidate
    return here.parent / "models" / DEFAULT_MODEL_NAME


def load_model(path: str | os.PathLike | None = None, device: str | None = "auto") -> AnalogEncoder:
    """Load a model file onto a device.

    Args:
        path: the model file; ``None`` or ``""`` for the shipped default.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    Raises:
        ModelError: missing, corrupt or foreign file, or weights that do not fit the architecture.
        InputError: the device does not exist here.
    """
    from .devices import resolve_device

    torch = _torch()
    path = Path(path) if path else default_model_path()
    if not path.exists():
        raise ModelError(f"The model file '{path}' does not exist",
                         "Check the path, or leave the model empty to use the shipped one")
    if path.is_dir():
        raise ModelError(f"The model path '{path}' is a folder, not a model file", "Give the .pt file itself")
    foreign = ModelError(
        f"'{path}' is not a Siamese Analog Finder model (corrupt, truncated or another kind of file)",
        "Use a model written by the train command, or leave the model empty to use the shipped one")
    try:
        payload = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, pickle with code in it, random bytes...
        raise foreign from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "state_dict" not in payload:
        raise foreign
    if int(payload.get("version", 0)) > FORMAT_VERSION:
        raise ModelError(f"'{path}' was written by a newer version of Siamese Analog Finder "
                         f"(model format {payload.get('version')})", "Update the plugin")
    try:
        metadata = ModelMetadata.from_json(payload["metadata"])
        if not isinstance(metadata.input_size, int) or not 8 <= metadata.input_size <= 4096:
            raise ModelError(f"The model '{path}' says its input patches are {metadata.input_size!r} pixels wide, "
                             "which cannot be", "The file is damaged or was edited; retrain or use the shipped model")
        params = {**metadata.arch_params, "embedding_dim": metadata.embedding_dim}
        network = build_network(metadata.architecture, metadata.input_size, **params)
        network.load_state_dict(payload["state_dict"], strict=True)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"The weights in '{path}' do not match the architecture its metadata describes: {exc}",
                         "The file is damaged or was edited; retrain or use the shipped model") from exc
    return AnalogEncoder(network, metadata, resolve_device(device), str(path))
