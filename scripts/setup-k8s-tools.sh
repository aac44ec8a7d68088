#!/usr/bin/env bash
# What the Kubernetes tests (tests/dlsr/kubernetes.rs) need:
#   kubectl (its built-in kustomize renders docker/kubernetes/overlays/*): from the
#     machine image; this script only checks for it and says so when it is missing
#   .deps/k8s-venv       kubernetes-validate 1.37.0 (PyPI), the Kubernetes JSON schemas,
#                        every wheel pinned by sha256 in tests/fixtures/k8s-requirements.txt
#   .deps/k8s-schema     the published schemas of the custom resources (ServiceMonitor,
#                        PrometheusRule, ScaledObject) from the kubernetes-models npm
#                        packages, npm ci from docker/kubernetes/schema/package-lock.json
# Idempotent.
source "$(dirname "$0")/common.sh"

if command -v kubectl >/dev/null; then
  log "kubectl present ($(kubectl version --client 2>/dev/null | head -1))"
else
  log "warning: kubectl is missing: the Kubernetes tests will fail saying so (it comes with the machine image; install it from your distribution to run them)"
fi

VENV="$DEPS/k8s-venv"
REQ="$ROOT/tests/fixtures/k8s-requirements.txt"
STAMP="$VENV/.dlsr-stamp"
STAMP_TEXT="$(sha256sum "$REQ" | cut -d' ' -f1) r1"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STAMP_TEXT" ]; then
  log "kubernetes-validate already in $VENV"
else
  log "creating $VENV (kubernetes-validate 1.37.0)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    --cache-dir "$CACHE/pip" --require-hashes -r "$REQ" >&2 || die "pip install of kubernetes-validate failed"
  "$VENV/bin/kubernetes-validate" --version >/dev/null || die "kubernetes-validate does not run"
  echo "$STAMP_TEXT" > "$STAMP"
fi

SCHEMA="$DEPS/k8s-schema"
SRC="$ROOT/docker/kubernetes/schema"
if cmp -s "$SRC/package-lock.json" "$SCHEMA/package-lock.json" && [ -d "$SCHEMA/node_modules/@kubernetes-models/keda" ]; then
  log "custom resource schemas present"
else
  command -v npm >/dev/null || die "npm is needed for the custom resource schemas (scripts/setup-ops-tools.sh installs it)"
  rm -rf "$SCHEMA"; mkdir -p "$SCHEMA"
  cp "$SRC/package.json" "$SRC/package-lock.json" "$SCHEMA/"
  (cd "$SCHEMA" && npm ci --ignore-scripts --no-audit --no-fund >&2) || die "npm ci of the custom resource schemas failed"
  log "custom resource schemas ready in $SCHEMA"
fi
