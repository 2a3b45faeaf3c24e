#!/usr/bin/env bash
# Real data for the examples, tests and benchmarks, from Debian packages (no hub downloads):
#   Fashion-MNIST -> /usr/share/datasets/fashion-mnist                      (dataset-fashion-mnist)
#   Jane Austen   -> ~/.cache/janeaustenr, unpacked so that R is not pulled in  (r-cran-janeaustenr)
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
AUSTEN="$HOME/.cache/janeaustenr"
if [ ! -f "$FMNIST" ] || [ ! -d "$AUSTEN/usr/lib/R/site-library/janeaustenr" ]; then
    $SUDO apt-get update -qq
fi
[ -f "$FMNIST" ] || $SUDO apt-get install -y -qq dataset-fashion-mnist
if [ ! -d "$AUSTEN/usr/lib/R/site-library/janeaustenr" ]; then
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download -qq r-cran-janeaustenr && mkdir -p "$AUSTEN" && dpkg-deb -x r-cran-janeaustenr_*.deb "$AUSTEN")
    rm -rf "$tmp"
fi
echo "data ready: /usr/share/datasets/fashion-mnist and $AUSTEN"
