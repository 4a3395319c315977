"""Errors the engine raises: each names the problem and how to fix it.

Every face (command line, Processing, map tool) shows ``str(error)`` to the user as is,
so messages are full sentences: what is wrong, then what to do about it.
"""

from __future__ import annotations

__all__ = [
    "AnalogFinderError",
    "InputError",
    "ModelError",
    "OutputError",
    "SearchCancelled",
]


class AnalogFinderError(Exception):
    """Base class of every error the engine raises on purpose.

    Args:
        problem: what is wrong, in the user's words.
        fix: what the user can do about it (optional).
    """

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem.rstrip(".")
        self.fix = fix.strip()
        message = _sentence(self.problem)
        if self.fix:
            message += " " + _sentence(self.fix.rstrip("."))
        super().__init__(message)

    def __reduce__(self):
        # Pickled as problem and fix (a Dask task's error reaches the client as the same error).
        return _restore, (type(self), self.problem, self.fix)


def _restore(cls, problem: str, fix: str) -> AnalogFinderError:
    error = cls.__new__(cls)
    AnalogFinderError.__init__(error, problem, fix)
    return error


def _sentence(text: str) -> str:
    """``text`` ended with a full stop, unless it already ends a sentence ("metres?")."""
    return text if text.endswith(("?", "!")) else text + "."


class InputError(AnalogFinderError):
    """Bad user input: a missing file, a polygon off the raster, a silly cell size..."""


class ModelError(AnalogFinderError):
    """A model file that is missing, corrupt, foreign or unusable on the chosen device."""


class OutputError(AnalogFinderError):
    """An output that cannot be written."""


class SearchCancelled(AnalogFinderError):
    """The user cancelled; nothing was written."""

    def __init__(self) -> None:
        super().__init__("The search was cancelled", "Nothing was written")
