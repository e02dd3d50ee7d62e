//! The committed C header is what cbindgen makes from the crate today. The test only compares;
//! regenerate the header with `cargo run -p fedlora-ffi --example write_header`.

#[test]
fn the_committed_header_is_current() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let config = cbindgen::Config::from_file(format!("{dir}/cbindgen.toml")).unwrap();
    let mut made = Vec::new();
    cbindgen::generate_with_config(dir, config)
        .expect("cbindgen parses the crate")
        .write(&mut made);
    let path = format!("{dir}/include/fedlora.h");
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == made,
        "{path} is stale: run `cargo run -p fedlora-ffi --example write_header`"
    );
}
