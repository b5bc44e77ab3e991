//! A panic inside tract (its shape inference or an op meeting a graph it did not expect, as a
//! damaged constant can make) or inside `tokenizers` (meeting a malformed `tokenizer.json`)
//! becomes an [`Error`] at the engine's boundary instead of unwinding into the caller.
//! [`panic_is_caught`] lets an application's panic hook stay quiet for those.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::{Error, Result};

thread_local! {
    static GUARDED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`, turning a panic into `Error::Tract` with `context`. What `f` changed before it
/// panicked is left to the caller to discard (a plan is not kept, a run's state is reset).
pub(crate) fn catch_panic<T>(context: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch(f).unwrap_or_else(|message| {
        Err(Error::Tract {
            context: context.into(),
            cause: anyhow::anyhow!("the graph made tract fail (panic: {message})"),
        })
    })
}

/// Runs `f`, a call into a library that may panic on what a model's files hold (`tokenizers`
/// does, on some malformed `tokenizer.json`), turning a panic into the error `to_error` makes of
/// its message.
pub(crate) fn catch_library_panic<T>(
    f: impl FnOnce() -> Result<T>,
    to_error: impl FnOnce(String) -> Error,
) -> Result<T> {
    catch(f).unwrap_or_else(|message| Err(to_error(message)))
}

/// `f`'s result, or the message of its panic.
fn catch<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    let outer = GUARDED.replace(true);
    let result = catch_unwind(AssertUnwindSafe(f));
    GUARDED.set(outer);
    result.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into())
    })
}

/// Whether this thread is inside a call whose panics the engine turns into errors: a panic hook
/// can print nothing for those.
pub fn panic_is_caught() -> bool {
    GUARDED.get()
}
