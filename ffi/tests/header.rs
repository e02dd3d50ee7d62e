//! The committed C header is what cbindgen makes from the crate today (regenerate with
//! `FEDLORA_BLESS=1 cargo test -p fedlora-ffi --test header`).

#[test]
fn the_committed_header_is_current() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let config = cbindgen::Config::from_file(format!("{dir}/cbindgen.toml")).unwrap();
    let mut made = Vec::new();
    cbindgen::generate_with_config(dir, config)
        .expect("cbindgen parses the crate")
        .write(&mut made);
    let path = format!("{dir}/include/fedlora.h");
    if std::env::var_os("FEDLORA_BLESS").is_some() {
        std::fs::write(&path, &made).unwrap();
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == made,
        "{path} is stale: run FEDLORA_BLESS=1 cargo test -p fedlora-ffi --test header"
    );
}
