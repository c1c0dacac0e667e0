#!/bin/sh
# Unpacks Fashion-MNIST's gzip idx files (Debian's dataset-fashion-mnist) for LibTorch's MNIST
# reader, which reads them uncompressed: the first step of docs/porting.md, as ctest runs it.
# Exits 77 (ctest: skipped) when the source directory is missing.
# Usage: unpack_fashion_mnist.sh [SOURCE] [DEST]
src=${1:-/usr/share/datasets/fashion-mnist}
dest=${2:-data/fashion-mnist}
if [ ! -d "$src" ]; then
  echo "skipped: $src is missing (sudo apt-get install dataset-fashion-mnist)"
  exit 77
fi
mkdir -p "$dest" || exit 1
for f in "$src"/*-ubyte.gz; do
  gzip -dc "$f" > "$dest/$(basename "$f" .gz)" || exit 1
done
ls "$dest"
