"""Numeric options of every command, checked once, here, as argparse types.

A bad number (``--batch-size -5``, ``--cell-size 0``, ``--min-coverage 2``) stops the command
before anything is read, with one line naming the option, the value and what it takes.
"""

from __future__ import annotations

import argparse
import math

__all__ = [
    "add_model_args",
    "OneLineParser",
    "positive_int",
    "non_negative_int",
    "positive_float",
    "non_negative_float",
    "fraction",
    "share_below_one",
    "any_int",
]


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``error: ...``, exit code 2), not the usage."""

    def error(self, message: str):  # noqa: D102
        message = message.rstrip(".")
        self.exit(2, f"error: {message}. See '{self.prog} --help'.\n")


def _number(text: str, kind, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not {what}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"'{text}' is not {what}")
    return value


def positive_int(text: str) -> int:
    """An integer of at least 1 (batch sizes, counts)."""
    value = _number(text, int, "a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: give a whole number of at least 1")
    return value


def non_negative_int(text: str) -> int:
    """An integer of at least 0 (steps, where 0 means none)."""
    value = _number(text, int, "a whole number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: give a whole number of 0 or more")
    return value


def any_int(text: str) -> int:
    """Any integer (seeds)."""
    return _number(text, int, "a whole number")


def positive_float(text: str) -> float:
    """A finite number above 0 (sizes in metres, learning rates, scales)."""
    value = _number(text, float, "a number")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value:g} is not allowed: give a number above 0")
    return value


def non_negative_float(text: str) -> float:
    """A finite number of at least 0 (weights, where 0 switches a term off)."""
    value = _number(text, float, "a number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value:g} is not allowed: give a number of 0 or more")
    return value


def fraction(text: str) -> float:
    """A share in [0, 1] (coverage)."""
    value = _number(text, float, "a number")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value:g} is not allowed: give a share from 0 to 1")
    return value


def share_below_one(text: str) -> float:
    """A share in [0, 1) (the largest nodata share, a held-out share)."""
    value = _number(text, float, "a number")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{value:g} is not allowed: give a share from 0 up to (not including) 1")
    return value


def add_model_args(p, what: str = "cells", default_model: str = "the shipped model") -> None:
    """The encoder's options, the same on every command that encodes: --model, --device,
    --batch-size (``what`` are encoded together) and --runtime."""
    p.add_argument("--model", default=None,
                   help=f"model file, .onnx or .pt (default: {default_model}, .onnx for the onnx runtime)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default: auto)")
    p.add_argument("--batch-size", type=positive_int, default=128, help=f"{what} encoded together (default: 128)")
    p.add_argument("--runtime", default="auto", choices=("auto", "onnx", "torch"),
                   help="inference runtime: onnx (ONNX Runtime, .onnx model), torch (.pt model) or auto (onnx when "
                        "onnxruntime and an .onnx model are there, else torch; default)")
