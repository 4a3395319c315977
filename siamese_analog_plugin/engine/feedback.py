"""Progress and cancellation, shared by every face.

The engine reports through a :class:`Feedback` object. The command line prints it, the
Processing algorithms forward it to ``QgsProcessingFeedback``, tests record it.
"""

from __future__ import annotations

import sys
import time

from .errors import SearchCancelled

__all__ = ["Feedback", "ConsoleFeedback", "check_cancelled"]


class Feedback:
    """Silent feedback; subclass and override what a face needs.

    ``progress`` receives a fraction in [0, 1]; ``log`` receives a line of text;
    ``cancelled`` is polled between batches and stops the work when it returns True.
    """

    def progress(self, fraction: float, message: str = "") -> None:  # noqa: D401
        """Report progress (0..1) with an optional short message."""

    def log(self, message: str) -> None:
        """Report a line of information (device used, cell count, throughput...)."""

    def cancelled(self) -> bool:
        """Return True when the user asked to stop."""
        return False


class ConsoleFeedback(Feedback):
    """Feedback for the command line: a progress line on stderr, logs on stderr."""

    def __init__(self, stream=None, quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self._last = 0.0
        self._last_pct = -1

    def progress(self, fraction: float, message: str = "") -> None:
        if self.quiet:
            return
        pct = int(round(100 * min(max(fraction, 0.0), 1.0)))
        now = time.monotonic()
        # Throttle: a line every half second or on every new 10 %, always at 100 %.
        if pct == self._last_pct or (now - self._last < 0.5 and pct < 100 and pct // 10 == self._last_pct // 10):
            return
        self._last, self._last_pct = now, pct
        self.stream.write(f"[{pct:3d}%] {message}\n")
        self.stream.flush()

    def log(self, message: str) -> None:
        if not self.quiet:
            self.stream.write(message + "\n")
            self.stream.flush()


def check_cancelled(feedback: Feedback | None) -> None:
    """Raise :class:`SearchCancelled` when the user asked to stop."""
    if feedback is not None and feedback.cancelled():
        raise SearchCancelled()
