#!/usr/bin/env bash
# Rebuilds the reference guests (C -> wasm32 core module -> component),
# byte-identically: the committed guests/<name>/<name>.wasm files must not
# change when this runs on a machine with the packages below.
#
# Needs (Debian bookworm): clang lld wasi-libc libclang-rt-14-dev-wasm32
# and cargo (componentizing runs `cargo run --example componentize`).
#
#   guests/build.sh               rebuild all guests in place
#   guests/build.sh --check       rebuild into a temp dir and `cmp` against
#                                 the committed files (CI)
#   guests/build.sh --bindings    also regenerate the C bindings with
#                                 `wit-bindgen c` (wit-bindgen-cli 0.57.1)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"

check=0
bindings=0
for arg in "$@"; do
    case "$arg" in
        --check) check=1 ;;
        --bindings) bindings=1 ;;
        *) echo "unknown argument: $arg" >&2; exit 64 ;;
    esac
done

if [ "$bindings" = 1 ]; then
    wit-bindgen c ../wit --world device-function --out-dir bindings
    # The WIT is embedded by the componentize step instead.
    rm -f bindings/device_function_component_type.o
fi

CC="${CC:-clang}"
# Paths are relative and the build dir is fixed, so no absolute path ends up
# in the output; -g0 keeps DWARF (and its paths) out.
CFLAGS=(
    --target=wasm32-wasi --sysroot=/usr -mexec-model=reactor
    -O2 -g0 -std=c11 -Wall -Wextra -Werror
    -Ibindings -Icommon
    -Wl,--strip-debug
)

work="$(mktemp -d)"
out="$here"
if [ "$check" = 1 ]; then
    out="$work/out"
fi
trap 'rm -rf "$work"' EXIT

# Build the componentize tool once.
cargo build --quiet -p device-runtime --example componentize
componentize="${CARGO_TARGET_DIR:-$here/../../target}/debug/examples/componentize"

status=0
for dir in deadband swinging-door window anomaly probe; do
    src=("$dir"/*.c)
    "$CC" "${CFLAGS[@]}" -o "$work/$dir.core.wasm" "${src[@]}" bindings/device_function.c
    mkdir -p "$out/$dir"
    "$componentize" "$work/$dir.core.wasm" "$out/$dir/$dir.wasm"
    if [ "$check" = 1 ]; then
        if cmp -s "$out/$dir/$dir.wasm" "$here/$dir/$dir.wasm"; then
            echo "ok       $dir/$dir.wasm"
        else
            echo "DIFFERS  $dir/$dir.wasm" >&2
            status=1
        fi
    else
        echo "built    $dir/$dir.wasm ($(wc -c < "$dir/$dir.wasm") bytes)"
    fi
done
exit "$status"
