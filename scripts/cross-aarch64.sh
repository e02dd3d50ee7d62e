#!/usr/bin/env bash
# Cross-builds the device client for aarch64 (Raspberry Pi 4/5, Jetson, ARM gateways) with
# Debian's Rust toolchain, then runs one federated round with it under qemu-aarch64 against a
# coordinator (the x86-64 `fedlora`) on loopback.
#
#   scripts/cross-aarch64.sh            # install what is missing, build, run the round
#   SKIP_INSTALL=1 scripts/cross-aarch64.sh
#
# rustup cannot fetch targets on these machines; Debian's rustc-web (Rust 1.96) ships the
# aarch64 standard library as a package. It installs /usr/bin/cargo and /usr/bin/rustc, which
# rustup's ~/.cargo/bin shadows, so this script calls them by path, with its own target dir.
# Takes ~15-25 min on 2 cores (fat LTO); not part of .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

if [ -z "${SKIP_INSTALL:-}" ]; then
  need=()
  dpkg --print-foreign-architectures | grep -qx arm64 || { dpkg --add-architecture arm64; apt-get update -qq; }
  for p in rustc-web cargo-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu \
           g++-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
  done
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
  fi
fi

target=aarch64-unknown-linux-gnu
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
export RUSTC=/usr/bin/rustc
# statically linked (glibc's crt-static): one file to copy onto a device, and Debian 12's
# qemu-aarch64 (7.2) hangs in pthread_create for dynamically linked aarch64 programs on newer
# host kernels (a 5-line C program with one thread shows it), while static ones run
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static"
echo "+ /usr/bin/cargo build --profile device -p fedlora-device --target $target"
/usr/bin/cargo build --profile device -p fedlora-device --target "$target" \
  --target-dir target/aarch64
device="target/aarch64/$target/device/fedlora-device"
file "$device" 2>/dev/null || true
unset RUSTC CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS

# the coordinator: this machine's own build
cargo build --release -p fedlora
work=$(mktemp -d)
trap 'kill $coord 2>/dev/null || true; rm -rf "$work"' EXIT
target/release/fedlora certs init --out "$work/certs" --clients 1 >/dev/null
port=$((20000 + RANDOM % 20000))
target/release/fedlora coordinator --certs "$work/certs" --data-dir "$work/coord" \
  --listen "127.0.0.1:$port" --rounds 1 --clients-per-round 1 --min-clients 1 \
  --local-steps 5 --round-timeout 600s >"$work/coordinator.log" 2>&1 &
coord=$!
sleep 2

echo "+ qemu-aarch64 $device run --coordinator 127.0.0.1:$port ..."
start=$(date +%s)
qemu-aarch64 "$device" run --coordinator "127.0.0.1:$port" \
  --certs "$work/certs" --client-index 0 --base "$root/models/base.bpk" \
  --state-dir "$work/device" --threads 2 --upload-margin 1s | tee "$work/device.out"
end=$(date +%s)
wait $coord || true
grep -q "final version 1" "$work/device.out"
echo "aarch64 device binary: $(stat -c %s "$device") bytes; round under qemu: $((end - start)) s"
