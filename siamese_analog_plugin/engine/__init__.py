"""The engine: rasters, polygons, cells, tensors and files. Nothing below here imports ``qgis``."""

import os as _os

# pyproj from Debian looks for its data under sys.prefix, which a virtual environment moves;
# point it at the system PROJ data when nothing else (QGIS, the user) has set it.
if not (_os.environ.get("PROJ_DATA") or _os.environ.get("PROJ_LIB")):
    for _d in ("/usr/share/proj", "/usr/local/share/proj"):
        if _os.path.exists(_os.path.join(_d, "proj.db")):
            _os.environ["PROJ_DATA"] = _d
            break
