#!/usr/bin/env bash
# Fetch the real photos the synthetic composites are made of, from Debian, without installing anything
# (apt-get download + dpkg-deb -x). Only the images are kept; evaluator.composites builds the data set.
#   scripts/fetch_composite_sources.sh [DATA_DIR]     default DATA_DIR=data
# Gives DATA_DIR/composite-sources/<package>/... and SOURCES.txt (package, version, sha256 of the .deb).
set -euo pipefail
DATA_DIR="${1:-${DATA_DIR:-data}}"
dest="$DATA_DIR/composite-sources"
# package=pinned version (falls back to the candidate version, logged, when the pin is gone) and what to keep
PACKAGES=(
  "tuxpaint-stamps-default=2022.06.04-1|usr/share/tuxpaint/stamps|*.png"
  "tuxpaint-data=1:0.9.28-sdl2-1|usr/share/tuxpaint/templates|*.jpg"
  "mate-backgrounds=1.26.0-1|usr/share/backgrounds/mate/nature|*.jpg"
  "plasma-workspace-wallpapers=4:5.27.5-2|usr/share/wallpapers|*.jpg"
)
if [ -s "$dest/SOURCES.txt" ] && [ "$(wc -l < "$dest/SOURCES.txt")" -ge "${#PACKAGES[@]}" ]; then
  echo "composite sources: already in $dest"; exit 0
fi
mkdir -p "$DATA_DIR/.debs" "$dest"
debs="$(cd "$DATA_DIR/.debs" && pwd)"
dest="$(cd "$dest" && pwd)"
: > "$dest/SOURCES.txt.tmp"
for spec in "${PACKAGES[@]}"; do
  IFS='|' read -r pin keep pattern <<< "$spec"
  pkg="${pin%%=*}"
  (
    cd "$debs"
    if ! ls "${pkg}"_*.deb >/dev/null 2>&1; then
      apt-get download "$pin" 2>/dev/null || { apt-get update -qq && apt-get download "$pin"; } || {
        echo "composite sources: $pin is gone, taking the candidate version of $pkg" >&2
        apt-get download "$pkg"
      }
    fi
  )
  deb="$(ls "$debs/${pkg}"_*.deb | head -1)"
  version="$(dpkg-deb -f "$deb" Version)"
  tmp="$(mktemp -d)"
  dpkg-deb -x "$deb" "$tmp"
  rm -rf "${dest:?}/$pkg"
  mkdir -p "$dest/$pkg"
  (cd "$tmp" && find "$keep" -type f -name "$pattern" -print0 | xargs -0 cp --parents -t "$dest/$pkg")
  cp "$tmp/usr/share/doc/$pkg/copyright" "$dest/$pkg/COPYRIGHT" 2>/dev/null || true
  rm -rf "$tmp"
  echo "$pkg $version $(sha256sum "$deb" | cut -d' ' -f1)" >> "$dest/SOURCES.txt.tmp"
  echo "composite sources: $pkg $version ($(find "$dest/$pkg" -type f -name "$pattern" | wc -l) images)"
done
mv "$dest/SOURCES.txt.tmp" "$dest/SOURCES.txt"
