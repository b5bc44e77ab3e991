//! moe-edge as a C library (`libmoe_edge.so`, `libmoe_edge.a`, `include/moe_edge.h`): load a
//! model, tokenise, render chat templates, generate with a streaming callback, hold multi-turn
//! conversations, cancel from another thread, read generation and expert-cache figures.
//!
//! Conventions (llama.h's where they fit): opaque handles with new/free pairs; `*_default_params()`
//! returning structs whose `struct_size` field lets later versions add fields; every call returns
//! a `moe_edge_status` and leaves a message for `moe_edge_last_error()` on failure; no call panics
//! or unwinds into C (panics are caught at every entry point); pointer arguments are checked for
//! NULL and strings for UTF-8. Models may be shared by threads; a session is used by one thread at
//! a time (a second gets `MOE_EDGE_ERR_BUSY`), except `moe_edge_cancel`.
#![allow(non_camel_case_types)]

mod model;
mod session;
mod status;

use std::ffi::c_char;

pub use model::*;
pub use session::*;
pub use status::*;

/// The library's version, e.g. "0.1.0" (a static string).
#[no_mangle]
pub extern "C" fn moe_edge_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

/// The int8 kernels this CPU runs (e.g. "avx512vnni", "dotprod", "neon", "scalar"; a static
/// string).
#[no_mangle]
pub extern "C" fn moe_edge_isa() -> *const c_char {
    let name: &'static str = match moe_edge_engine::kernels::kernels().isa.name() {
        "scalar" => "scalar\0",
        "avx2" => "avx2\0",
        "avxvnni" => "avxvnni\0",
        "avx512vnni" => "avx512vnni\0",
        "neon" => "neon\0",
        "dotprod" => "dotprod\0",
        "i8mm" => "i8mm\0",
        _ => "unknown\0",
    };
    name.as_ptr() as *const c_char
}
