//! The one thread pool everything computes on: rayon's global pool runs the experts and the int8
//! linear layers, and tract's matrix products are pointed at the same pool (tract's own default
//! is single-threaded). [`configure_threads`] sizes it once; loading a model points tract at it
//! when the application has not chosen another executor for tract.

use std::sync::Once;

use tract_linalg::multithread::{current_tract_executor, set_default_executor, Executor};

use crate::error::{Error, Result};

/// More threads than this many per core only add switching: `configure_threads` clamps to it.
pub const MAX_THREADS_PER_CORE: usize = 8;

/// Sizes the shared pool to `threads` (`None`: one per CPU, rayon's default) and points tract's
/// matrix products at it; more than [`MAX_THREADS_PER_CORE`] per core are clamped with a warning.
/// Returns the number of threads in use. The pool can be sized only
/// before anything has used it: a later call with a different size is an error.
pub fn configure_threads(threads: Option<usize>) -> Result<usize> {
    if let Some(mut n) = threads {
        if n == 0 {
            return Err(Error::InvalidInput("threads must be at least 1".into()));
        }
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        if n > MAX_THREADS_PER_CORE * cores {
            log::warn!(
                "{n} threads on {cores} cores: using {}",
                MAX_THREADS_PER_CORE * cores
            );
            n = MAX_THREADS_PER_CORE * cores;
        }
        let built = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
        if built.is_err() && rayon::current_num_threads() != n {
            return Err(Error::InvalidInput(format!(
                "cannot use {n} threads: the thread pool already runs {} (set threads before \
                 anything computes)",
                rayon::current_num_threads()
            )));
        }
    }
    set_default_executor(Executor::RayonGlobal);
    Ok(rayon::current_num_threads())
}

/// Points tract at the shared pool once per process, unless the application set tract's executor
/// itself (anything but tract's single-threaded default).
pub(crate) fn share_pool_with_tract() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if matches!(current_tract_executor(), Executor::SingleThread) {
            set_default_executor(Executor::RayonGlobal);
        }
    });
}

/// Runs `f` on a thread of the shared pool (directly when called from one). A forward pass run
/// this way starts its parallel sections (experts, int8 layers, tract's matrix products) from a
/// pool thread, which takes part in the work: one hand-off per call instead of a wake-up of the
/// pool and a sleep of the calling thread at every parallel section of every layer.
pub(crate) fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// The threads tract's matrix products run on now.
pub fn tract_threads() -> usize {
    match current_tract_executor() {
        Executor::SingleThread => 1,
        Executor::MultiThread(pool) => pool.current_num_threads(),
        Executor::RayonGlobal => rayon::current_num_threads(),
    }
}

/// The threads of the shared pool (experts, int8 linear layers).
pub fn pool_threads() -> usize {
    rayon::current_num_threads()
}
