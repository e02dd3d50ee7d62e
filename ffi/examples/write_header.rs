//! Regenerates the committed C header `ffi/include/fedlora.h` with cbindgen, from the crate as
//! it is now: `cargo run -p fedlora-ffi --example write_header`. The test
//! `ffi/tests/ffi/header.rs` only compares, so it can fail when the header is stale.

fn main() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let config = cbindgen::Config::from_file(format!("{dir}/cbindgen.toml"))
        .expect("ffi/cbindgen.toml parses");
    let path = format!("{dir}/include/fedlora.h");
    cbindgen::generate_with_config(dir, config)
        .expect("cbindgen parses the crate")
        .write_to_file(&path);
    println!("wrote {path}");
}
