"""Exporting a ``.pt`` model to ONNX, for the onnx runtime (:mod:`..engine.runtime`).

The exported network is the inference copy (:func:`~..engine.encoder.optimise_for_inference`):
every batch norm that follows a convolution folded into it, the pooled standard deviations in
two passes; torch's ``MaxPool2d`` is kept (the four-view trick is a torch CPU speed-up; ONNX
Runtime's pooling is fast). The batch axis is dynamic. The model's
:class:`~..engine.encoder.ModelMetadata` goes into the file's ``metadata_props`` as JSON (a
step-2 model's cosine classifier with it), with the SHA-256 of the ``.pt`` it came from.

Export needs torch and the ``onnx`` package (torch's TorchScript exporter serialises through
it); running the exported file needs only ``onnxruntime``. Each export is checked: ONNX
Runtime's embeddings must equal torch's to :data:`PARITY_TOLERANCE`.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np

from ..engine.encoder import FORMAT, FORMAT_VERSION, AnalogEncoder, load_model, optimise_for_inference
from ..engine.errors import ModelError
from ..engine.runtime import (
    ONNX_FORMAT_KEY,
    ONNX_INPUT,
    ONNX_METADATA_KEY,
    ONNX_OUTPUT,
    ONNX_SOURCE_KEY,
    ONNX_VERSION_KEY,
)

__all__ = ["export_onnx", "onnx_beside", "PARITY_TOLERANCE", "OPSET"]

PARITY_TOLERANCE = 1e-5
OPSET = 17


def _onnx():
    try:
        import onnx
    except ImportError as exc:
        raise ModelError("The onnx package is not installed, and exporting a model to ONNX needs it",
                         "Install it with: pip install onnx (see requirements.txt for the version)") from exc
    return onnx


def _parity_patches(size: int, n: int = 64, seed: int = 0) -> np.ndarray:
    """Normalised test patches: noise, smooth gradients and flat patches (edge cases of the std)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 1, size, size)).astype(np.float32)
    ramp = np.linspace(-1.7, 1.7, size, dtype=np.float32)
    x[n // 2:n // 2 + 4, 0] = ramp[None, :, None] * rng.uniform(0.5, 2.0, (4, 1, 1)).astype(np.float32)
    x[-2:] = 0.0
    return x


def export_onnx(model: str | os.PathLike | AnalogEncoder, out: str | os.PathLike, check: bool = True) -> dict:
    """Write ``out`` (.onnx) from a ``.pt`` model file (or a loaded torch encoder).

    Returns:
        ``{"path", "max_abs_diff", "patches"}``: where it went and ONNX Runtime's largest
        embedding difference from torch's on the parity patches (``None`` when not checked).

    Raises:
        ModelError: torch or onnx missing, an unreadable model, or embeddings that differ by
            more than :data:`PARITY_TOLERANCE` (nothing is written then).
    """
    from ..engine.embeddings import file_sha256

    onnx = _onnx()
    encoder = model if isinstance(model, AnalogEncoder) else load_model(model, "cpu")
    import torch

    out = Path(out)
    meta = encoder.metadata
    net = optimise_for_inference(encoder.network, torch.device("cpu"), pool_views=False).cpu()
    net = net.to(memory_format=torch.contiguous_format)
    example = torch.zeros(2, 1, meta.input_size, meta.input_size)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(net, (example,), buf, dynamo=False, input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                          dynamic_axes={ONNX_INPUT: {0: "cells"}, ONNX_OUTPUT: {0: "cells"}}, opset_version=OPSET,
                          do_constant_folding=True)
    proto = onnx.load_model_from_string(buf.getvalue())
    props = {ONNX_FORMAT_KEY: FORMAT, ONNX_VERSION_KEY: str(FORMAT_VERSION), ONNX_METADATA_KEY: meta.to_json()}
    if encoder.path and os.path.isfile(encoder.path):
        props[ONNX_SOURCE_KEY] = file_sha256(encoder.path)
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = meta.description or "Siamese Analog Finder encoder"
    proto.producer_name = "siamese-analog-finder"
    data = proto.SerializeToString()

    diff = None
    x = _parity_patches(meta.input_size)
    if check:
        from ..engine.runtime import OnnxDevice, _open_session

        session = _open_session(data, OnnxDevice(), 1)[0]
        got = session.run([ONNX_OUTPUT], {ONNX_INPUT: x})[0]
        cpu = encoder if encoder.device.type == "cpu" else AnalogEncoder(encoder.network, meta,
                                                                          torch.device("cpu"), encoder.path)
        want = cpu.embed_normalised(x)
        diff = float(np.abs(got - want).max())
        if not diff <= PARITY_TOLERANCE:
            raise ModelError(f"The ONNX export of '{encoder.path or 'the model'}' embeds differently from torch "
                             f"(largest difference {diff:.2e}, more than {PARITY_TOLERANCE:g})",
                             "Report this with the model file; use --runtime torch meanwhile")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ModelError(f"Cannot write the ONNX file '{out}': {exc.strerror or exc}",
                         "Choose a folder you can write to") from exc
    return {"path": str(out), "max_abs_diff": diff, "patches": len(x)}


def onnx_beside(pt_path: str | os.PathLike, log=None) -> str | None:
    """Export ``M.pt`` to ``M.onnx`` beside it (what ``train`` and ``transfer`` do after saving).

    Without the ``onnx`` package the export is skipped and ``log`` says how to get it.
    """
    pt = Path(pt_path)
    try:
        _onnx()
    except ModelError as exc:
        if log:
            log(f"No ONNX copy written beside {pt.name}: {exc}")
        return None
    done = export_onnx(pt, pt.with_suffix(".onnx"))
    if log:
        log(f"Wrote {done['path']} (ONNX; embeddings within {done['max_abs_diff']:.1e} of torch's)")
    return done["path"]
