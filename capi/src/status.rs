//! Status codes, the thread-local last error message, and the guard every entry point runs in:
//! a panic becomes `MOE_EDGE_ERR_INTERNAL`, never an abort or an unwind into C.

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use moe_edge_engine::Error;

/// What a call returns: `MOE_EDGE_OK`, or the kind of failure (`moe_edge_last_error()` says more).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum moe_edge_status {
    MOE_EDGE_OK = 0,
    /// A required pointer argument was NULL.
    MOE_EDGE_ERR_NULL_ARGUMENT = 1,
    /// An argument is out of range, not UTF-8, or does not fit the model (e.g. a token id).
    MOE_EDGE_ERR_INVALID_ARGUMENT = 2,
    /// The output buffer is too small; the size needed was written where the call says.
    MOE_EDGE_ERR_BUFFER_TOO_SMALL = 3,
    /// A file could not be read.
    MOE_EDGE_ERR_IO = 4,
    /// The model cannot be loaded or run: malformed, refused, or a damaged pack.
    MOE_EDGE_ERR_MODEL = 5,
    /// The model has no tokenizer or chat template for what was asked.
    MOE_EDGE_ERR_UNSUPPORTED = 6,
    /// The prompt does not fit in the model's context.
    MOE_EDGE_ERR_CONTEXT_FULL = 7,
    /// The session is being used by another thread (sessions are single-threaded).
    MOE_EDGE_ERR_BUSY = 8,
    /// A bug inside moe-edge (a caught panic).
    MOE_EDGE_ERR_INTERNAL = 9,
}

pub use moe_edge_status::*;

/// A failure: the status and the message for `moe_edge_last_error()`.
pub(crate) struct Failure(pub(crate) moe_edge_status, pub(crate) String);

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::InvalidInput(_) => MOE_EDGE_ERR_INVALID_ARGUMENT,
            Error::ContextFull { .. } => MOE_EDGE_ERR_CONTEXT_FULL,
            Error::Io { .. } => MOE_EDGE_ERR_IO,
            Error::Tokenizer(_) | Error::Template { .. } => MOE_EDGE_ERR_UNSUPPORTED,
            _ => MOE_EDGE_ERR_MODEL,
        };
        Failure(status, e.to_string())
    }
}

pub(crate) type Outcome<T = ()> = Result<T, Failure>;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    let clean: Vec<u8> = message.bytes().filter(|&b| b != 0).collect();
    let c = CString::new(clean).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// The message of the last failed call on this thread ("" if none failed yet). The string
/// belongs to the library and stays valid until the next failing call on the same thread.
#[no_mangle]
pub extern "C" fn moe_edge_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Runs an entry point: its failure or panic becomes a status and the thread's last error.
pub(crate) fn guard(f: impl FnOnce() -> Outcome) -> moe_edge_status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => MOE_EDGE_OK,
        Ok(Err(Failure(status, message))) => {
            set_last_error(&message);
            status
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            set_last_error(&format!("internal error in moe-edge: {what}"));
            MOE_EDGE_ERR_INTERNAL
        }
    }
}

/// A NULL pointer argument.
pub(crate) fn null(name: &str) -> Failure {
    Failure(MOE_EDGE_ERR_NULL_ARGUMENT, format!("{name} is NULL"))
}

pub(crate) fn invalid(message: impl Into<String>) -> Failure {
    Failure(MOE_EDGE_ERR_INVALID_ARGUMENT, message.into())
}

/// A NUL-terminated UTF-8 string argument.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that stays valid for `'a`.
pub(crate) unsafe fn utf8<'a>(p: *const c_char, name: &str) -> Outcome<&'a str> {
    if p.is_null() {
        return Err(null(name));
    }
    // SAFETY: not NULL, and the caller guarantees a NUL-terminated string valid for 'a.
    let c = unsafe { CStr::from_ptr(p) };
    c.to_str()
        .map_err(|e| invalid(format!("{name} is not UTF-8 (at byte {})", e.valid_up_to())))
}

/// Copies `text` and a NUL into `buf` of `capacity` bytes; `*len` gets the text's length in any
/// case, so that a caller whose buffer was too small knows the size to allocate (len + 1).
///
/// # Safety
/// `buf` is NULL or valid for `capacity` bytes of writes; `len` is NULL or valid for a write.
pub(crate) unsafe fn write_text(
    text: &str,
    buf: *mut c_char,
    capacity: usize,
    len: *mut usize,
) -> Outcome {
    if len.is_null() {
        return Err(null("len"));
    }
    // SAFETY: not NULL; the caller guarantees it is valid for a write.
    unsafe { *len = text.len() };
    if capacity < text.len() + 1 {
        return Err(Failure(
            MOE_EDGE_ERR_BUFFER_TOO_SMALL,
            format!(
                "the buffer holds {capacity} bytes; the text needs {} (with its NUL)",
                text.len() + 1
            ),
        ));
    }
    if buf.is_null() {
        return Err(null("buf"));
    }
    // SAFETY: buf is valid for `capacity` >= text.len() + 1 bytes and does not overlap `text`
    // (a Rust string the caller cannot see).
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr(), buf as *mut u8, text.len());
        *buf.add(text.len()) = 0;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last_error() -> String {
        // SAFETY: moe_edge_last_error returns a NUL-terminated string that lives until the next
        // failing call on this thread; it is copied at once.
        unsafe { CStr::from_ptr(moe_edge_last_error()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn a_panic_becomes_an_internal_error_with_its_message() {
        let status = guard(|| panic!("index 7 out of range"));
        assert_eq!(status, MOE_EDGE_ERR_INTERNAL);
        assert_eq!(
            last_error(),
            "internal error in moe-edge: index 7 out of range"
        );
        let status = guard(|| std::panic::panic_any(42u8));
        assert_eq!(status, MOE_EDGE_ERR_INTERNAL);
        assert_eq!(last_error(), "internal error in moe-edge: no message");
    }

    #[test]
    fn a_failure_sets_the_message_and_success_keeps_it() {
        assert_eq!(guard(|| Err(null("tokens"))), MOE_EDGE_ERR_NULL_ARGUMENT);
        assert_eq!(last_error(), "tokens is NULL");
        assert_eq!(guard(|| Ok(())), MOE_EDGE_OK);
        assert_eq!(last_error(), "tokens is NULL");
        // a NUL inside a message cannot end it early
        assert_eq!(
            guard(|| Err(invalid("a\0b"))),
            MOE_EDGE_ERR_INVALID_ARGUMENT
        );
        assert_eq!(last_error(), "ab");
    }

    #[test]
    fn text_is_written_with_its_nul_or_its_size_is_reported() {
        let mut buf = [0x55 as c_char; 6];
        let mut len = 0usize;
        // SAFETY: buf holds 6 bytes, len is a valid usize.
        let r = unsafe { write_text("hello", buf.as_mut_ptr(), buf.len(), &mut len) };
        assert!(r.is_ok());
        assert_eq!(len, 5);
        assert_eq!(buf.map(|c| c as u8), *b"hello\0");
        let mut small = [0x55 as c_char; 5];
        // SAFETY: as above, 5 bytes.
        let r = unsafe { write_text("hello", small.as_mut_ptr(), small.len(), &mut len) };
        assert!(matches!(r, Err(Failure(MOE_EDGE_ERR_BUFFER_TOO_SMALL, _))));
        assert_eq!(len, 5);
        assert!(
            small.iter().all(|&c| c == 0x55),
            "nothing written when it does not fit"
        );
    }

    #[test]
    fn strings_must_be_utf8() {
        let bad = b"ok\xff\0";
        // SAFETY: NUL-terminated.
        let r = unsafe { utf8(bad.as_ptr() as *const c_char, "prompt") };
        match r {
            Err(Failure(MOE_EDGE_ERR_INVALID_ARGUMENT, m)) => {
                assert_eq!(m, "prompt is not UTF-8 (at byte 2)")
            }
            _ => panic!("accepted"),
        }
    }
}
