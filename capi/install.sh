#!/usr/bin/env bash
# Installs the C library into a prefix: PREFIX/include/moe_edge.h, PREFIX/lib/libmoe_edge.{so,a},
# PREFIX/lib/pkgconfig/moe_edge.pc.
#   capi/install.sh PREFIX                    # builds the release libraries for this machine
#   TARGET=aarch64-unknown-linux-gnu capi/install.sh /opt/moe-edge-aarch64
#   PROFILE=debug NO_BUILD=1 capi/install.sh PREFIX   # installs what is already built
#   LIB_DIR=DIR NO_BUILD=1 capi/install.sh PREFIX     # installs the libraries found in DIR
# The .pc file lists what the static library
# needs besides itself (pkg-config --static --libs moe_edge), and -z noexecstack: one of tract's
# assembly objects lacks the .note.GNU-stack section, which would make a static binary's stack
# executable.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${1:?usage: capi/install.sh PREFIX}
PROFILE=${PROFILE:-release}
TARGET=${TARGET:-}
if [ "${NO_BUILD:-0}" != 1 ]; then
  flags=(--locked -p moe-edge-capi)
  [ "$PROFILE" = release ] && flags+=(--release)
  [ "$PROFILE" != release ] && [ "$PROFILE" != debug ] && flags+=(--profile "$PROFILE")
  [ -n "$TARGET" ] && flags+=(--target "$TARGET")
  (cd "$ROOT" && cargo build "${flags[@]}")
fi
dir=${LIB_DIR:-$ROOT/target/${TARGET:+$TARGET/}$PROFILE}
for f in libmoe_edge.so libmoe_edge.a; do
  [ -f "$dir/$f" ] || { echo "error: $dir/$f is not built" >&2; exit 1; }
done
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/Cargo.toml" | head -1)
mkdir -p "$PREFIX/include" "$PREFIX/lib/pkgconfig"
PREFIX=$(cd "$PREFIX" && pwd)
# each file is written under a temporary name, then renamed: an interrupted install leaves the
# previous files whole
put() { # source, destination, mode
  install -m "$3" "$1" "$2.tmp.$$"
  mv -f "$2.tmp.$$" "$2"
}
put "$ROOT/capi/include/moe_edge.h" "$PREFIX/include/moe_edge.h" 644
put "$dir/libmoe_edge.so" "$PREFIX/lib/libmoe_edge.so" 755
put "$dir/libmoe_edge.a" "$PREFIX/lib/libmoe_edge.a" 644
cat >"$PREFIX/lib/pkgconfig/moe_edge.pc.tmp.$$" <<PC
prefix=$PREFIX
includedir=\${prefix}/include
libdir=\${prefix}/lib

Name: moe_edge
Description: Run Mixture-of-Experts language models on small devices
Version: $version
Cflags: -I\${includedir}
Libs: -L\${libdir} -lmoe_edge
Libs.private: -Wl,-z,noexecstack -lpthread -ldl -lm
PC
mv -f "$PREFIX/lib/pkgconfig/moe_edge.pc.tmp.$$" "$PREFIX/lib/pkgconfig/moe_edge.pc"
echo "installed moe_edge $version ($PROFILE${TARGET:+, $TARGET}) into $PREFIX"
