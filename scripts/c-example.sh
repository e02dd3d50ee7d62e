#!/usr/bin/env bash
# Builds the C example (ffi/examples/client.c) against ffi/include/fedlora.h and the
# fedlora-ffi shared library, then runs it for one round against a coordinator on loopback.
# (CI compiles and runs the same program from `cargo test`: ffi/tests/c_example.rs.)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
cargo build --release -p fedlora -p fedlora-ffi
work=$(mktemp -d)
trap 'kill $coord 2>/dev/null || true; rm -rf "$work"' EXIT
cc -std=c11 -Wall -Werror ffi/examples/client.c -I ffi/include -L target/release \
  -Wl,-rpath,"$root/target/release" -lfedlora_ffi -o "$work/client"
target/release/fedlora certs init --out "$work/certs" --clients 1 >/dev/null
port=$((20000 + RANDOM % 20000))
target/release/fedlora coordinator --certs "$work/certs" --data-dir "$work/coord" \
  --listen "127.0.0.1:$port" --rounds 1 --clients-per-round 1 --min-clients 1 \
  --local-steps 3 >"$work/coordinator.log" 2>&1 &
coord=$!
sleep 2
head -c 20000 data/tiny_shakespeare.txt >"$work/data.txt"
"$work/client" "127.0.0.1:$port" "$work/certs/ca.pem" "$work/certs/client-0.pem" \
  "$work/certs/client-0.key" "$work/device" "$root/models/base.bpk" "$work/data.txt"
wait $coord
