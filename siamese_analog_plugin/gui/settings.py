"""Last-used reference and search settings, remembered across sessions with QgsSettings.

Each value is stored as JSON under ``siamese_analog/last/<PARAMETER>`` so its type (list of
files, float, int, string) survives INI round trips, where QSettings would hand back strings.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from qgis.core import QgsSettings

from .parameters import REMEMBERED_PARAMETERS

__all__ = ["SETTINGS_PREFIX", "load_last_used", "save_last_used", "clear_last_used"]

SETTINGS_PREFIX = "siamese_analog/"
_LAST = SETTINGS_PREFIX + "last/"


def _plain(value):
    """``value`` as JSON-able plain data, or ``None`` when it is not worth remembering."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return items if all(i is not None for i in items) else None
    return None  # layer objects, output definitions...: nothing to remember


def save_last_used(parameters: Mapping[str, object], settings: QgsSettings | None = None) -> dict:
    """Remember the reference and settings of ``parameters``; return what was stored."""
    settings = settings or QgsSettings()
    stored = {}
    for key in REMEMBERED_PARAMETERS:
        if key not in parameters:
            continue
        value = _plain(parameters[key])
        if value is None or value == "" or value == []:
            continue
        settings.setValue(_LAST + key, json.dumps(value))
        stored[key] = value
    return stored


def load_last_used(settings: QgsSettings | None = None) -> dict:
    """The remembered parameters (only those that were stored and still parse)."""
    settings = settings or QgsSettings()
    out = {}
    for key in REMEMBERED_PARAMETERS:
        raw = settings.value(_LAST + key, None)
        if raw in (None, ""):
            continue
        try:
            out[key] = json.loads(raw)
        except (TypeError, ValueError):
            continue  # written by something else: ignore rather than break the tool
    return out


def clear_last_used(settings: QgsSettings | None = None) -> None:
    """Forget every remembered value."""
    settings = settings or QgsSettings()
    settings.remove(SETTINGS_PREFIX + "last")
