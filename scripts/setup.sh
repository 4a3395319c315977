#!/usr/bin/env bash
# One-step set-up and run on Debian 12 (as root), then `make TARGET`.
#   bash scripts/setup.sh demo   # the search on the shipped sample data
#   bash scripts/setup.sh test   # the tests
# Installs only what is missing, so a second run starts at once.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES="python3-qgis qgis-providers python3-gdal python3-rasterio python3-shapely python3-pyproj \
python3-matplotlib python3-pil python3-venv python3-pip make zip"

missing=""
for p in $APT_PACKAGES; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "Installing Debian packages:$missing"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
fi

# A venv that sees Debian's QGIS, GDAL, rasterio, shapely, pyproj and numpy (never pip wheels of
# those: their bundled GDAL/PROJ would clash with QGIS's), plus the pinned CPU torch.
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
  echo "$want" > "$stamp"
fi

if [ $# -gt 0 ]; then
  exec make "$@"
fi
