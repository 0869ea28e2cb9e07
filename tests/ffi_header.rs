//! The committed C header is what cbindgen generates from src/ffi.rs today.

#[test]
fn the_committed_header_is_up_to_date() {
    let root = env!("CARGO_MANIFEST_DIR");
    let config = cbindgen::Config::from_file(format!("{root}/cbindgen.toml")).unwrap();
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(format!("{root}/src/ffi.rs"))
        .generate()
        .expect("cbindgen parses src/ffi.rs")
        .write(&mut generated);
    let path = format!("{root}/include/cage.h");
    if std::env::var_os("CAGE_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "include/cage.h is stale: regenerate it with CAGE_BLESS=1 cargo test --release --test ffi_header"
    );
}
