//! The one thread pool everything computes on: rayon's global pool runs the experts and the int8
//! linear layers, and tract's matrix products are pointed at the same pool (tract's own default
//! is single-threaded). [`configure_threads`] sizes it once; loading a model points tract at it
//! when the application has not chosen another executor for tract.

use std::sync::{Mutex, Once};

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

/// Runs the forward pass `f` on a thread of the shared pool (directly when called from one). Its
/// parallel sections (experts, int8 layers, tract's matrix products) then start from a pool
/// thread, which takes part in the work: one hand-off per call instead of a wake-up of the pool
/// and a sleep of the calling thread at every parallel section of every layer.
///
/// Forward passes run this way one at a time, process-wide: a pool thread waiting inside one of
/// tract's matrix products (which holds a thread-local scratch borrowed across its parallel
/// section) may pick up any queued pool job, and another forward pass started there would borrow
/// the same scratch again (a panic). Concurrent sessions therefore take turns, step by step; each
/// step has every thread of the pool.
pub(crate) fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let _turn = ONE_STEP_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    rayon::scope(|_| f())
}

/// Taken by each forward pass [`on_pool`] runs, and by [`on_every_pool_thread`].
static ONE_STEP_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs `f` once on every thread of the shared pool, between forward passes: what a forward pass
/// left in a pool thread's thread-local storage (tract keeps per-session scratch there) is
/// released this way when the session ends.
pub(crate) fn on_every_pool_thread(f: impl Fn() + Sync) {
    let _turn = (rayon::current_thread_index().is_none())
        .then(|| ONE_STEP_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner()));
    rayon::broadcast(|_| f());
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
