#!/bin/sh
# Installs libfwnp, its header and its pkg-config file:
#
#   sdk/c/install.sh [PREFIX]        builds in release mode, installs under PREFIX (/usr/local)
#   FWNP_LIB_DIR=DIR sdk/c/install.sh PREFIX
#                                    installs the libfwnp.so and libfwnp.a already built in DIR
#
# Installed: PREFIX/lib/libfwnp.so, PREFIX/lib/libfwnp.a, PREFIX/include/fwnp.h and
# PREFIX/lib/pkgconfig/fwnp.pc (from fwnp.pc.in). Then:
#   cc app.c $(pkg-config --cflags --libs fwnp)
# (with PKG_CONFIG_PATH=PREFIX/lib/pkgconfig when PREFIX is not one pkg-config searches).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
prefix=${1:-/usr/local}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/../../Cargo.toml" | head -n 1)
if [ -z "${FWNP_LIB_DIR:-}" ]; then
  (cd "$here" && cargo build --release --locked -p fwnp-c)
  FWNP_LIB_DIR=$(cd "$here" && cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release
fi
install -d "$prefix/lib/pkgconfig" "$prefix/include"
install -m 0755 "$FWNP_LIB_DIR/libfwnp.so" "$prefix/lib/libfwnp.so"
install -m 0644 "$FWNP_LIB_DIR/libfwnp.a" "$prefix/lib/libfwnp.a"
install -m 0644 "$here/include/fwnp.h" "$prefix/include/fwnp.h"
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" "$here/fwnp.pc.in" \
  > "$prefix/lib/pkgconfig/fwnp.pc"
echo "libfwnp $version installed under $prefix"
