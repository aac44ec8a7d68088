# Shared helpers for the setup scripts: pinned, sha256-checked downloads from the
# package registries into a project-local cache. Sourced, never run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEPS="${DLSR_DEPS:-$ROOT/.deps}"
CACHE="$DEPS/cache"
mkdir -p "$CACHE"

log() { printf '[%s] %s\n' "$(basename "$0")" "$*" >&2; }
die() { log "error: $*"; exit 1; }

sha256_ok() { # file expected-sha256
  [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}

# fetch_wheel SPEC FILENAME SHA256 -> prints the cached path.
# The platform/python flags pin the exact wheel whatever python runs pip.
fetch_wheel() {
  local spec="$1" file="$2" sum="$3" dest="$CACHE/$2"
  if sha256_ok "$dest" "$sum"; then echo "$dest"; return; fi
  log "downloading $spec"
  local tmp; tmp="$(mktemp -d "$CACHE/.dl.XXXXXX")"
  python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_25_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$tmp" "$spec" >&2 || { rm -rf "$tmp"; die "pip download $spec failed"; }
  [ -f "$tmp/$file" ] || { ls "$tmp" >&2; rm -rf "$tmp"; die "$spec: expected $file"; }
  sha256_ok "$tmp/$file" "$sum" || { rm -rf "$tmp"; die "$file: sha256 mismatch (want $sum)"; }
  mv "$tmp/$file" "$dest"; rm -rf "$tmp"
  echo "$dest"
}

# fetch_deb PACKAGE VERSION FILENAME SHA256 -> prints the cached path (no system install).
fetch_deb() {
  local pkg="$1" ver="$2" file="$3" sum="$4" dest="$CACHE/$3"
  if sha256_ok "$dest" "$sum"; then echo "$dest"; return; fi
  log "downloading Debian package $pkg=$ver"
  local tmp; tmp="$(mktemp -d "$CACHE/.dl.XXXXXX")"
  chmod 777 "$tmp" # apt's sandbox user must be able to write here
  if ! (cd "$tmp" && apt-get download "$pkg=$ver" >&2 2>/dev/null); then
    log "apt-get download failed; refreshing package lists once"
    apt-get update >&2 || true
    (cd "$tmp" && apt-get download "$pkg=$ver" >&2) || { rm -rf "$tmp"; die "apt-get download $pkg=$ver failed"; }
  fi
  local got; got="$(ls "$tmp"/*.deb | head -1)"
  sha256_ok "$got" "$sum" || { rm -rf "$tmp"; die "$pkg: sha256 mismatch (want $sum)"; }
  mv "$got" "$dest"; rm -rf "$tmp"
  echo "$dest"
}
