//! The model handle: loading with its parameters, tokenising, detokenising, chat templates, the
//! expert cache's counters. A model is immutable once loaded and may be used from any number of
//! threads at once.

use std::ffi::c_char;
use std::sync::Arc;

use moe_edge_engine::{ChatMessage, LoadOptions, Model};

use crate::status::*;

// the C API hands one model to any number of threads
const _: () = {
    const fn shared_between_threads<T: Send + Sync>() {}
    shared_between_threads::<Model>();
};

/// A loaded model (opaque). Shared by its sessions: freeing it while sessions exist is allowed,
/// the memory goes when the last of them is freed.
pub struct moe_edge_model {
    pub(crate) model: Arc<Model>,
}

/// How to load a model. Get defaults from `moe_edge_model_default_params()`, then change fields;
/// `struct_size` must stay `sizeof(moe_edge_model_params)` (it lets later versions add fields).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct moe_edge_model_params {
    pub struct_size: u32,
    /// Threads of the compute pool, shared by every model of the process (0: one per core). The
    /// pool is sized once per process: a later load asking for another count fails.
    pub threads: u32,
    /// Budget of a packed model's expert cache in MiB: -1 takes the pack's own (every expert
    /// unless `pack` set one); a budget smaller than one expert holds one expert.
    pub expert_cache_mb: i64,
    /// Check every expert's checksum at load (packed models).
    pub verify: bool,
}

/// The defaults: threads 0 (one per core), expert_cache_mb -1 (the pack's own budget), verify
/// false; `struct_size` set.
#[no_mangle]
pub extern "C" fn moe_edge_model_default_params() -> moe_edge_model_params {
    moe_edge_model_params {
        struct_size: std::mem::size_of::<moe_edge_model_params>() as u32,
        threads: 0,
        expert_cache_mb: -1,
        verify: false,
    }
}

pub(crate) fn check_struct_size(given: u32, expected: usize, name: &str) -> Outcome {
    if given as usize != expected {
        return Err(invalid(format!(
            "{name}.struct_size is {given}, this library's {name} has {expected} bytes: take the \
             struct from its default_params() function"
        )));
    }
    Ok(())
}

/// Loads the model at `path` (an .onnx file, or a directory with model.onnx or a pack) into
/// `*out`. `params` may be NULL for the defaults. On failure `*out` is set to NULL. Free the model
/// with `moe_edge_model_free`.
///
/// # Safety
/// `path` is a NUL-terminated string; `params` is NULL or points to a `moe_edge_model_params`;
/// `out` points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn moe_edge_model_load(
    path: *const c_char,
    params: *const moe_edge_model_params,
    out: *mut *mut moe_edge_model,
) -> moe_edge_status {
    guard(|| {
        if out.is_null() {
            return Err(null("out"));
        }
        // SAFETY: `out` is not NULL and points to writable storage (caller's contract).
        unsafe { *out = std::ptr::null_mut() };
        // SAFETY: the caller passes a NUL-terminated string.
        let path = unsafe { utf8(path, "path") }?;
        let params = if params.is_null() {
            moe_edge_model_default_params()
        } else {
            // SAFETY: not NULL; points to a moe_edge_model_params (caller's contract); its first
            // field is read before trusting the rest.
            let size = unsafe { (*params).struct_size };
            check_struct_size(
                size,
                std::mem::size_of::<moe_edge_model_params>(),
                "moe_edge_model_params",
            )?;
            // SAFETY: as above, and the size matches this library's struct.
            unsafe { *params }
        };
        if params.expert_cache_mb < -1 {
            return Err(invalid(format!(
                "expert_cache_mb must be -1 (default) or >= 0, got {}",
                params.expert_cache_mb
            )));
        }
        if params.threads > 0 {
            moe_edge_engine::configure_threads(Some(params.threads as usize))?;
        }
        let model = Model::load(
            path.as_ref(),
            LoadOptions {
                expert_cache_mb: u64::try_from(params.expert_cache_mb).ok(),
                verify: params.verify,
                ..Default::default()
            },
        )?;
        let handle = Box::new(moe_edge_model {
            model: Arc::new(model),
        });
        // SAFETY: checked above.
        unsafe { *out = Box::into_raw(handle) };
        Ok(())
    })
}

/// Frees a model from `moe_edge_model_load` (NULL is ignored). Its sessions stay usable.
///
/// # Safety
/// `model` is NULL or a pointer from `moe_edge_model_load` not freed yet.
#[no_mangle]
pub unsafe extern "C" fn moe_edge_model_free(model: *mut moe_edge_model) {
    let _ = guard(|| {
        if !model.is_null() {
            // SAFETY: from Box::into_raw in moe_edge_model_load, freed only once (contract).
            drop(unsafe { Box::from_raw(model) });
        }
        Ok(())
    });
}

/// # Safety
/// `p` is NULL or a live model handle.
pub(crate) unsafe fn model_ref<'a>(p: *const moe_edge_model) -> Outcome<&'a moe_edge_model> {
    // SAFETY: NULL or a live handle (caller's contract).
    unsafe { p.as_ref() }.ok_or_else(|| null("model"))
}

/// The model's tokenizer, or the error every call that needs one gives.
pub(crate) fn tokenizer(model: &Model) -> Outcome<&moe_edge_engine::Tokenizer> {
    model.tokenizer().ok_or_else(|| {
        Failure(
            MOE_EDGE_ERR_UNSUPPORTED,
            "the model has no tokenizer.json".into(),
        )
    })
}

/// Token ids of `text` (NUL-terminated UTF-8), with the model's special tokens (e.g. BOS) added
/// as its tokenizer says. Writes up to `capacity` ids into `tokens` and the number of ids into
/// `*n_tokens`; if `capacity` is too small, returns `MOE_EDGE_ERR_BUFFER_TOO_SMALL` with
/// `*n_tokens` set to the count needed.
///
/// # Safety
/// `model` is a live handle; `text` a NUL-terminated string; `tokens` NULL or valid for
/// `capacity` writes; `n_tokens` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moe_edge_tokenize(
    model: *const moe_edge_model,
    text: *const c_char,
    tokens: *mut i32,
    capacity: usize,
    n_tokens: *mut usize,
) -> moe_edge_status {
    guard(|| {
        // SAFETY: caller's contract.
        let model = unsafe { model_ref(model) }?;
        // SAFETY: caller's contract.
        let text = unsafe { utf8(text, "text") }?;
        if n_tokens.is_null() {
            return Err(null("n_tokens"));
        }
        let ids = tokenizer(&model.model)?.encode(text)?;
        // SAFETY: not NULL, valid for a write (contract).
        unsafe { *n_tokens = ids.len() };
        if capacity < ids.len() {
            return Err(Failure(
                MOE_EDGE_ERR_BUFFER_TOO_SMALL,
                format!("{} tokens do not fit in {capacity}", ids.len()),
            ));
        }
        if ids.is_empty() {
            return Ok(());
        }
        if tokens.is_null() {
            return Err(null("tokens"));
        }
        for (i, &id) in ids.iter().enumerate() {
            let id = i32::try_from(id)
                .map_err(|_| invalid(format!("token id {id} does not fit in int32_t")))?;
            // SAFETY: i < ids.len() <= capacity, and `tokens` is valid for `capacity` writes.
            unsafe { *tokens.add(i) = id };
        }
        Ok(())
    })
}

/// The text of `n_tokens` ids, written NUL-terminated into `buf` (`capacity` bytes); `*len`
/// gets its length without the NUL (with `MOE_EDGE_ERR_BUFFER_TOO_SMALL` if it does not fit).
///
/// # Safety
/// `model` is a live handle; `tokens` valid for `n_tokens` reads (or NULL if 0); `buf` NULL or
/// valid for `capacity` writes; `len` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moe_edge_detokenize(
    model: *const moe_edge_model,
    tokens: *const i32,
    n_tokens: usize,
    buf: *mut c_char,
    capacity: usize,
    len: *mut usize,
) -> moe_edge_status {
    guard(|| {
        // SAFETY: caller's contract.
        let model = unsafe { model_ref(model) }?;
        let ids: Vec<i64> = if n_tokens == 0 {
            vec![]
        } else if tokens.is_null() {
            return Err(null("tokens"));
        } else {
            // SAFETY: not NULL, valid for n_tokens reads (contract).
            unsafe { std::slice::from_raw_parts(tokens, n_tokens) }
                .iter()
                .map(|&t| t as i64)
                .collect()
        };
        if let Some(vocab) = model.model.vocab_size() {
            if let Some((i, t)) = ids
                .iter()
                .enumerate()
                .find(|(_, &t)| t < 0 || t as usize >= vocab)
            {
                return Err(invalid(format!(
                    "token id {t} at position {i} is outside the vocabulary (0..{vocab})"
                )));
            }
        }
        let text = tokenizer(&model.model)?.decode(&ids)?;
        // SAFETY: caller's contract for buf, capacity and len.
        unsafe { write_text(&text, buf, capacity, len) }
    })
}

/// One message of a conversation: `role` ("system", "user", "assistant") and `content`, both
/// NUL-terminated UTF-8, owned by the caller.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct moe_edge_chat_message {
    pub role: *const c_char,
    pub content: *const c_char,
}

/// Reads `n` messages.
///
/// # Safety
/// `messages` is valid for `n` reads (or NULL if 0), each with valid strings.
pub(crate) unsafe fn read_messages(
    messages: *const moe_edge_chat_message,
    n: usize,
) -> Outcome<Vec<ChatMessage>> {
    if n == 0 {
        return Ok(vec![]);
    }
    if messages.is_null() {
        return Err(null("messages"));
    }
    // SAFETY: not NULL and valid for n reads (contract).
    let slice = unsafe { std::slice::from_raw_parts(messages, n) };
    slice
        .iter()
        .enumerate()
        .map(|(i, m)| {
            // SAFETY: the strings are NUL-terminated and valid (contract).
            let role = unsafe { utf8(m.role, &format!("messages[{i}].role")) }?;
            // SAFETY: as above.
            let content = unsafe { utf8(m.content, &format!("messages[{i}].content")) }?;
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

/// Renders `n_messages` messages with the model's chat template, as transformers'
/// `apply_chat_template` does (with the assistant's turn opened if `add_generation_prompt`), into
/// `buf` as for `moe_edge_detokenize`.
///
/// # Safety
/// `model` is a live handle; `messages` valid for `n_messages` reads; `buf` NULL or valid for
/// `capacity` writes; `len` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moe_edge_chat_apply_template(
    model: *const moe_edge_model,
    messages: *const moe_edge_chat_message,
    n_messages: usize,
    add_generation_prompt: bool,
    buf: *mut c_char,
    capacity: usize,
    len: *mut usize,
) -> moe_edge_status {
    guard(|| {
        // SAFETY: caller's contract.
        let model = unsafe { model_ref(model) }?;
        // SAFETY: caller's contract.
        let messages = unsafe { read_messages(messages, n_messages) }?;
        let template = model.model.chat_template().ok_or_else(|| {
            Failure(
                MOE_EDGE_ERR_UNSUPPORTED,
                "the model has no chat template".into(),
            )
        })?;
        let text = template.render(&messages, add_generation_prompt)?;
        // SAFETY: caller's contract.
        unsafe { write_text(&text, buf, capacity, len) }
    })
}

/// The expert cache's counters of a packed model (all zero for a model whose experts are in
/// memory).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct moe_edge_cache_stats {
    pub struct_size: u32,
    /// Whether the model is packed (its experts read on demand through the cache).
    pub packed: bool,
    pub hits: u64,
    pub misses: u64,
    pub bytes_loaded: u64,
    pub evictions: u64,
    pub resident_bytes: u64,
    pub peak_resident_bytes: u64,
    pub budget_bytes: u64,
}

/// A `moe_edge_cache_stats` with its `struct_size` set and every counter zero, to pass to
/// `moe_edge_model_cache_stats`.
#[no_mangle]
pub extern "C" fn moe_edge_cache_stats_init() -> moe_edge_cache_stats {
    moe_edge_cache_stats {
        struct_size: std::mem::size_of::<moe_edge_cache_stats>() as u32,
        ..Default::default()
    }
}

/// Fills `*stats` (whose `struct_size` must be `sizeof(moe_edge_cache_stats)`: take it from
/// `moe_edge_cache_stats_init()`).
///
/// # Safety
/// `model` is a live handle; `stats` points to a `moe_edge_cache_stats`.
#[no_mangle]
pub unsafe extern "C" fn moe_edge_model_cache_stats(
    model: *const moe_edge_model,
    stats: *mut moe_edge_cache_stats,
) -> moe_edge_status {
    guard(|| {
        // SAFETY: caller's contract.
        let model = unsafe { model_ref(model) }?;
        if stats.is_null() {
            return Err(null("stats"));
        }
        // SAFETY: not NULL, points to the struct (contract); the size is read first.
        let size = unsafe { (*stats).struct_size };
        check_struct_size(
            size,
            std::mem::size_of::<moe_edge_cache_stats>(),
            "moe_edge_cache_stats",
        )?;
        let mut out = moe_edge_cache_stats {
            struct_size: size,
            ..Default::default()
        };
        if let Some(c) = model.model.cache_stats() {
            out.packed = true;
            out.hits = c.hits;
            out.misses = c.misses;
            out.bytes_loaded = c.bytes_loaded;
            out.evictions = c.evictions;
            out.resident_bytes = c.resident_bytes;
            out.peak_resident_bytes = c.peak_resident_bytes;
            out.budget_bytes = c.budget_bytes;
        }
        // SAFETY: checked above.
        unsafe { *stats = out };
        Ok(())
    })
}

/// The model's vocabulary size, or 0 if the graph does not show it.
///
/// # Safety
/// `model` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn moe_edge_model_vocab_size(model: *const moe_edge_model) -> usize {
    // SAFETY: caller's contract.
    unsafe { model.as_ref() }
        .and_then(|m| m.model.vocab_size())
        .unwrap_or(0)
}
