#!/usr/bin/env bash
# Check the plugin as a new user would, in a real QGIS desktop (Debian 12, as root):
# build the zip, install it into a fresh QGIS profile, start QGIS under Xvfb, and let
# scripts/desktop_check.py click through it: the dependency installer (pip really runs),
# a search on the shipped sample, the drawing tool. Screenshots and a log go to OUT.
#
#     bash scripts/desktop_check.sh [OUT]      # default OUT: out/desktop_check
#
# Needs network access to PyPI (and download.pytorch.org while the plugin still needs torch).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="$(realpath -m "${1:-$ROOT/out/desktop_check}")"
PY="${PY:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3

need=()
command -v qgis >/dev/null || need+=(qgis)
command -v xvfb-run >/dev/null || need+=(xvfb xauth)
command -v convert >/dev/null || need+=(imagemagick)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

rm -rf "$OUT" && mkdir -p "$OUT"
"$PY" "$ROOT/scripts/package.py" --out-dir "$OUT/dist" >/dev/null
ZIP="$(ls "$OUT"/dist/siamese_analog_plugin-*.zip | head -1)"

# A fresh profile with the plugin unzipped as "Install from ZIP" does, and enabled.
PROFILES="$OUT/profiles"
PROFILE="$PROFILES/profiles/check"
mkdir -p "$PROFILE/python/plugins" "$PROFILE/QGIS"
(cd "$PROFILE/python/plugins" && "$PY" -m zipfile -e "$ZIP" .)
cat > "$PROFILE/QGIS/QGIS3.ini" <<EOF
[PythonPlugins]
siamese_analog_plugin=true
processing=true

[qgis]
showTips322=false
checkVersion=false
EOF

export QGIS_DESKTOP_CHECK_OUT="$OUT" QGIS_DESKTOP_CHECK_ROOT="$ROOT"
export PYTHONDONTWRITEBYTECODE=1
unset QT_QPA_PLATFORM PYTHONPATH
set +e
timeout "${DESKTOP_CHECK_TIMEOUT:-1500}" xvfb-run -a -s "-screen 0 1440x900x24" \
    qgis --profiles-path "$PROFILES" --profile check --nologo --noversioncheck \
    --code "$ROOT/scripts/desktop_check.py" >"$OUT/qgis_stdout.log" 2>&1
rc=$?
set -e
[ -f "$OUT/check.json" ] || { echo "QGIS ended (exit $rc) before the check finished; see $OUT/qgis_stdout.log"; exit 1; }
# Small copies for the README (docs/images): the part of the screen that matters, 8-bit colour.
mkdir -p "$OUT/docs"
shrink() { [ -f "$OUT/$1.png" ] && convert "$OUT/$1.png" -crop "$3" +repage -resize '800x>' -colors 128 "$OUT/docs/$2.png"; }
shrink 04_installer_done installer 722x422+349+199 || true
shrink 06_result_map result_map 1140x760+300+140 || true
shrink 07_drawing_tool drawing_tool 1170x770+270+130 || true
shrink 05_find_dialog_default_size find_dialog 720x540+372+155 || true
"$PY" - "$OUT/check.json" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
for step in report["steps"]:
    print(f"{'ok  ' if step['ok'] else 'FAIL'} {step['name']}: {step['detail']}")
sys.exit(0 if all(s["ok"] for s in report["steps"]) else 1)
EOF
