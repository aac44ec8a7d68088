#!/usr/bin/env bash
# Takes the README's picture of an audit report (docs/audit-report.png) with headless
# Chromium: the top of REPORT (default: the one scripts/run.sh writes) at 0.6 scale.
#   scripts/audit-screenshot.sh [REPORT.html] [OUT.png]
set -euo pipefail
cd "$(dirname "$0")/.."
report=$(realpath "${1:-runs/demo/audit/report.html}")
out=$(realpath -m "${2:-docs/audit-report.png}")
[ -f "$report" ] || { echo "no report at $report: run scripts/run.sh first" >&2; exit 1; }
chrome=${DLSR_CHROMIUM:-chromium}
command -v "$chrome" >/dev/null || { echo "chromium is missing: run scripts/setup-ops-tools.sh" >&2; exit 1; }
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
# The flags keep Chromium off the network (the report needs none) and off D-Bus.
"$chrome" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync --hide-scrollbars \
  --user-data-dir="$profile" --window-size=1400,1750 --force-device-scale-factor=0.6 \
  --screenshot="$out" "file://$report" 2>/dev/null
echo "wrote $out ($(stat -c %s "$out") bytes)"
