//! One thread pool for the whole process: the MoE op and tract's matrix products both run on
//! rayon's global pool, sized once at start-up.

/// Sizes the global pool (`None`: one thread per core) and points tract's executor at it.
/// Call once, before any model runs.
pub fn configure(threads: Option<usize>) {
    if let Some(n) = threads {
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global()
        {
            log::warn!("could not set {n} threads: {e}");
        }
    }
    let n = rayon::current_num_threads();
    let executor = if n > 1 {
        tract_linalg::multithread::Executor::RayonGlobal
    } else {
        tract_linalg::multithread::Executor::SingleThread
    };
    tract_linalg::multithread::set_default_executor(executor);
    log::info!("{n} worker thread(s)");
    // choose the int8 kernels now, so that the log says which at start-up
    crate::kernels::kernels();
}
