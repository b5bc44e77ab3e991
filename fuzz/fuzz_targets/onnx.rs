#![no_main]

libfuzzer_sys::fuzz_target!(init: moe_edge_fuzz::init(), |data: &[u8]| moe_edge_fuzz::onnx(data));
