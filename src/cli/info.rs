//! `moe-edge info`: the CPU's instruction sets, the kernels chosen, threads.

use moe_edge_engine::kernels::{available, dispatch::ALL, kernels};

pub fn run() -> anyhow::Result<()> {
    println!("moe-edge {}", env!("CARGO_PKG_VERSION"));
    println!("architecture: {}", std::env::consts::ARCH);
    let supported = available();
    for isa in ALL {
        let mark = if supported.contains(&isa) {
            "yes"
        } else {
            "no"
        };
        println!("  {:<11} {mark}", isa.name());
    }
    println!(
        "int8 kernels chosen: {} (override with MOE_EDGE_ISA=<name>)",
        kernels().isa.name()
    );
    println!(
        "threads: {} (experts, int8 layers), tract matrix products: {}",
        moe_edge_engine::pool_threads(),
        moe_edge_engine::tract_threads()
    );
    Ok(())
}
