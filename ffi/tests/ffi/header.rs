//! The committed C header is what cbindgen makes from the crate today. The test compares; with
//! `FEDLORA_WRITE_HEADER=1` it writes the header instead (after a change to the C API:
//! `FEDLORA_WRITE_HEADER=1 cargo test --release -p fedlora-ffi --test ffi header`). Writing it is
//! a test's job rather than an example's so that `cargo test` does not build cbindgen twice.

#[test]
fn the_committed_header_is_current() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let config = cbindgen::Config::from_file(format!("{dir}/cbindgen.toml")).unwrap();
    let mut made = Vec::new();
    cbindgen::generate_with_config(dir, config)
        .expect("cbindgen parses the crate")
        .write(&mut made);
    let path = format!("{dir}/include/fedlora.h");
    if std::env::var_os("FEDLORA_WRITE_HEADER").is_some_and(|v| v == "1") {
        std::fs::write(&path, &made).unwrap();
        eprintln!("wrote {path}");
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == made,
        "{path} is stale: run `FEDLORA_WRITE_HEADER=1 cargo test --release -p fedlora-ffi --test ffi header`"
    );
}
