#!/usr/bin/env bash
# Installs CPU libtorch 2.11.0 (the exact version tch 0.24.0 binds) from the PyPI wheels
# into .deps/libtorch. Idempotent: a second run checks the stamp and does nothing.
# Only the CPU libraries are unpacked; CUDA is loaded at run time from a CUDA torch
# on LD_LIBRARY_PATH (see src/device.rs), so one binary serves both.
source "$(dirname "$0")/common.sh"

VERSION=2.11.0
DEST="$DEPS/libtorch"
STAMP="$DEST/.dlsr-stamp"
STAMP_TEXT="torch-$VERSION cpu r1"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STAMP_TEXT" ]; then
  log "libtorch $VERSION already in $DEST"; exit 0
fi

torch_whl=$(fetch_wheel torch==$VERSION torch-2.11.0-cp311-cp311-manylinux_2_28_x86_64.whl \
  7aa2f9bbc6d4595ba72138026b2074be1233186150e9292865e04b7a63b8c67a)
# libtorch_cpu.so NEEDs libcudart and libcupti even on CPU.
cudart_whl=$(fetch_wheel nvidia-cuda-runtime==13.0.96 \
  nvidia_cuda_runtime-13.0.96-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl \
  7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548)
cupti_whl=$(fetch_wheel nvidia-cuda-cupti==13.0.85 \
  nvidia_cuda_cupti-13.0.85-py3-none-manylinux_2_25_x86_64.whl \
  4eb01c08e859bf924d222250d2e8f8b8ff6d3db4721288cf35d14252a4d933c8)

log "unpacking into $DEST"
tmp="$(mktemp -d "$DEPS/.libtorch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
python3 - "$torch_whl" "$cudart_whl" "$cupti_whl" "$tmp" <<'PY'
import sys, zipfile, os, shutil
torch_whl, cudart_whl, cupti_whl, out = sys.argv[1:]
os.makedirs(f"{out}/lib"); os.makedirs(f"{out}/include")
libs = {"torch/lib/libtorch_cpu.so", "torch/lib/libc10.so", "torch/lib/libgomp.so.1", "torch/lib/libtorch.so"}
with zipfile.ZipFile(torch_whl) as z:
    for n in z.namelist():
        if n.startswith("torch/include/") and not n.endswith("/"):
            dst = f"{out}/include/{n[len('torch/include/'):]}"
        elif n in libs:
            dst = f"{out}/lib/{os.path.basename(n)}"
        else:
            continue
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with z.open(n) as src, open(dst, "wb") as f:
            shutil.copyfileobj(src, f)
for whl, name in ((cudart_whl, "libcudart.so.13"), (cupti_whl, "libcupti.so.13")):
    with zipfile.ZipFile(whl) as z:
        hits = [n for n in z.namelist() if n.endswith("/" + name)]
        if not hits:
            sys.exit(f"{whl}: no {name}")
        with z.open(hits[0]) as src, open(f"{out}/lib/{name}", "wb") as f:
            shutil.copyfileobj(src, f)
PY
echo "$VERSION" > "$tmp/build-version"
rm -rf "$DEST"
mv "$tmp" "$DEST"
trap - EXIT
echo "$STAMP_TEXT" > "$STAMP"
log "libtorch $VERSION ready in $DEST ($(du -sh "$DEST" | cut -f1))"
