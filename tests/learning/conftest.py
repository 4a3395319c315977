"""The learning side's tests share the engine's fixtures (tiny rasters, a tiny real model)."""

from ..engine.conftest import *  # noqa: F403
