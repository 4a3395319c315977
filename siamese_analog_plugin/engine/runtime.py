"""The inference runtime: which library turns normalised patches into embeddings.

Two runtimes sit behind one interface:

* ``onnx``: ONNX Runtime on an ``.onnx`` model file (~80 MB of library, no torch). The model's
  :class:`~.encoder.ModelMetadata` travels inside the file, as JSON in the ONNX
  ``metadata_props``; opening it runs no code from the file.
* ``torch``: :class:`~.encoder.AnalogEncoder` on a ``.pt`` model file (the training side's
  format; torch is ~750 MB).

:func:`load_runtime` picks one (``auto``: ONNX Runtime when it is importable and an ``.onnx``
model is there, else torch) and returns an object with the same small interface:

* ``metadata`` (:class:`~.encoder.ModelMetadata`), ``path``, ``input_size``, ``embedding_dim``;
* ``runtime`` (``"onnx"`` or ``"torch"``), ``device`` (``.type`` is ``"cpu"`` or ``"cuda"``...;
  ``str()`` gives ``cpu``, ``cuda:0``), ``provider`` (the execution provider actually used);
* ``embed(patches)``: grey ``(N, S, S)`` patches in [0, 1], normalised as the model says;
* ``to_tensor(patches)`` then ``embed_tensor(x)``: the search's two steps (normalise, then
  embed an ``(N, 1, S, S)`` batch already normalised); ``embed_normalised(x)`` takes numpy
  ``(N, 1, S, S)`` or ``(N, S, S)`` float32 already normalised;
* ``describe()``: the model card and where it runs.

Importing this module, and loading or running an ONNX model, never imports torch.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .encoder import (
    CPU_CHUNK,
    DEFAULT_MODEL_NAME,
    FORMAT,
    FORMAT_VERSION,
    ModelMetadata,
    describe_model,
    embed_in_batches,
    normalise_patches,
)
from .errors import InputError, ModelError

__all__ = [
    "RUNTIMES",
    "ONNX_METADATA_KEY",
    "ONNX_FORMAT_KEY",
    "ONNX_VERSION_KEY",
    "ONNX_SOURCE_KEY",
    "OnnxDevice",
    "OnnxEncoder",
    "OnnxThreads",
    "load_runtime",
    "choose_runtime",
    "default_model_path",
    "onnxruntime_available",
    "torch_available",
]

RUNTIMES = ("auto", "onnx", "torch")
# Keys of the ONNX metadata_props a model file carries.
ONNX_FORMAT_KEY = "siamese_analog_finder.format"
ONNX_VERSION_KEY = "siamese_analog_finder.version"
ONNX_METADATA_KEY = "siamese_analog_finder.metadata"  # ModelMetadata as JSON
ONNX_SOURCE_KEY = "siamese_analog_finder.source_sha256"  # SHA-256 of the .pt it was exported from
ONNX_INPUT = "patches"
ONNX_OUTPUT = "embeddings"

_EXPORT_FIX = "Export it from its .pt file with: python -m siamese_analog_plugin export-onnx --model M.pt --out M.onnx"


@functools.cache
def _ort():
    try:
        import onnxruntime
    except ImportError as exc:
        raise ModelError("ONNX Runtime is not installed, and the onnx runtime needs it",
                         "Install it with: pip install onnxruntime, or use --runtime torch") from exc
    return onnxruntime


def onnxruntime_available() -> bool:
    """Whether ``onnxruntime`` can be imported here."""
    try:
        _ort()
    except ModelError:
        return False
    return True


def torch_available() -> bool:
    """Whether torch is installed (found, not imported: importing it costs seconds)."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # blocked, or a stub without a spec
        return False


def _ort_has_cuda() -> bool:
    return onnxruntime_available() and "CUDAExecutionProvider" in _ort().get_available_providers()


def _nvidia_gpu_present() -> bool:
    """A cheap look for an NVIDIA GPU (the driver's files), before importing torch to ask."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or Path("/dev/nvidia0").exists()


def default_model_path(runtime: str = "onnx") -> Path:
    """The shipped model for a runtime: ``siamese_compact.onnx`` (onnx) or ``.pt`` (torch),
    inside the installed plugin or in the repository's ``models/``."""
    name = DEFAULT_MODEL_NAME if runtime == "torch" else Path(DEFAULT_MODEL_NAME).with_suffix(".onnx").name
    here = Path(__file__).resolve().parent.parent  # the package folder
    for candidate in (here / "models" / name, here.parent / "models" / name):
        if candidate.exists():
            return candidate
    return here.parent / "models" / name


def _is_onnx(path: Path) -> bool:
    return path.suffix.lower() == ".onnx"


def choose_runtime(model: str | os.PathLike | None, runtime: str | None = "auto",
                   device: str | None = "auto") -> tuple[str, Path]:
    """Which runtime runs which model file.

    ``auto``: a ``.onnx`` file runs on ONNX Runtime, a ``.pt`` file on torch (on ONNX Runtime
    when torch is missing and an ``.onnx`` file of the same name lies beside it). Without a
    model: the shipped ``.onnx`` on ONNX Runtime when it is importable, unless the device asked
    for is one only torch reaches here (``mps``; a CUDA GPU when this ONNX Runtime has no CUDA
    provider and torch sees one), else the shipped ``.pt`` on torch. ``onnx`` / ``torch``: that
    runtime; a model of the other kind is swapped for its sibling file (``M.pt`` <-> ``M.onnx``).

    Returns:
        ``(runtime, model_path)``.

    Raises:
        InputError: an unknown runtime name.
        ModelError: the runtime cannot run that model (and no sibling file is there).
    """
    name = (runtime or "auto").strip().lower()
    if name not in RUNTIMES:
        raise InputError(f"Unknown runtime '{runtime}'", "Choose one of auto, onnx or torch")
    path = Path(model) if model else None
    dev = (device or "auto").strip().lower()
    if name == "auto":
        name = _auto_runtime(path, dev)
    if path is None:
        return name, default_model_path(name)
    if name == "onnx" and not _is_onnx(path):
        sibling = path.with_suffix(".onnx")
        if not sibling.exists():
            raise ModelError(f"'{path}' is a torch model file and the onnx runtime needs an .onnx file",
                             f"{_EXPORT_FIX.replace('M.pt', str(path)).replace('M.onnx', str(sibling))}, "
                             "or use --runtime torch")
        _check_sibling(path, sibling)
        return name, sibling
    if name == "torch" and _is_onnx(path):
        sibling = path.with_suffix(".pt")
        if not sibling.exists():
            raise ModelError(f"'{path}' is an ONNX model file and the torch runtime needs the .pt file it was "
                             "exported from", "Give the .pt file, or use --runtime onnx")
        return name, sibling
    return name, path


def _auto_runtime(path: Path | None, device: str) -> str:
    if path is not None:
        if _is_onnx(path):
            return "onnx"
        if not torch_available() and onnxruntime_available() and path.with_suffix(".onnx").exists():
            return "onnx"
        return "torch"
    if not onnxruntime_available() or not default_model_path("onnx").exists():
        return "torch"
    if not torch_available():
        return "onnx"
    if device == "mps":
        return "torch"
    if device.startswith("cuda") and not _ort_has_cuda():
        return "torch"
    if device == "auto" and not _ort_has_cuda() and _nvidia_gpu_present():
        import torch  # a GPU is there: torch may reach it where this ONNX Runtime cannot

        if torch.cuda.is_available():
            return "torch"
    return "onnx"


def _check_sibling(pt: Path, onnx: Path) -> None:
    """An .onnx used for a .pt must have been exported from that very .pt (when it says so)."""
    from .embeddings import file_sha256

    source = read_onnx_properties(onnx).get(ONNX_SOURCE_KEY)
    if source and pt.exists() and source != file_sha256(pt):
        raise ModelError(f"'{onnx}' was exported from another version of '{pt}' (its weights changed since)",
                         _EXPORT_FIX.replace("M.pt", str(pt)).replace("M.onnx", str(onnx)))


def load_runtime(model: str | os.PathLike | None = None, runtime: str | None = "auto", device: str | None = "auto",
                 threads: int | None = None):
    """Load a model file on a runtime and device.

    Args:
        model: ``.onnx`` or ``.pt`` file; ``None`` or ``""`` for the shipped model.
        runtime: ``auto``, ``onnx`` or ``torch`` (see :func:`choose_runtime`).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (torch only).
        threads: CPU threads of one ONNX Runtime call (``None``: one per core).

    Returns:
        An :class:`OnnxEncoder` or an :class:`~.encoder.AnalogEncoder`.

    Raises:
        ModelError, InputError: named with their fix.
    """
    name, path = choose_runtime(model, runtime, device)
    if name == "torch":
        from .encoder import load_model

        return load_model(path, device)
    return OnnxEncoder.load(path, device, threads)


# -- ONNX Runtime ---------------------------------------------------------------------------
@dataclass(frozen=True)
class OnnxDevice:
    """Where ONNX Runtime runs: ``type`` ``cpu`` or ``cuda`` (as ``torch.device.type``), the
    GPU ``index``, and the execution ``provider`` actually used."""

    type: str = "cpu"
    index: int | None = None
    provider: str = "CPUExecutionProvider"
    note: str = ""  # why it is not the device asked for, when it is not

    def __str__(self) -> str:
        return "cpu" if self.type == "cpu" else f"{self.type}:{self.index or 0}"

    def describe(self) -> str:
        """The device in words for the log."""
        return f"{self} (onnxruntime {self.provider}{'; ' + self.note if self.note else ''})"


def resolve_onnx_device(name: str | None = "auto") -> OnnxDevice:
    """Turn a user's device name into what ONNX Runtime can use here.

    Raises:
        InputError: the device is unknown, or this ONNX Runtime cannot reach it.
    """
    name = (name or "auto").strip().lower()
    cuda = _ort_has_cuda()
    if name == "auto":
        return OnnxDevice("cuda", 0, "CUDAExecutionProvider") if cuda else OnnxDevice()
    if name == "cpu":
        return OnnxDevice()
    if name == "mps":
        raise InputError("Device 'mps' (Apple GPU) is not available with the onnx runtime",
                         "Use --runtime torch for the Apple GPU, or --device cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not cuda:
            raise InputError(f"Device '{name}' was asked for but this ONNX Runtime has no CUDA provider",
                             "Install onnxruntime-gpu, use --runtime torch, or use --device cpu")
        from .devices import cuda_index

        return OnnxDevice("cuda", cuda_index(name), "CUDAExecutionProvider")
    raise InputError(f"Unknown device '{name}'", "Choose one of auto, cpu, cuda, cuda:N or mps")


def read_onnx_properties(path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (through ONNX Runtime: no code runs).

    Raises:
        ModelError: missing, unreadable or not an ONNX model.
    """
    return dict(_open_session(Path(path), OnnxDevice(), 1)[0].get_modelmeta().custom_metadata_map)


def _session_options(threads: int | None):
    ort = _ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = max(0, int(threads or 0))  # 0: one per physical core
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only: ORT's warnings are about its own graph rewrites
    if threads != 1:
        # Threads that wait for work do not spin: the reader threads need those cores.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def _open_session(path: Path | bytes, device: OnnxDevice, threads: int | None):
    """An InferenceSession of ``path`` (or the model's bytes) and the device it really got."""
    ort = _ort()
    if isinstance(path, Path):
        if not path.exists():
            raise ModelError(f"The model file '{path}' does not exist",
                             "Check the path, or leave the model empty to use the shipped one")
        if path.is_dir():
            raise ModelError(f"The model path '{path}' is a folder, not a model file", "Give the .onnx file itself")
    providers: list = ["CPUExecutionProvider"]
    if device.type == "cuda":
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(device.index or 0)}))
    try:
        session = ort.InferenceSession(str(path) if isinstance(path, Path) else path,
                                       _session_options(threads), providers=providers)
    except Exception as exc:  # protobuf parse errors, unknown operators, a CUDA that fails to start...
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"'{path if isinstance(path, Path) else 'the model'}' cannot be opened as an ONNX model "
                         f"({first})", "Use an .onnx file written by export-onnx, train or transfer, or leave the "
                                       "model empty to use the shipped one") from exc
    used = session.get_providers()[0]
    if used != device.provider:  # asked for CUDA, CUDA's libraries failed to load: ORT fell back
        device = OnnxDevice(note=f"{device} was asked for, but ONNX Runtime's {device.provider} did not start "
                                 "(CUDA or cuDNN libraries missing?); --runtime torch may reach the GPU")
    return session, device


def _parse_metadata(props: dict[str, str], path) -> ModelMetadata:
    fix = _EXPORT_FIX
    if props.get(ONNX_FORMAT_KEY) != FORMAT or ONNX_METADATA_KEY not in props:
        raise ModelError(f"'{path}' is an ONNX model without Siamese Analog Finder metadata", fix)
    try:
        version = int(props.get(ONNX_VERSION_KEY, "1"))
    except ValueError:
        raise ModelError(f"'{path}' has a damaged model format version in its metadata", fix) from None
    if version > FORMAT_VERSION:
        raise ModelError(f"'{path}' was written by a newer version of Siamese Analog Finder (model format {version})",
                         "Update the plugin")
    try:
        data = json.loads(props[ONNX_METADATA_KEY])
        if not isinstance(data, dict) or not isinstance(data.get("architecture"), str):
            raise ValueError("no architecture")
        meta = ModelMetadata.from_json(props[ONNX_METADATA_KEY])
        meta.input_size, meta.embedding_dim = int(meta.input_size), int(meta.embedding_dim)
        if not isinstance(meta.normalisation, dict) or not isinstance(meta.training, dict):
            raise ValueError("normalisation or training is not an object")
    except (ValueError, TypeError) as exc:
        raise ModelError(f"The metadata in '{path}' is damaged ({exc})", fix) from exc
    return meta


class OnnxThreads:
    """How ONNX Runtime uses the CPU during a search (the counterpart of the search's torch plan).

    ``workers`` threads each run batches on a session of ``per_worker`` intra-op threads: with
    one intra-op thread (the case up to 4 cores) all share one session, whose ``run`` is
    thread-safe and runs in the caller's thread; with more, each worker has its own session, so
    their thread pools do not wait on one another (as each torch worker has its own OpenMP
    threads). On CUDA one thread feeds the device.
    """

    MAX_WORKERS = 4

    def __init__(self, encoder: OnnxEncoder, total: int | None, workers: int | None = None) -> None:
        cores = os.cpu_count() or 1
        total = max(1, int(total or cores))
        if encoder.device.type != "cpu":
            self.workers, self.per_worker = 1, total
        else:
            self.workers = max(1, min(int(workers or encoder.search_workers or total), self.MAX_WORKERS, total))
            self.per_worker = max(1, total // self.workers)
        self._encoder = encoder
        self._encoder.session(self.per_worker)  # made once here, not by the workers at once
        self._slots = iter(range(1 << 30))
        self._lock = threading.Lock()

    def enter_worker(self) -> None:
        """Run in each encoder thread first: its calls use a session of ``per_worker`` threads
        (shared when that is one thread, its own otherwise)."""
        local = self._encoder._local
        local.threads = self.per_worker
        if self.per_worker > 1:
            with self._lock:
                local.slot = next(self._slots)

    def describe(self) -> str:
        if self.workers == 1:
            return f"1 thread ({self.per_worker} onnxruntime thread(s))"
        sessions = "one session" if self.per_worker == 1 else "a session each"
        return f"{self.workers} threads of {self.per_worker} onnxruntime thread(s) each, {sessions}"

    def restore(self) -> None:
        self._encoder._local.threads = None
        self._encoder._local.slot = 0


class OnnxEncoder:
    """A loaded ``.onnx`` encoder on ONNX Runtime (the same interface as
    :class:`~.encoder.AnalogEncoder` for inference; see the module docstring).

    Sessions are made per intra-op thread count, on demand, from the model bytes held in memory
    (the shipped model is ~1 MB): the search's encoder threads share one session of one
    thread each, other calls use one of ``threads`` (one per core by default).
    """

    runtime = "onnx"
    # Encoder threads of a CPU search (None: one per core, up to OnnxThreads.MAX_WORKERS).
    search_workers: int | None = None

    def __init__(self, model_bytes: bytes, metadata: ModelMetadata, device: OnnxDevice, path: str | None = None,
                 threads: int | None = None, properties: dict | None = None) -> None:
        self._bytes = model_bytes
        self.metadata = metadata
        self.device = device
        self.path = path
        self.threads = threads
        self.properties = dict(properties or {})
        self._sessions: dict = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | None = "auto", threads: int | None = None) -> OnnxEncoder:
        """Open an ``.onnx`` model file; its metadata comes from the file's ``metadata_props``.

        Raises:
            ModelError: missing, corrupt or foreign file, missing or damaged metadata, or a
                network whose input or output does not match its metadata.
            InputError: the device is not available to ONNX Runtime here.
        """
        path = Path(path)
        dev = resolve_onnx_device(device)
        session, dev = _open_session(path, dev, threads)
        meta = _parse_metadata(dict(session.get_modelmeta().custom_metadata_map), path)
        inputs, outputs = session.get_inputs(), session.get_outputs()
        shape_in = list(inputs[0].shape) if len(inputs) == 1 else None
        shape_out = list(outputs[0].shape) if outputs else None
        if shape_in is None or len(shape_in) != 4 or shape_in[1:] != [1, meta.input_size, meta.input_size] or \
                shape_out is None or len(shape_out) != 2 or shape_out[1] != meta.embedding_dim:
            raise ModelError(f"The network in '{path}' (input {shape_in}, output {shape_out}) does not match its "
                             f"metadata ({meta.input_size}x{meta.input_size} grey patches, {meta.embedding_dim}-d "
                             "embeddings)", _EXPORT_FIX)
        enc = cls(path.read_bytes(), meta, dev, str(path), threads,
                  dict(session.get_modelmeta().custom_metadata_map))
        enc._sessions[(threads or 0, 0)] = session
        return enc

    # -- the interface ----------------------------------------------------------------------
    @property
    def input_size(self) -> int:
        return self.metadata.input_size

    @property
    def embedding_dim(self) -> int:
        return self.metadata.embedding_dim

    @property
    def provider(self) -> str:
        return self.device.provider

    @property
    def model_bytes(self) -> bytes:
        return self._bytes

    def session(self, threads: int | None = None):
        """The InferenceSession of ``threads`` intra-op threads (``None``: this thread's, else
        :attr:`threads`) and of this thread's slot (a search worker's own session), made on
        first use."""
        if threads is None:
            threads = getattr(self._local, "threads", None) or self.threads
        key = (int(threads or 0), getattr(self._local, "slot", 0))
        session = self._sessions.get(key)
        if session is None:
            with self._lock:
                session = self._sessions.get(key)
                if session is None:
                    session = self._sessions[key] = _open_session(self._bytes, self.device, key[0])[0]
        return session

    def thread_plan(self, total: int | None = None, workers: int | None = None) -> OnnxThreads:
        """How a search runs the encoder on ``total`` CPU threads (see :class:`OnnxThreads`)."""
        return OnnxThreads(self, total, workers)

    def to_tensor(self, patches: np.ndarray) -> np.ndarray:
        """Normalise ``(N, S, S)`` patches in [0, 1] into a new ``(N, 1, S, S)`` float32 array."""
        x = normalise_patches(patches, self.metadata.normalisation)
        return np.ascontiguousarray(x.reshape(len(x), 1, *x.shape[-2:]))

    def embed_tensor(self, x) -> np.ndarray:
        """Embed a normalised ``(N, 1, S, S)`` (or ``(N, S, S)``) float32 array: ``(N, D)`` float32.

        On CPU it runs :data:`~.encoder.CPU_CHUNK` patches at a time, as the torch runtime does.
        """
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 3:
            x = x[:, None]
        x = np.ascontiguousarray(x)
        session = self.session()
        if self.device.type == "cpu" and len(x) > CPU_CHUNK:
            out = np.empty((len(x), self.embedding_dim), dtype=np.float32)
            for a in range(0, len(x), CPU_CHUNK):
                out[a:a + CPU_CHUNK] = session.run([ONNX_OUTPUT], {ONNX_INPUT: x[a:a + CPU_CHUNK]})[0]
            return out
        return np.asarray(session.run([ONNX_OUTPUT], {ONNX_INPUT: x})[0], dtype=np.float32)

    embed_normalised = embed_tensor

    def embed(self, patches: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Embed grey patches in [0, 1], ``(N, S, S)``, batch by batch. Returns ``(N, D)`` float32."""
        return embed_in_batches(self, patches, batch_size)

    def describe(self) -> str:
        """A human-readable model card summary."""
        source = self.properties.get(ONNX_SOURCE_KEY)
        return describe_model(self.path, self.metadata, [],
                              [f"runtime        : onnxruntime {_ort().__version__}",
                               f"device         : {self.device.describe()}",
                               *([f"exported from  : .pt file with SHA-256 {source}"] if source else [])])
