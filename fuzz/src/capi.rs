//! The C API target: the calls an application makes with data it got from its users (text to
//! tokenise, ids to decode, chat messages, prompts and sampling settings, buffer sizes), on
//! `models/tiny-mixtral` with a chat template, loaded once. A status of
//! `MOE_EDGE_ERR_INTERNAL` is a caught panic, and so a bug: the target fails on it.

use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::OnceLock;

use moe_edge::*;

/// The model handle, shared by every run of the process.
struct Loaded(*mut moe_edge_model);
// SAFETY: moe_edge_model is Send + Sync (asserted in the C library); the handle is never freed.
unsafe impl Send for Loaded {}
// SAFETY: as above.
unsafe impl Sync for Loaded {}

fn model() -> *const moe_edge_model {
    static MODEL: OnceLock<Loaded> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            // tiny-mixtral and a ChatML template, in a directory of this process
            let dir = super::scratch("capi-model");
            let src = super::repo_root().join("models/tiny-mixtral");
            for entry in std::fs::read_dir(&src).expect("models/tiny-mixtral is readable") {
                let entry = entry.expect("models/tiny-mixtral is readable");
                std::fs::copy(entry.path(), dir.join(entry.file_name()))
                    .expect("the model can be copied");
            }
            std::fs::copy(
                super::repo_root().join("tests/fixtures/chat/chatml.jinja"),
                dir.join("chat_template.jinja"),
            )
            .expect("the template can be copied");
            let path = CString::new(dir.to_str().expect("a UTF-8 path")).expect("no NUL");
            let mut params = moe_edge_model_default_params();
            params.threads = 0;
            let mut out = std::ptr::null_mut();
            // SAFETY: path is NUL-terminated, params and out point to live storage.
            let status = unsafe { moe_edge_model_load(path.as_ptr(), &params, &mut out) };
            assert_eq!(status, moe_edge_status::MOE_EDGE_OK, "{}", last_error());
            Loaded(out)
        })
        .0
}

fn last_error() -> String {
    // SAFETY: the library returns a NUL-terminated string valid until the next call.
    unsafe { CStr::from_ptr(moe_edge_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// Fails on a caught panic; returns the status otherwise.
fn checked(call: &str, status: moe_edge_status) -> moe_edge_status {
    assert_ne!(
        status,
        moe_edge_status::MOE_EDGE_ERR_INTERNAL,
        "{call}: {}",
        last_error()
    );
    status
}

/// Bytes up to the first NUL, as a C string.
fn c_text(bytes: &[u8]) -> CString {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    CString::new(&bytes[..end]).expect("no NUL before end")
}

/// Reads fixed-size fields off the front of the input.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn f32(&mut self) -> f32 {
        f32::from_le_bytes(self.take())
    }
}

unsafe extern "C" fn on_piece(piece: *const c_char, len: usize, user: *mut c_void) -> i32 {
    // SAFETY: user is the &mut usize passed with this callback; piece holds len bytes.
    let seen = unsafe { &mut *(user as *mut usize) };
    let bytes = unsafe { std::slice::from_raw_parts(piece as *const u8, len) };
    assert!(std::str::from_utf8(bytes).is_ok(), "a piece is not UTF-8");
    *seen += 1;
    0
}

/// One C API call chosen by the first byte, with arguments from the rest.
pub fn capi(data: &[u8]) {
    let model = model();
    let mut f = Fields(data);
    let op = f.u8() % 5;
    let capacity = usize::from(f.u16() % 600);
    match op {
        0 => tokenize(model, capacity, f.0),
        1 => detokenize(model, capacity, f.0),
        2 => apply_template(model, capacity, f.u8() % 2 == 1, f.0),
        _ => generate(model, op == 4, &mut f),
    }
}

fn tokenize(model: *const moe_edge_model, capacity: usize, rest: &[u8]) {
    let text = c_text(rest);
    let mut ids = vec![0i32; capacity];
    let mut n = 0usize;
    // SAFETY: text is NUL-terminated; ids holds capacity ids; n is writable.
    let status =
        unsafe { moe_edge_tokenize(model, text.as_ptr(), ids.as_mut_ptr(), capacity, &mut n) };
    if checked("tokenize", status) == moe_edge_status::MOE_EDGE_ERR_BUFFER_TOO_SMALL {
        assert!(n > capacity, "too small, yet {n} ids fit in {capacity}");
        let mut ids = vec![0i32; n];
        let mut again = 0usize;
        // SAFETY: as above, with n ids of room.
        let status =
            unsafe { moe_edge_tokenize(model, text.as_ptr(), ids.as_mut_ptr(), n, &mut again) };
        assert_eq!(checked("tokenize", status), moe_edge_status::MOE_EDGE_OK);
        assert_eq!(again, n, "the size asked for is the size written");
    }
}

fn detokenize(model: *const moe_edge_model, capacity: usize, rest: &[u8]) {
    let ids: Vec<i32> = rest
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let mut buf = vec![0u8; capacity];
    let mut len = 0usize;
    // SAFETY: ids holds ids.len() ids; buf holds capacity bytes; len is writable.
    let status = unsafe {
        moe_edge_detokenize(
            model,
            ids.as_ptr(),
            ids.len(),
            buf.as_mut_ptr().cast(),
            capacity,
            &mut len,
        )
    };
    match checked("detokenize", status) {
        moe_edge_status::MOE_EDGE_OK => {
            assert!(
                len < capacity && buf[len] == 0,
                "the text is NUL-terminated in the buffer"
            );
            assert!(
                std::str::from_utf8(&buf[..len]).is_ok(),
                "the text is UTF-8"
            );
        }
        moe_edge_status::MOE_EDGE_ERR_BUFFER_TOO_SMALL => {
            assert!(
                len + 1 > capacity,
                "too small, yet {len} bytes fit in {capacity}"
            )
        }
        _ => {}
    }
}

fn apply_template(model: *const moe_edge_model, capacity: usize, generation: bool, rest: &[u8]) {
    // role and content alternate, NUL-separated
    let texts: Vec<CString> = rest
        .split(|&b| b == 0)
        .map(CString::new)
        .map(Result::unwrap)
        .collect();
    let messages: Vec<moe_edge_chat_message> = texts
        .chunks_exact(2)
        .map(|p| moe_edge_chat_message {
            role: p[0].as_ptr(),
            content: p[1].as_ptr(),
        })
        .collect();
    let mut buf = vec![0u8; capacity];
    let mut len = 0usize;
    // SAFETY: messages point to NUL-terminated strings that outlive the call; buf holds capacity
    // bytes; len is writable.
    let status = unsafe {
        moe_edge_chat_apply_template(
            model,
            messages.as_ptr(),
            messages.len(),
            generation,
            buf.as_mut_ptr().cast(),
            capacity,
            &mut len,
        )
    };
    if checked("chat_apply_template", status) == moe_edge_status::MOE_EDGE_OK {
        assert!(
            len < capacity && buf[len] == 0,
            "the text is NUL-terminated in the buffer"
        );
    }
}

fn generate(model: *const moe_edge_model, chat: bool, f: &mut Fields<'_>) {
    let mut params = moe_edge_generate_default_params();
    params.max_tokens = u32::from(f.u8() % 4);
    params.temperature = f.f32();
    params.top_p = f.f32();
    params.top_k = u32::from(f.u16());
    params.repetition_penalty = f.f32();
    params.seed = u64::from(f.u16());
    let prompt = c_text(f.0);
    let mut session = std::ptr::null_mut();
    // SAFETY: model is live; session is writable.
    let status = unsafe { moe_edge_session_new(model, &mut session) };
    assert_eq!(checked("session_new", status), moe_edge_status::MOE_EDGE_OK);
    let mut stats = moe_edge_generation_stats_init();
    let mut pieces = 0usize;
    let user = (&mut pieces as *mut usize).cast::<c_void>();
    // SAFETY: session is live and used by this thread only; prompt is NUL-terminated; params,
    // stats and the callback's user data outlive the call.
    let status = unsafe {
        if chat {
            moe_edge_chat(
                session,
                c"Be brief.".as_ptr(),
                prompt.as_ptr(),
                &params,
                Some(on_piece),
                user,
                &mut stats,
            )
        } else {
            moe_edge_generate(
                session,
                prompt.as_ptr(),
                &params,
                Some(on_piece),
                user,
                &mut stats,
            )
        }
    };
    if checked(if chat { "chat" } else { "generate" }, status) == moe_edge_status::MOE_EDGE_OK {
        assert!(stats.generated_tokens <= params.max_tokens);
    }
    // SAFETY: session came from moe_edge_session_new and is not used again.
    unsafe { moe_edge_session_free(session) };
}
