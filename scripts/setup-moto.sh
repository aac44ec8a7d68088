#!/usr/bin/env bash
# Installs moto's standalone S3-compatible server (moto[server] 5.2.5 from PyPI) into its
# own venv, .deps/moto-venv, every wheel pinned by sha256 in
# tests/fixtures/moto-requirements.txt (pip --require-hashes). The reference tests start
# it themselves on 127.0.0.1 (`moto_server -H 127.0.0.1 -p PORT`). About 30 s. Idempotent.
source "$(dirname "$0")/common.sh"

VENV="$DEPS/moto-venv"
REQ="$ROOT/tests/fixtures/moto-requirements.txt"
STAMP="$VENV/.dlsr-stamp"
STAMP_TEXT="$(sha256sum "$REQ" | cut -d' ' -f1) r1"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STAMP_TEXT" ]; then
  log "moto venv already in $VENV"; exit 0
fi
log "creating $VENV (moto[server] 5.2.5)"
rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
  --cache-dir "$CACHE/pip" --require-hashes -r "$REQ" >&2 || die "pip install of moto failed"
"$VENV/bin/python" -c 'import moto, moto.server; assert moto.__version__ == "5.2.5", moto.__version__' \
  || die "the moto venv does not import"
echo "$STAMP_TEXT" > "$STAMP"
log "moto ready: $VENV/bin/moto_server"
