//! Generates the C header from the crate's declarations into `$OUT_DIR/moe_edge.h`;
//! `tests/header.rs` compares it with the checked-in `include/moe_edge.h`.

use std::path::PathBuf;

fn main() {
    let crate_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo")).join("moe_edge.h");
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    // the shared library names itself, as installed libraries do
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libmoe_edge.so");
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml"))
        .unwrap_or_else(|e| panic!("capi/cbindgen.toml: {e}"));
    cbindgen::Builder::new()
        .with_crate(&crate_dir)
        .with_config(config)
        .generate()
        .unwrap_or_else(|e| panic!("cbindgen could not read capi/src: {e}"))
        .write_to_file(&out);
}
