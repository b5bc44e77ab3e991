//! `include/moe_edge.h` is what cbindgen generates from the crate's declarations now (build.rs
//! writes it into OUT_DIR): a change to the API without regenerating the header fails here.
//! `MOE_EDGE_UPDATE_HEADER=1 cargo test --test header` rewrites the checked-in copy.

use std::path::Path;

const GENERATED: &str = include_str!(concat!(env!("OUT_DIR"), "/moe_edge.h"));

#[test]
fn the_checked_in_header_is_current() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("include/moe_edge.h");
    if std::env::var_os("MOE_EDGE_UPDATE_HEADER").is_some() {
        let tmp = path.with_extension("h.tmp");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&tmp, GENERATED).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == GENERATED,
        "capi/include/moe_edge.h is stale: run MOE_EDGE_UPDATE_HEADER=1 cargo test --test header"
    );
}
