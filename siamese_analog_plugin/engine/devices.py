"""Choosing the torch device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""

from __future__ import annotations

from .errors import InputError

__all__ = ["resolve_device", "available_devices", "DEVICE_CHOICES"]

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")



def cuda_index(name: str, default: int = 0) -> int:
    """The GPU number of a device name ``cuda`` (``default``) or ``cuda:N`` (one-line error if malformed)."""
    if ":" not in name:
        return default
    try:
        return int(name.split(":", 1)[1])
    except ValueError:
        raise InputError(f"Device '{name}' is not a valid CUDA device name",
                         "Write it as cuda or cuda:N with N a GPU number") from None

def available_devices() -> list[str]:
    """List the devices torch can use here, e.g. ``['cpu', 'cuda:0 (NVIDIA H200)']``."""
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            found.append(f"cuda:{i} ({torch.cuda.get_device_name(i)})")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def resolve_device(name: str | None = "auto"):
    """Turn a user's device name into a ``torch.device`` that really exists here.

    Raises:
        InputError: the device is unknown or not present on this machine.
    """
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise InputError("Device 'mps' (Apple GPU) is not available on this machine",
                             "Use --device auto or cpu")
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InputError(f"Device '{name}' was asked for but no CUDA GPU is available here",
                             "Use --device auto (GPU when there is one) or cpu")
        index = cuda_index(name, torch.cuda.current_device())
        if ":" in name:
            if not 0 <= index < torch.cuda.device_count():
                raise InputError(
                    f"Device '{name}' does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s)",
                    f"Use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
        return torch.device("cuda", index)
    raise InputError(f"Unknown device '{name}'",
                     "Choose one of auto, cpu, cuda, cuda:N or mps")
