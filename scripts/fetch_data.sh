#!/usr/bin/env bash
# Fetch real offline data from Debian packages without installing them (apt-get download + dpkg-deb -x).
#   scripts/fetch_data.sh [DATA_DIR]     default DATA_DIR=data
# Gives DATA_DIR/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz (70,000 real images, MIT),
# and DATA_DIR/composite-sources/ (real photos for the evaluator's synthetic composites, GPL-2).
set -euo pipefail
DATA_DIR="${1:-${DATA_DIR:-data}}"
bash "$(dirname "$0")/fetch_composite_sources.sh" "$DATA_DIR"
PKG=dataset-fashion-mnist
dest="$DATA_DIR/fashion-mnist"
if [ -s "$dest/train-images-idx3-ubyte.gz" ] && [ -s "$dest/t10k-labels-idx1-ubyte.gz" ]; then
  echo "fashion-mnist: already in $dest"; exit 0
fi
mkdir -p "$DATA_DIR/.debs" "$dest"
cd "$DATA_DIR/.debs"
if ! ls ${PKG}_*.deb >/dev/null 2>&1; then
  apt-get download "$PKG" 2>/dev/null || { apt-get update -qq && apt-get download "$PKG"; }
fi
deb="$(ls ${PKG}_*.deb | head -1)"
echo "fashion-mnist: $deb sha256 $(sha256sum "$deb" | cut -d' ' -f1)"
rm -rf x && dpkg-deb -x "$deb" x
cp x/usr/share/datasets/fashion-mnist/*.gz "../fashion-mnist/"
cp x/usr/share/doc/$PKG/copyright "../fashion-mnist/COPYRIGHT" 2>/dev/null || true
rm -rf x
ls -l "../fashion-mnist"
